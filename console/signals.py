"""Logins and logouts land in the audit log, failed ones too (with the username tried and the IP)."""

from __future__ import annotations

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver

from gateway.models import record_audit

from .http import client_ip


@receiver(user_logged_in)
def audit_login(sender, request, user, **kwargs) -> None:
    record_audit("login", user=user, ip=client_ip(request), target=user.get_username())


@receiver(user_logged_out)
def audit_logout(sender, request, user, **kwargs) -> None:
    if user is not None:
        record_audit("logout", user=user, ip=client_ip(request), target=user.get_username())


@receiver(user_login_failed)
def audit_login_failed(sender, credentials, request=None, **kwargs) -> None:
    username = str(credentials.get("username", ""))[:150]
    # SMTP AUTH has no request: it names the client in the credentials (gateway.throttle).
    ip = client_ip(request) or credentials.get("client_ip") or None
    record_audit("login_failed", ip=ip, target=username)
