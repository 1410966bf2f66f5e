"""Writing the mail log through the ORM: accepted messages with their raw bytes and recipients in one
transaction (any database; the PostgreSQL path is gateway.intake.writer), and the attempts refused at SMTP
time. Plain synchronous functions: the SMTP server runs them in its thread pool."""

from __future__ import annotations

from django.conf import settings
from django.db import close_old_connections, transaction
from django.utils import timezone

from gateway import metrics
from gateway.dispatch import enqueue
from gateway.models import Message, RawMessage, Recipient

from .rows import Arrival, new_message, summarise_headers, without_nul


def store_messages(items: list[tuple[Arrival, bytes]]) -> list[Message]:
    """Messages, their raw bytes and recipients in one transaction (the ORM's way, for any database);
    their scans are enqueued on commit."""
    close_old_connections()
    built = [new_message(envelope, data) for envelope, data in items]
    stored = []
    with transaction.atomic():
        for (values, recipients), (_, data) in zip(built, items, strict=True):
            message = Message(**values)
            message.save(force_insert=True)
            RawMessage.objects.create(message=message, data=data)
            Recipient.objects.bulk_create([Recipient(message=message, **r) for r in recipients])
            enqueue.scan(message.pk)
            stored.append(message)
    return stored


def log_refusal(*, reason: str, reply: str, client_ip: str | None, client_name: str = "", helo: str = "",
                sender: str = "", recipient: str = "", checks: dict | None = None,
                recipients: list[str] | None = None, data: bytes | None = None,
                authenticated_as: str = "") -> None:
    """One row in the mail log for an attempt refused at SMTP time, so that the daily totals count it.

    A refusal after DATA (DMARC) passes all the recipients and the message, whose From, Subject and
    Message-ID are logged (the message itself is not kept: it was refused).
    """
    close_old_connections()
    reply = without_nul(reply)
    summary = summarise_headers(data) if data else {}
    if data:
        summary["size"] = len(data)
    message = Message.objects.create(**without_nul(dict(
        node=settings.NODE_NAME, state=Message.State.REFUSED, client_ip=client_ip, client_name=client_name[:255],
        helo=helo[:255], envelope_sender=sender[:320], refusal_reason=reason, smtp_reply=reply[:512],
        authenticated_as=authenticated_as[:150], checks=checks or {}, completed_at=timezone.now(), **summary)))
    addresses = without_nul(list(recipients or []) + ([recipient] if recipient else []))
    Recipient.objects.bulk_create([
        Recipient(message=message, address=address.lower()[:320], status=Recipient.Status.REFUSED,
                  reply_text=reply, domain=address.rsplit("@", 1)[-1].lower()[:253])
        for address in dict.fromkeys(addresses)])
    metrics.count("mailgate_messages_refused", reason=reason)
