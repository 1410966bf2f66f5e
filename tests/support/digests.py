"""What the digest tests read out of a digest: its parts, its links."""

from __future__ import annotations

import email
import email.policy
import re
from urllib.parse import urlparse

LINK = re.compile(r"https?://[^\s<>\"]+/digest/[^\s<>\"]+")


def parts(data: bytes) -> dict[str, str]:
    mail = email.message_from_bytes(data, policy=email.policy.default)
    assert mail.get_content_type() == "multipart/alternative", mail.get_content_type()
    return {part.get_content_type(): part.get_content() for part in mail.iter_parts()}


def links(data: bytes) -> list[str]:
    """The digest links of the plain-text part, as paths (the host is SITE_URL's)."""
    text = parts(data)["text/plain"]
    return [urlparse(url).path for url in LINK.findall(text)]


def link(data: bytes, action: str, queue_id: str | None = None) -> str:
    found = [p for p in links(data) if f"/{action}/" in p and (queue_id is None or f"/digest/{queue_id}/" in p)]
    assert found, f"no {action} link for {queue_id} in {links(data)}"
    return found[0]


def csrf_of(html: str) -> str:
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)


def header(data: bytes, name: str) -> str:
    """A header field's value, unfolded."""
    value = email.message_from_bytes(data, policy=email.policy.default)[name]
    return " ".join(str(value).split()) if value is not None else ""
