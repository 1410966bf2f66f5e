"""SMTP AUTH on the submission ports: PLAIN and LOGIN, over TLS only, against the appliance's users
(django.contrib.auth, behind the login throttle every door shares: gateway.throttle), with the SMTP server's
own per-client-IP limit of failures on top (SMTPPolicy.auth_max_failures).

A mail client cannot be asked for a second factor: SMTP AUTH takes the password alone, also for a login with
two-factor login set up, unless TWO_FACTOR_REFUSE_SMTP_AUTH says that such a login may not use SMTP AUTH at
all (docs/security.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from aiosmtpd.smtp import AuthResult
from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from django.db import close_old_connections

from gateway import maillog, throttle
from gateway.models import Message
from gateway.policy.enforce import Enforcer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoginCheck:
    """What a login attempt came to: the username that logged in, or None; `throttled` when the login throttle
    refused it without looking at the password."""

    username: str | None
    throttled: bool = False


def username_for(login: str) -> str:
    """The username a login names: itself, or, for an e-mail address that is no username, the one active user
    with that address (an address shared by two logins names neither, and stays as it was sent)."""
    User = get_user_model()
    if "@" not in login or User.objects.filter(**{User.USERNAME_FIELD: login}).exists():
        return login
    matches = list(User.objects.filter(email__iexact=login, is_active=True)[:2])
    return matches[0].get_username() if len(matches) == 1 else login


def check_login(login: str, password: str, client_ip: str | None = None) -> LoginCheck:
    """Check the credentials a client sent from `client_ip`. The login may be the username or the user's e-mail
    address; either way one attempt is counted once, under the username it names. Synchronous (database,
    password hashing): run it in a thread."""
    close_old_connections()
    if not login or not password or len(login) > 320 or len(password) > 1024:
        return LoginCheck(None)
    username = username_for(login)
    if throttle.refusal(username, client_ip):
        return LoginCheck(None, throttled=True)
    user = authenticate(username=username, password=password, client_ip=client_ip)
    if user is None or not user.is_active:
        # Throttled meanwhile (by another process's failures), or this failure reached a limit.
        return LoginCheck(None, throttled=throttle.refusal(username, client_ip) is not None)
    if settings.TWO_FACTOR_REFUSE_SMTP_AUTH and throttle.has_second_factor(user):
        # The password was right (not counted as a failure), but this login's password is not enough here.
        log.info("AUTH refused for %s from %s: two-factor login is set up (TWO_FACTOR_REFUSE_SMTP_AUTH)",
                 user.get_username(), client_ip)
        return LoginCheck(None)
    return LoginCheck(user.get_username())


def throttled_reply(client_ip: str | None) -> str:
    return f"421 4.7.0 Too many failed authentications from [{client_ip}], try again later"


async def verify(checks: Enforcer, server, mechanism: str, login: bytes, password: bytes) -> AuthResult:
    """Check the credentials a client sent (`server` is its protocol instance); a failure is counted
    against its IP and logged as a refusal."""
    started = time.monotonic()
    name = login.decode("utf-8", "replace")
    # Password hashing takes a while on purpose: not on the event loop, not in the database threads.
    conn = server.conn
    checked = await asyncio.to_thread(check_login, name, password.decode("utf-8", "replace"), conn.client_ip)
    username = checked.username
    seconds = round(time.monotonic() - started, 4)
    if username:
        server.session.auth_user = username
        conn.extra["auth"] = {"result": "pass", "mechanism": mechanism, "user": username, "seconds": seconds}
        log.info("AUTH %s as %s from %s", mechanism, username, conn.client_ip)
        return AuthResult(success=True, auth_data=username)
    failures = await checks.auth_failed(conn.client_ip or "")
    reply = "535 5.7.8 Authentication credentials invalid"
    config = checks.config()
    if checked.throttled or (config.auth_max_failures and failures >= config.auth_max_failures):
        reply = throttled_reply(conn.client_ip)
    conn.extra["auth"] = {"result": "fail", "mechanism": mechanism, "login": name[:100],
                          "failures": int(failures), "seconds": seconds, "throttled": checked.throttled}
    maillog.auth_failed(client_name=await checks.client_name(server.session), client_ip=conn.client_ip,
                        mechanism=mechanism, username=name)
    await checks.refuse(server.session, server.envelope, Message.Refusal.AUTH_FAILED, reply, command="SASL")
    return AuthResult(success=False, handled=False, message=reply)
