"""Logging in to the site and to the Django admin, behind the login throttle of gateway.throttle.

The throttle itself is in the authentication path (gateway.throttle.ThrottledModelBackend): these forms only
ask it first, so that a throttled attempt is told so in words ("Too many failed logins ...") instead of the
usual "enter a correct username and password", and is audited as such.

A login with two-factor login set up (console/twofactor.py) takes a second step after the password, at
/login/code: the app's code or a recovery code, behind the same throttle. Until it passes the session holds
only who is waiting for their code; the site's login and the admin's (/admin/login/, the same view with the
admin's form and page) both lead there.
"""

from __future__ import annotations

import django_otp
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import REDIRECT_FIELD_NAME
from django.contrib.auth import login as auth_login
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_post_parameters

from gateway import maillog, throttle
from gateway.models import record_audit

from . import twofactor
from .http import client_ip


def throttled_text() -> str:
    minutes = max(1, round(throttle.window_seconds() / 60))
    return f"Too many failed logins for this username or from your address. Wait {minutes} minutes, then try again."


class ThrottleFirstMixin:
    """Refuse a throttled attempt before the password is checked, with a message that says why."""

    request: object
    cleaned_data: dict

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        ip = client_ip(self.request)
        if username and throttle.refusal(username, ip):
            record_audit("login_throttled", ip=ip, target=username[:150])
            raise forms.ValidationError(throttled_text(), code="throttled")
        return super().clean()


class ThrottledAuthenticationForm(ThrottleFirstMixin, AuthenticationForm):
    pass


class ThrottledAdminAuthenticationForm(ThrottleFirstMixin, AdminAuthenticationForm):
    pass


class TwoStepLoginMixin:
    """The password passed: log in, unless the login has a device; then only remember it and ask the code."""

    request: HttpRequest

    def form_valid(self, form) -> HttpResponse:
        user = form.get_user()
        if twofactor.confirmed_device(user) is None:
            return super().form_valid(form)
        twofactor.begin(self.request, user, self.get_success_url())
        return redirect("login_code")


class LoginView(TwoStepLoginMixin, auth_views.LoginView):
    form_class = ThrottledAuthenticationForm
    redirect_authenticated_user = True


class AdminLoginView(TwoStepLoginMixin, auth_views.LoginView):
    """/admin/login/: the admin's page and form (staff only), the same two steps as the site's login. It stands
    in for AdminSite.login (whose view logs in straight after the password), with the context that one gives."""

    form_class = ThrottledAdminAuthenticationForm
    template_name = "admin/login.html"

    def dispatch(self, request, *args, **kwargs):
        if request.method == "GET" and admin.site.has_permission(request):
            return redirect("admin:index")
        request.current_app = admin.site.name
        return super().dispatch(request, *args, **kwargs)

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context.update(admin.site.each_context(self.request), title="Log in", subtitle=None,
                       app_path=self.request.get_full_path(), username=self.request.user.get_username())
        if REDIRECT_FIELD_NAME not in self.request.GET and REDIRECT_FIELD_NAME not in self.request.POST:
            context[REDIRECT_FIELD_NAME] = reverse("admin:index")
        return context

    def get_default_redirect_url(self) -> str:
        return reverse("admin:index")


class CodeForm(forms.Form):
    code = forms.CharField(label="Code", max_length=32, strip=True,
                           widget=forms.TextInput(attrs={"autocomplete": "one-time-code", "autocapitalize": "none",
                                                         "autofocus": True, "spellcheck": "false"}))


def _safe_next(request: HttpRequest, url: str) -> str:
    if url and url_has_allowed_host_and_scheme(url, allowed_hosts={request.get_host()},
                                               require_https=request.is_secure()):
        return url
    return reverse(settings.LOGIN_REDIRECT_URL)


@sensitive_post_parameters("code")
@csrf_protect
@never_cache
def login_code(request: HttpRequest) -> HttpResponse:
    """The second step: the code of the app, or a recovery code, for the login whose password passed.

    Behind the login throttle like the password: a throttled username or address is refused with the same words
    (the right code too), and a wrong code counts as a failed login for the username and the address."""
    user = twofactor.pending_user(request)
    if user is None:
        messages.info(request, "Log in again: the time to enter your code has run out.")
        return redirect("login")
    username, ip = user.get_username(), client_ip(request)
    form = CodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        code = form.cleaned_data["code"]
        if throttle.refusal(username, ip):
            record_audit("login_throttled", ip=ip, target=username[:150], step="second factor")
            maillog.web_login_failed(client_ip=ip, username=username, throttled=True)
            form.add_error(None, forms.ValidationError(throttled_text(), code="throttled"))
        else:
            device = twofactor.verify_totp(user, code)
            recovered = device is None and twofactor.use_recovery_code(user, code)
            if recovered:
                device = twofactor.confirmed_device(user)
            if device is not None:
                return _logged_in(request, user, device, recovered=recovered)
            throttle.record_failure(username, ip)
            maillog.web_login_failed(client_ip=ip, username=username)
            record_audit("two_factor_failed", user=user, ip=ip, target=username)
            text = throttled_text() if throttle.refusal(username, ip) else (
                "That code is not right, or it was used already. Enter the newest code of your app, "
                "or a recovery code.")
            form.add_error(None, text)
    # 200 with the reason, as the password step answers.
    return render(request, "registration/login_code.html", {"form": form, "username": username})


def _logged_in(request: HttpRequest, user, device, *, recovered: bool) -> HttpResponse:
    state = twofactor.pending(request) or {}
    username, ip = user.get_username(), client_ip(request)
    twofactor.finish(request)
    throttle.record_success(username, ip)
    auth_login(request, user, backend=state.get("backend") or None)
    django_otp.login(request, device)
    if recovered:
        left = twofactor.recovery_codes_left(user)
        record_audit("two_factor_recovery_used", user=user, ip=ip, target=username, left=left)
        messages.warning(request, f"You logged in with a recovery code; {left} of them left. "
                                  "Make new ones on My account → Two-factor login.")
    return redirect(_safe_next(request, state.get("next", "")))
