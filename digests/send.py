"""Who gets a digest, of which quarantined mail, and sending it.

A digest lists the held copies (Recipient rows still quarantined) that its receiver may act for and that no
digest of theirs listed before: those quarantined after the receiver's high-water mark (`Subscription.upto`,
looked at an hour back so that a scan committed late is not missed), less those that already have a link of
this receiver's. It is a message of our own, written here and handed to the delivery like any other (route,
retries, DKIM signature of our domain), never scanned nor quarantined itself.
"""

from __future__ import annotations

import email.policy
import email.utils
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Exists, OuterRef, QuerySet
from django.db.models.functions import Coalesce
from django.template.loader import render_to_string
from django.utils import timezone

from gateway.access import Role, addresses_of, domains_of, may_release_virus, role_of
from gateway.delivery.signing import GENERATED
from gateway.dispatch import enqueue
from gateway.models import Message, RawMessage, Recipient, Verdict

from .models import (
    DigestLink,
    DigestPolicy,
    DomainDigestPolicy,
    Frequency,
    Subscription,
    UnsubscribeLink,
    hash_token,
    new_token,
)
from .schedule import is_due

log = logging.getLogger(__name__)

# A scan sets its quarantine time before its transaction commits: look this far behind the mark for those.
LOOKBACK = timedelta(hours=1)


@dataclass
class Receiver:
    """One digest to make: its subscription (unsaved until something is sent), where it goes, with whose rights
    its links act (None: an address without a login, for itself only), its frequency and hour."""

    subscription: Subscription
    to: str
    actor: object | None
    frequency: str
    hour: int
    weekday: int
    addresses: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        sub = self.subscription
        if sub.kind == Subscription.Kind.ADDRESS:
            return f"<{self.to}>"
        what = "domains " + ", ".join(self.domains) if sub.kind == Subscription.Kind.DOMAIN else "own mail"
        return f"{sub.user.get_username()} <{self.to}> ({what})"

    def held(self) -> QuerySet[Recipient]:
        held = Recipient.objects.filter(status=Recipient.Status.QUARANTINED, message__state=Message.State.QUARANTINED)
        if self.subscription.kind == Subscription.Kind.DOMAIN:
            return held.filter(domain__in=self.domains)
        return held.filter(address__in=self.addresses)


def _subscription(kind: str, *, user=None, address: str = "") -> Subscription:
    found = Subscription.objects.filter(kind=kind, user=user, address=address).first()
    return found or Subscription(kind=kind, user=user, address=address)


def receivers(*, username: str | None = None, address: str | None = None) -> list[Receiver]:
    """Every receiver of digests (frequency off included), or those of one login or one address."""
    policy = DigestPolicy.load()
    domains = {p.domain.name: p for p in DomainDigestPolicy.objects.select_related("domain")}

    def settings_for(sub: Subscription, domain: str) -> tuple[str, int]:
        override = domains.get(domain)
        hour = override.hour if override is not None and override.hour is not None else policy.hour
        if sub.frequency:
            return sub.frequency, hour
        if sub.kind == Subscription.Kind.DOMAIN:
            return Frequency.OFF, hour
        return (override.frequency if override is not None and override.frequency else policy.default_frequency), hour

    found: list[Receiver] = []
    owned: set[str] = set()
    users = get_user_model().objects.filter(is_active=True).select_related("mail_profile")
    for user in users:
        own = addresses_of(user)
        owned.update(own)
        role = role_of(user)
        if not role or (username is not None and user.get_username() != username):
            continue
        if address is not None and address not in own:
            continue
        to = (user.email or (own[0] if own else "")).lower()
        if not to:
            continue
        if own:
            sub = _subscription(Subscription.Kind.USER, user=user)
            frequency, hour = settings_for(sub, to.rpartition("@")[2])
            found.append(Receiver(sub, to, user, frequency, hour, policy.weekday, addresses=own))
        if role == Role.DOMAIN_ADMIN and address is None and domains_of(user):
            sub = _subscription(Subscription.Kind.DOMAIN, user=user)
            frequency, hour = settings_for(sub, to.rpartition("@")[2])
            found.append(Receiver(sub, to, user, frequency, hour, policy.weekday, domains=domains_of(user)))
    if username is not None:
        return found
    # Addresses that are no login's, in the domains that say they get digests: those with mail held now.
    open_domains = [name for name, p in domains.items() if p.non_users]
    held = (Recipient.objects.filter(status=Recipient.Status.QUARANTINED, message__state=Message.State.QUARANTINED,
                                     domain__in=open_domains).values_list("address", flat=True).distinct())
    if address is not None:
        held = held.filter(address=address)
    for held_address in sorted(set(held) - owned):
        sub = _subscription(Subscription.Kind.ADDRESS, address=held_address)
        frequency, hour = settings_for(sub, held_address.rpartition("@")[2])
        found.append(Receiver(sub, held_address, None, frequency, hour, policy.weekday, addresses=[held_address]))
    return found


