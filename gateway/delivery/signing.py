"""DKIM signing of our outgoing mail, at delivery.

Signed: mail that came from an authenticated user or a trusted network (never mail from outside, whatever its
From says), whose header From domain, or else whose envelope sender domain, is one of our domains with an
active key (`manage.py dkim genkey`). The signature covers the message exactly as it leaves: our trace and
scan headers included, after the subject tag, so it is made per delivery, by the delivery task, and the stored
original stays untouched.
"""

from __future__ import annotations

import logging

from gateway.mailauth import dkim
from gateway.mailauth.dmarc import from_domains
from gateway.models import DKIMKey, Message

log = logging.getLogger(__name__)


def may_sign(message: Message) -> bool:
    checks = message.checks or {}
    return bool(message.authenticated_as or checks.get("trusted") or checks.get("relay"))


def signing_key(message: Message, data: bytes) -> DKIMKey | None:
    candidates = []
    try:
        candidates += from_domains(data)[:1]
    except Exception:  # noqa: BLE001 - an unparsable From: no header domain to sign for
        pass
    if message.envelope_sender and "@" in message.envelope_sender:
        candidates.append(message.envelope_sender.rsplit("@", 1)[1].lower())
    for domain in dict.fromkeys(candidates):
        key = (DKIMKey.objects.filter(domain__name=domain, domain__active=True, active=True)
               .select_related("domain").order_by("-created_at").first())
        if key is not None:
            return key
    return None


def sign_outgoing(message: Message, data: bytes) -> bytes:
    """`data` with a DKIM-Signature in front when the message is ours to sign; else `data` unchanged.
    A signing failure is logged and the message goes unsigned (it is still ours to deliver)."""
    if not may_sign(message):
        return data
    key = signing_key(message, data)
    if key is None:
        return data
    try:
        header = dkim.sign(data, key.domain.name, key.selector, key.private_key, key.algorithm)
    except Exception:  # noqa: BLE001
        log.exception("DKIM signing of %s with %s failed; delivering unsigned", message.queue_id, key)
        return data
    return header + data
