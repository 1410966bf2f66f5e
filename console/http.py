"""What the pages read from a request beyond its form: the address it came from, for the audit log."""

from __future__ import annotations

from django.http import HttpRequest

from gateway.throttle import client_address


def client_ip(request: HttpRequest | None) -> str | None:
    """The address the request came from: REMOTE_ADDR, unless REMOTE_ADDR is one of TRUSTED_PROXIES, in which
    case the client the proxy names in X-Forwarded-For. Without TRUSTED_PROXIES, X-Forwarded-For is whatever the
    client wants it to be and is ignored. The login throttle reads the same (gateway.throttle.client_address)."""
    return client_address(request)
