"""SMTP AUTH on the submission ports: PLAIN and LOGIN, over TLS only, against the appliance's users
(django.contrib.auth), with a per-client-IP throttle of failures (SMTPPolicy.auth_max_failures)."""

from __future__ import annotations

import asyncio
import logging
import time

from aiosmtpd.smtp import AuthResult
from django.contrib.auth import authenticate, get_user_model
from django.db import close_old_connections

from gateway.models import Message
from gateway.policy.enforce import Enforcer

log = logging.getLogger(__name__)


def check_login(login: str, password: str) -> str | None:
    """The username of the active user with these credentials, or None. The login may be the username or
    the user's e-mail address. Synchronous (database, password hashing): run it in a thread."""
    close_old_connections()
    if not login or not password or len(login) > 320 or len(password) > 1024:
        return None
    user = authenticate(username=login, password=password)
    if user is None and "@" in login:
        User = get_user_model()
        matches = list(User.objects.filter(email__iexact=login, is_active=True)[:2])
        if len(matches) == 1:  # an e-mail address shared by two logins names neither
            user = authenticate(username=matches[0].get_username(), password=password)
    if user is None or not user.is_active:
        return None
    return user.get_username()


def throttled_reply(client_ip: str | None) -> str:
    return f"421 4.7.0 Too many failed authentications from [{client_ip}], try again later"


async def verify(checks: Enforcer, server, mechanism: str, login: bytes, password: bytes) -> AuthResult:
    """Check the credentials a client sent (`server` is its protocol instance); a failure is counted
    against its IP and logged as a refusal."""
    started = time.monotonic()
    name = login.decode("utf-8", "replace")
    # Password hashing takes a while on purpose: not on the event loop, not in the database threads.
    username = await asyncio.to_thread(check_login, name, password.decode("utf-8", "replace"))
    seconds = round(time.monotonic() - started, 4)
    conn = server.conn
    if username:
        server.session.auth_user = username
        conn.extra["auth"] = {"result": "pass", "mechanism": mechanism, "user": username, "seconds": seconds}
        log.info("AUTH %s as %s from %s", mechanism, username, conn.client_ip)
        return AuthResult(success=True, auth_data=username)
    failures = checks.limits.auth_failures.hit(conn.client_ip or "")
    reply = "535 5.7.8 Authentication credentials invalid"
    config = checks.config()
    if config.auth_max_failures and failures >= config.auth_max_failures:
        reply = throttled_reply(conn.client_ip)
    conn.extra["auth"] = {"result": "fail", "mechanism": mechanism, "login": name[:100],
                          "failures": int(failures), "seconds": seconds}
    await checks.refuse(server.session, server.envelope, Message.Refusal.AUTH_FAILED, reply)
    return AuthResult(success=False, handled=False, message=reply)
