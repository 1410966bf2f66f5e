"""Logging in to the site, with throttling: five failures for one username from one IP in 15 minutes lock that pair out.

The counter lives in Django's cache. Keyed on username *and* IP: an attacker guessing one account from one
place is stopped, while a user locked out by someone else's guessing can still log in from their own IP.
"""

from __future__ import annotations

import hashlib

from django import forms
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache

from gateway.models import record_audit

from .http import client_ip

MAX_FAILURES = 5
WINDOW_SECONDS = 15 * 60


def _key(username: str, ip: str | None) -> str:
    digest = hashlib.sha256(f"{username.strip().lower()}\0{ip or ''}".encode()).hexdigest()
    return f"login-failures:{digest}"


class ThrottledAuthenticationForm(AuthenticationForm):
    error_messages = {
        **AuthenticationForm.error_messages,
        "throttled": "Too many failed logins for this username from your address. "
                     "Wait 15 minutes, then try again.",
    }

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        key = _key(username, client_ip(self.request))
        if (cache.get(key) or 0) >= MAX_FAILURES:
            record_audit("login_throttled", ip=client_ip(self.request), target=username[:150])
            raise forms.ValidationError(self.error_messages["throttled"], code="throttled")
        try:
            return super().clean()
        except forms.ValidationError:
            # add() starts the window at the first failure; incr() keeps its expiry.
            cache.add(key, 0, WINDOW_SECONDS)
            try:
                cache.incr(key)
            except ValueError:  # expired between add and incr
                cache.set(key, 1, WINDOW_SECONDS)
            raise

    def confirm_login_allowed(self, user) -> None:
        super().confirm_login_allowed(user)
        cache.delete(_key(self.cleaned_data.get("username") or "", client_ip(self.request)))


class LoginView(auth_views.LoginView):
    form_class = ThrottledAuthenticationForm
    redirect_authenticated_user = True
