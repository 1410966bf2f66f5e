"""Two-factor login: an authenticator app (TOTP, django_otp's TOTPDevice) and one-time recovery codes.

- Setting it up is on /account/two-factor/: the QR code and the secret in base32 for manual entry; the device
  counts only once a code from it was entered (`confirmed`). Ten recovery codes are shown then, once; only
  their keyed hashes are kept (`console.models.RecoveryCode`). Turning it off needs a current code or the
  password.
- Logging in takes two steps (console/login.py): after the password, a login with a confirmed device is not
  logged in; the session only holds who is waiting for their code (`begin`, `pending_user`), for
  TWO_FACTOR_PENDING_SECONDS. The code (or a recovery code) is checked behind the login throttle, and a wrong
  one counts as a failed login.
- `TwoFactorMiddleware` holds the rule for every page, the Django admin's too: a session of a login with a
  device that did not pass its second factor in that session (a session opened before the device was set up,
  or by any other way in) is logged out; with TWO_FACTOR_REQUIRED_FOR_ADMINS an administrator without a device
  reaches only the set-up page (and the logout) until they have one.

SMTP AUTH cannot ask for a code; docs/security.md says what it does.
"""

from __future__ import annotations

import secrets
import time
from base64 import b32encode
from collections.abc import Callable

import django_otp
import segno
from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model, logout
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.crypto import salted_hmac
from django.views.decorators.http import require_POST
from django_otp.plugins.otp_totp.models import TOTPDevice

from gateway import throttle
from gateway.access import is_admin
from gateway.models import record_audit

from .http import client_ip
from .models import RecoveryCode

PENDING_KEY = "twofactor_pending"
RECOVERY_CODES = 10
# No 0/o, 1/l/i: a code is read off paper. 31 symbols, 12 of them: about 59 bits each.
RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
RECOVERY_LENGTH = 12
HASH_SALT = "mailgate.console.twofactor.recovery-code"
# The pages a login that must set up two-factor login may still open.
ENROLMENT_VIEWS = {"two_factor", "two_factor_start", "two_factor_confirm", "logout"}


# --- Devices -------------------------------------------------------------------------------------------------


def confirmed_device(user) -> TOTPDevice | None:
    """The login's authenticator, once set up; None without one (or for an anonymous user)."""
    if not getattr(user, "pk", None):
        return None
    return TOTPDevice.objects.filter(user=user, confirmed=True).order_by("pk").first()


def unconfirmed_device(user) -> TOTPDevice | None:
    return TOTPDevice.objects.filter(user=user, confirmed=False).order_by("-pk").first()


def required_for(user) -> bool:
    """Whether this login must have two-factor login (an administrator, when the setting says so)."""
    return bool(settings.TWO_FACTOR_REQUIRED_FOR_ADMINS) and is_admin(user)


def base32_secret(device: TOTPDevice) -> str:
    """The device's secret as an authenticator app takes it by hand: base32, without padding."""
    return b32encode(device.bin_key).decode().rstrip("=")


def qr_svg(device: TOTPDevice) -> str:
    """The otpauth:// URI of the device as a QR code, an inline SVG (no script, no image from elsewhere)."""
    return segno.make(device.config_url, error="m").svg_inline(scale=5, border=4, light="#fff", dark="#000")


def verify_totp(user, code: str) -> TOTPDevice | None:
    """The confirmed device that accepts this code now, or None. A code already used (or an older one) is
    refused: the device remembers the last time step it accepted (django_otp's last_t)."""
    device = confirmed_device(user)
    code = "".join(code.split())
    if device is None or not (code.isdigit() and len(code) == device.digits):
        return None
    return django_otp.verify_token(user, device.persistent_id, code)


# --- Recovery codes --------------------------------------------------------------------------------------------


def normal_code(code: str) -> str:
    """A recovery code as it is compared: lower case, without spaces or dashes."""
    return "".join(ch for ch in code.lower() if ch.isalnum())


def _code_hashes(user, code: str) -> list[str]:
    # Keyed (SECRET_KEY, and the fallbacks so that rotating the key keeps the codes) and bound to the user: the
    # database alone does not give the codes away, and one login's hash is no use for another.
    value = f"{user.pk}:{normal_code(code)}"
    keys = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    return [salted_hmac(HASH_SALT, value, secret=key, algorithm="sha256").hexdigest() for key in keys]


