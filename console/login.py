"""Logging in to the site and to the Django admin, behind the login throttle of gateway.throttle.

The throttle itself is in the authentication path (gateway.throttle.ThrottledModelBackend): these forms only
ask it first, so that a throttled attempt is told so in words ("Too many failed logins ...") instead of the
usual "enter a correct username and password", and is audited as such.
"""

from __future__ import annotations

from django import forms
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm

from gateway import throttle
from gateway.models import record_audit

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


class LoginView(auth_views.LoginView):
    form_class = ThrottledAuthenticationForm
    redirect_authenticated_user = True
