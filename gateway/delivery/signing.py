"""DKIM signing of our outgoing mail, at delivery.

Signed: mail that came from an authenticated user or a trusted network (never mail from outside, whatever its
From says), whose header From domain, or else whose envelope sender domain, is one of our domains with an
active key (`manage.py dkim genkey`). A login's mail is signed only for the domains it may send as
(gateway.access.SenderRights.signing_domains: its addresses' domains, a domain administrator's domains, any
of ours for an administrator): the SMTP server refuses a From the login does not own, and the signature does
not rely on that alone. Mail the gateway writes itself (checks["generated"]: the quarantine digests) is signed
for its From domain when that is one of ours. The signature covers the message exactly as it leaves: our
trace and scan headers included, after the subject tag, so it is made per delivery, by the delivery task, and
the stored original stays untouched.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models.signals import m2m_changed

from gateway.access import SenderRights, canonical_domain, sender_rights
from gateway.mailauth import dkim
from gateway.mailauth.dmarc import from_domains
from gateway.models import DKIMKey, Message, UserProfile
from gateway.snapshot import Snapshot

log = logging.getLogger(__name__)

# What each login may sign for, by username: every delivery of a login's mail asks, so the answers are kept
# for CONFIG_CACHE_SECONDS (the dict is replaced whole then), and forgotten at once in the process that
# changes a user, a profile or a domain administrator's domains.
_rights: Snapshot[dict[str, SenderRights]] = Snapshot(dict).clear_on_change(settings.AUTH_USER_MODEL, UserProfile)
m2m_changed.connect(_rights.clear, sender=UserProfile.domains.through, weak=False)


def rights_of(username: str) -> SenderRights:
    """What the login `username` may send as (nothing when it is gone or inactive)."""
    held = _rights.get()
    rights = held.get(username)
    if rights is None:
        User = get_user_model()
        user = User.objects.filter(**{User.USERNAME_FIELD: username}).select_related("mail_profile").first()
        rights = held[username] = sender_rights(user) if user is not None else SenderRights(username)
    return rights


# The `checks` key of a message this gateway wrote itself (the quarantine digests): never set by the SMTP server,
# which writes what it checked of a client.
GENERATED = "generated"


def may_sign(message: Message) -> bool:
    checks = message.checks or {}
    return bool(message.authenticated_as or checks.get("trusted") or checks.get("relay") or checks.get(GENERATED))


def allowed_domains(message: Message) -> set[str] | None:
    """The domains this message may be signed for: those of its login when it was authenticated (None: any of
    ours, an administrator's), any of ours (those with a key) for a trusted network's, none for the rest."""
    if message.authenticated_as:
        return rights_of(message.authenticated_as).signing_domains()
    checks = message.checks or {}
    if checks.get("trusted") or checks.get("relay") == "trusted network" or checks.get(GENERATED):
        return None
    return set()


def signing_key(message: Message, data: bytes) -> DKIMKey | None:
    candidates = []
    try:
        candidates += from_domains(data)[:1]
    except Exception:  # noqa: BLE001 - an unparsable From: no header domain to sign for
        pass
    if message.envelope_sender and "@" in message.envelope_sender:
        candidates.append(message.envelope_sender.rsplit("@", 1)[1].lower())
    allowed = allowed_domains(message)
    candidates = [d for d in dict.fromkeys(canonical_domain(c) for c in candidates)
                  if allowed is None or d in allowed]
    if not candidates:
        return None
    # One query for the candidates; the newest active key of the first candidate that has one signs.
    keys = (DKIMKey.objects.filter(domain__name__in=candidates, domain__active=True, active=True)
            .select_related("domain").order_by("-created_at"))
    newest: dict[str, DKIMKey] = {}
    for key in keys:
        newest.setdefault(key.domain.name, key)
    return next((newest[d] for d in candidates if d in newest), None)


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