def new_recovery_codes(user) -> list[str]:
    """Replace the login's recovery codes with RECOVERY_CODES new ones, and answer them (to be shown once)."""
    codes = []
    for _ in range(RECOVERY_CODES):
        raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_LENGTH))
        codes.append("-".join(raw[i:i + 4] for i in range(0, RECOVERY_LENGTH, 4)))
    with transaction.atomic():
        RecoveryCode.objects.filter(user=user).delete()
        RecoveryCode.objects.bulk_create([RecoveryCode(user=user, code_hash=_code_hashes(user, c)[0]) for c in codes])
    return codes


def recovery_codes_left(user) -> int:
    return RecoveryCode.objects.filter(user=user, used_at__isnull=True).count()


def use_recovery_code(user, code: str) -> bool:
    """Spend one of the login's unused recovery codes: True when `code` was one. A claim (an UPDATE of an unused
    row), so that the same code sent twice at once works once."""
    if len(normal_code(code)) != RECOVERY_LENGTH:
        return False
    return RecoveryCode.objects.filter(user=user, code_hash__in=_code_hashes(user, code),
                                       used_at__isnull=True).update(used_at=timezone.now()) > 0


def remove(user) -> None:
    """Turn two-factor login off for a login: its devices and recovery codes are deleted."""
    with transaction.atomic():
        TOTPDevice.objects.filter(user=user).delete()
        RecoveryCode.objects.filter(user=user).delete()


# --- The second step of a login -----------------------------------------------------------------------------------


def begin(request: HttpRequest, user, next_url: str) -> None:
    """The password was right and the login has a device: remember who waits for their code, not logged in.

    A new session key, as login() would make: the pending state must not ride on a key someone planted."""
    request.session.cycle_key()
    request.session[PENDING_KEY] = {"user": user.pk, "backend": getattr(user, "backend", ""),
                                    "at": time.time(), "next": next_url}


def pending(request: HttpRequest) -> dict | None:
    """The pending second step of this session, while it is younger than TWO_FACTOR_PENDING_SECONDS."""
    state = request.session.get(PENDING_KEY)
    if not isinstance(state, dict):
        return None
    if time.time() - float(state.get("at", 0)) > settings.TWO_FACTOR_PENDING_SECONDS:
        request.session.pop(PENDING_KEY, None)
        return None
    return state


def pending_user(request: HttpRequest):
    """The active login waiting for its second factor in this session, or None (none, expired, gone)."""
    state = pending(request)
    if state is None:
        return None
    user = get_user_model().objects.filter(pk=state.get("user"), is_active=True).first()
    if user is None:
        request.session.pop(PENDING_KEY, None)
    return user


def finish(request: HttpRequest) -> None:
    request.session.pop(PENDING_KEY, None)


# --- The rule for every page ---------------------------------------------------------------------------------------