def new_items(receiver: Receiver, cutoff: datetime) -> QuerySet[Recipient]:
    """The held copies this receiver's digests have not listed yet, newest first."""
    sub = receiver.subscription
    qs = (receiver.held().select_related("message")
          .annotate(held_since=Coalesce("message__scanned_at", "message__received_at"))
          .filter(held_since__lte=cutoff))
    if sub.upto is not None:
        qs = qs.filter(held_since__gt=sub.upto - LOOKBACK)
    if sub.pk is not None:
        qs = qs.exclude(Exists(DigestLink.objects.filter(subscription=sub, recipient=OuterRef("pk"))))
    return qs.order_by("-held_since", "-pk")


def actions_for(receiver: Receiver, recipient: Recipient) -> list[str]:
    """The links one line of the digest offers: a virus is released only by those who may release one (never
    through the digest of an address without a login); a sender is allowed on a login's own list only."""
    message = recipient.message
    offered = [DigestLink.Action.PREVIEW]
    if message.verdict != Verdict.VIRUS or (receiver.actor is not None and may_release_virus(receiver.actor)):
        offered.append(DigestLink.Action.RELEASE)
        if receiver.actor is not None and message.envelope_sender:
            offered.append(DigestLink.Action.RELEASE_ALLOW)
    offered.append(DigestLink.Action.DELETE)
    return offered


def link_url(queue_id: str, action: str, token: str) -> str:
    return f"{settings.SITE_URL}/digest/{queue_id}/{action}/{token}"


def _why(message: Message) -> str:
    if message.virus_names:
        return "virus: " + ", ".join(message.virus_names)
    blocked = [a.get("name") or "unnamed" for a in message.attachments if a.get("blocked")]
    if blocked:
        return "blocked attachment: " + ", ".join(blocked)
    if message.spam_score is not None:
        return f"spam score {message.spam_score:.1f}"
    return message.get_verdict_display().lower() or "held"


@dataclass
class Sent:
    receiver: Receiver
    count: int
    message: Message | None  # None: a dry run


def _compose(receiver: Receiver, lines: list[dict], more: int, unsubscribe_url: str,
             now: datetime) -> tuple[bytes, str]:
    count = len(lines) + more
    subject = (f"Quarantine report: {count} new message{'s' if count != 1 else ''} held"
               + (f" for {', '.join(receiver.domains)}" if receiver.domains else ""))
    context = {"receiver": receiver, "lines": lines, "more": more, "count": count, "subject": subject,
               "unsubscribe_url": unsubscribe_url, "quarantine_url": f"{settings.SITE_URL}/quarantine/",
               "link_days": settings.DIGEST_LINK_DAYS, "site_url": settings.SITE_URL,
               "product": settings.PRODUCT_NAME, "now": now, "domain_digest": bool(receiver.domains)}
    mail = EmailMessage(policy=email.policy.SMTP)
    sender = settings.DIGEST_SENDER
    local, _, domain = sender.rpartition("@")
    mail["From"] = Address(settings.DIGEST_SENDER_NAME, local, domain)
    mail["To"] = receiver.to
    mail["Subject"] = subject
    mail["Date"] = email.utils.format_datetime(now)
    mail["Message-ID"] = email.utils.make_msgid("digest", domain=domain or settings.SMTP_HOSTNAME)
    mail["Auto-Submitted"] = "auto-generated"
    mail["List-Id"] = f"Quarantine reports <digest.{domain or settings.SMTP_HOSTNAME}>"
    mail["List-Unsubscribe"] = f"<{unsubscribe_url}>"
    mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    mail.set_content(render_to_string("digests/digest.txt", context), cte="quoted-printable")
    mail.add_alternative(render_to_string("digests/digest.html", context), subtype="html", cte="quoted-printable")
    return mail.as_bytes(), subject


