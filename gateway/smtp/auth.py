"""SMTP AUTH against the appliance's users (django.contrib.auth): PLAIN and LOGIN, over TLS only."""

from __future__ import annotations

from django.contrib.auth import authenticate, get_user_model
from django.db import close_old_connections


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