class TwoFactorMiddleware:
    """After django_otp's OTPMiddleware: a login with a device is in only when this session passed its second
    factor; an administrator who must have two-factor login and has none is sent to set it up."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_view(self, request: HttpRequest, view_func, view_args, view_kwargs) -> HttpResponse | None:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None
        if django_otp.user_has_device(user):
            if user.is_verified():
                return None
            # A session that never passed this login's second factor (opened before the device was set up, or
            # by a door that does not ask for it): out, and in again through both steps.
            logout(request)
            return redirect_to_login(request.get_full_path())
        if required_for(user):
            match = request.resolver_match
            if match is None or match.url_name not in ENROLMENT_VIEWS or match.namespace:
                return redirect("two_factor")
        return None


# --- /account/two-factor/ --------------------------------------------------------------------------------------


class ConfirmForm(forms.Form):
    code = forms.CharField(label="Code from the app", max_length=12,
                           widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric",
                                                         "autocapitalize": "none"}))


class ReauthForm(forms.Form):
    """A current code or the password again, before the second factor is turned off or new recovery codes are
    made: a session left open is not enough for either. Behind the login throttle like the login itself: a
    throttled username or address is refused, a wrong answer counts as a failed login."""

    code = forms.CharField(label="A current code from the app", max_length=12, required=False,
                           widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "inputmode": "numeric"}))
    password = forms.CharField(label="or your password", required=False,
                               widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}))

    def __init__(self, *args, user, ip: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.user, self.ip = user, ip

    def clean(self):
        from .login import throttled_text

        data = super().clean()
        username = self.user.get_username()
        if throttle.refusal(username, self.ip):
            raise forms.ValidationError(throttled_text(), code="throttled")
        code, password = (data.get("code") or "").strip(), data.get("password") or ""
        if code and verify_totp(self.user, code) is not None:
            return data
        if password and self.user.check_password(password):
            return data
        throttle.record_failure(username, self.ip)
        raise forms.ValidationError("Enter a current code from your app, or your password.")


def _page(request: HttpRequest, *, status: int = 200, codes: list[str] | None = None, **forms_) -> HttpResponse:
    user = request.user
    device = confirmed_device(user)
    setup = None if device else unconfirmed_device(user)
    context = {
        "device": device, "setup": setup, "required": required_for(user), "new_codes": codes,
        "codes_left": recovery_codes_left(user) if device else 0,
        "confirm_form": forms_.get("confirm_form") or ConfirmForm(),
        "disable_form": forms_.get("disable_form") or ReauthForm(user=user),
        "codes_form": forms_.get("codes_form") or ReauthForm(user=user),
    }
    if setup is not None:
        secret = base32_secret(setup)
        # In groups of four, as it is typed into a phone (apps ignore the spaces).
        context.update(secret=" ".join(secret[i:i + 4] for i in range(0, len(secret), 4)), qr=qr_svg(setup),
                       issuer=settings.TWO_FACTOR_ISSUER)
    return render(request, "console/two_factor.html", context, status=status)


@login_required
def page(request: HttpRequest) -> HttpResponse:
    return _page(request)


@login_required
@require_POST
def start(request: HttpRequest) -> HttpResponse:
    """A new secret for the app, not yet in force: it counts once a code from it is entered."""
    if confirmed_device(request.user) is None:
        TOTPDevice.objects.filter(user=request.user, confirmed=False).delete()
        TOTPDevice.objects.create(user=request.user, name="Authenticator app", confirmed=False)
    return redirect("two_factor")


@login_required
@require_POST
def confirm(request: HttpRequest) -> HttpResponse:
    user = request.user
    device = unconfirmed_device(user)
    if device is None or confirmed_device(user) is not None:
        return redirect("two_factor")
    form = ConfirmForm(request.POST)
    if form.is_valid() and device.verify_token("".join(form.cleaned_data["code"].split())):
        device.confirmed = True
        device.save(update_fields=["confirmed"])
        codes = new_recovery_codes(user)
        # This session is the one that proved it holds the device; every other session of the login is logged
        # out at its next request (TwoFactorMiddleware).
        django_otp.login(request, device)
        record_audit("two_factor_enrol", user=user, ip=client_ip(request), target=user.get_username(),
                     device=device.persistent_id)
        messages.success(request, "Two-factor login is on.")
        return _page(request, codes=codes)
    if form.is_valid():
        form.add_error("code", "That code is not right. Check the time on your phone, and enter the newest code.")
    return _page(request, status=400, confirm_form=form)


@login_required
@require_POST
def recovery_codes(request: HttpRequest) -> HttpResponse:
    user = request.user
    if confirmed_device(user) is None:
        return redirect("two_factor")
    form = ReauthForm(request.POST, user=user, ip=client_ip(request))
    if not form.is_valid():
        return _page(request, status=400, codes_form=form)
    codes = new_recovery_codes(user)
    record_audit("two_factor_recovery_codes", user=user, ip=client_ip(request), target=user.get_username())
    return _page(request, codes=codes)


@login_required
@require_POST
def disable(request: HttpRequest) -> HttpResponse:
    user = request.user
    if confirmed_device(user) is None:
        return redirect("two_factor")
    form = ReauthForm(request.POST, user=user, ip=client_ip(request))
    if not form.is_valid():
        return _page(request, status=400, disable_form=form)
    remove(user)
    record_audit("two_factor_disable", user=user, ip=client_ip(request), target=user.get_username())
    messages.success(request, "Two-factor login is off.")
    return redirect("two_factor")