def send(receiver: Receiver, *, now: datetime | None = None, dry_run: bool = False,
         due_only: bool = False) -> Sent | None:
    """Make and queue one receiver's digest of what is new; None when nothing is (or it is not due, or off).
    The mark moves, the links are made and the message is queued in one transaction: a digest sent is a
    digest remembered, and two runs at once send it once (the subscription row is locked)."""
    now = now or timezone.now()
    if receiver.frequency == Frequency.OFF:
        return None
    if dry_run:
        items = list(new_items(receiver, now)[: settings.DIGEST_MAX_ITEMS])
        return Sent(receiver, len(items), None) if items else None
    with transaction.atomic():
        sub = receiver.subscription
        if sub.pk is None:
            sub.save()
        sub = Subscription.objects.select_for_update().get(pk=sub.pk)
        receiver.subscription = sub
        if due_only and not is_due(sub.last_run_at, now, receiver.frequency, receiver.hour, receiver.weekday):
            return None
        qs = new_items(receiver, now)
        items = list(qs[: settings.DIGEST_MAX_ITEMS])
        sub.last_run_at = now
        if not items:
            sub.upto = now
            sub.save(update_fields=["last_run_at", "upto"])
            return None
        more = qs.count() - len(items) if len(items) == settings.DIGEST_MAX_ITEMS else 0
        expires = now + timedelta(days=settings.DIGEST_LINK_DAYS)
        lines, links = [], []
        for recipient in items:
            message = recipient.message
            urls = {}
            for action in actions_for(receiver, recipient):
                token = new_token()
                links.append(DigestLink(token_hash=hash_token(token), subscription=sub, message=message,
                                        recipient=recipient, action=action, created_at=now, expires_at=expires))
                urls[action] = link_url(message.queue_id, action, token)
            lines.append({"message": message, "recipient": recipient.address, "held_since": recipient.held_since,
                          "why": _why(message), "urls": urls})
        DigestLink.objects.bulk_create(links)
        unsubscribe = new_token()
        UnsubscribeLink.objects.create(token_hash=hash_token(unsubscribe), subscription=sub, created_at=now)
        data, subject = _compose(receiver, lines, more, f"{settings.SITE_URL}/digest/unsubscribe/{unsubscribe}", now)
        digest = queue_digest(receiver.to, data, subject=subject, now=now)
        sub.upto, sub.last_sent_at, sub.sent_count = now, now, sub.sent_count + 1
        sub.save(update_fields=["last_run_at", "upto", "last_sent_at", "sent_count"])
    log.info("digest of %d messages to %s queued as %s", len(items) + more, receiver.to, digest.queue_id)
    return Sent(receiver, len(items) + more, digest)


def queue_digest(to: str, data: bytes, *, subject: str, now: datetime) -> Message:
    """The digest as a message of ours: logged, delivered by the delivery task (its route, its retries, the DKIM
    signature of the sender's domain), not scanned."""
    sender = settings.DIGEST_SENDER.lower()
    digest = Message.objects.create(
        node=settings.NODE_NAME, direction=Message.Direction.OUTBOUND, state=Message.State.DELIVERING,
        envelope_sender=sender, header_from=f"{settings.DIGEST_SENDER_NAME} <{sender}>", subject=subject,
        size=len(data), verdict=Verdict.CLEAN, action="deliver", scanned_at=now,
        scan_notes=["a quarantine digest written by this gateway: not scanned"],
        checks={GENERATED: "quarantine digest"})
    RawMessage.objects.create(message=digest, data=data)
    Recipient.objects.create(message=digest, address=to, verdict=Verdict.CLEAN, action="deliver", next_attempt_at=now)
    enqueue.delivery(digest.pk)
    return digest


def send_all(*, username: str | None = None, address: str | None = None, dry_run: bool = False,
             due_only: bool = False, now: datetime | None = None) -> tuple[list[Sent], list[Receiver]]:
    """Every receiver's digest (or one login's, one address's): (what was sent, who had nothing or is off)."""
    now = now or timezone.now()
    sent, idle = [], []
    for receiver in receivers(username=username, address=address):
        outcome = send(receiver, now=now, dry_run=dry_run, due_only=due_only)
        (sent.append(outcome) if outcome else idle.append(receiver))
    return sent, idle
