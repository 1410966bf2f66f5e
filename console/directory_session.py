"""The sessions of directory accounts follow their directory: every DIRECTORY_RECHECK_SECONDS a logged-in LDAP
account is searched again and its role and addresses refreshed (gateway.directory.login.recheck), so that someone
removed from the administrators' group, or from the directory, does not keep what they had until their session
ends. A directory that cannot be asked changes nothing."""

from __future__ import annotations

import time
from collections.abc import Callable

from django.conf import settings
from django.contrib.auth import logout
from django.http import HttpRequest, HttpResponse

from gateway.directory.login import recheck

SESSION_KEY = "directory_checked_at"


class DirectorySessionMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        user = getattr(request, "user", None)
        profile = getattr(user, "mail_profile", None) if getattr(user, "is_authenticated", False) else None
        if profile is not None and profile.directory_id is not None:
            checked = request.session.get(SESSION_KEY)
            now = time.time()
            if checked is None:
                request.session[SESSION_KEY] = now  # the login itself was the directory's word
            elif now - float(checked) >= settings.DIRECTORY_RECHECK_SECONDS:
                if recheck(user):
                    request.session[SESSION_KEY] = now
                else:
                    logout(request)
        return self.get_response(request)
