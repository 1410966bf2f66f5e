"""What the pages read from a request beyond its form: the address it came from, for the audit log."""

from __future__ import annotations

from django.http import HttpRequest


def client_ip(request: HttpRequest | None) -> str | None:
    """The address the request came from. REMOTE_ADDR only: X-Forwarded-For is whatever the client wants it
    to be unless a trusted proxy rewrites REMOTE_ADDR (configure that in the proxy or in middleware that
    knows which proxies to believe, not here)."""
    if request is None:
        return None
    return request.META.get("REMOTE_ADDR") or None
