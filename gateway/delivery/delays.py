"""Delay warnings: a recipient still deferred DELAY_WARNING_HOURS after its message arrived gets its sender a
DSN with `Action: delayed` (RFC 3464 §2.3.3), once. Run by beat (gateway.tasks.delay_warnings)."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from gateway.models import MailFlowSettings, Message, Recipient

from . import dsn

log = logging.getLogger(__name__)


def due_warnings(now=None):
    """The deferred recipients whose sender is owed a delay warning."""
    now = now or timezone.now()
    cutoff = now - timedelta(hours=settings.DELAY_WARNING_HOURS)
    return (Recipient.objects.filter(status=Recipient.Status.DEFERRED, delay_warned=False,
                                     message__received_at__lte=cutoff)
            .exclude(message__envelope_sender="").exclude(message__direction=Message.Direction.DSN))


def send_delay_warnings(now=None, batch: int = 500) -> int:
    """One warning per message for its recipients now due one; returns how many recipients were warned for.
    Each recipient is claimed (delay_warned False → True) in the transaction that queues the warning: two
    runs at once, or one run twice, warn once."""
    if settings.DELAY_WARNING_HOURS <= 0:
        return 0
    now = now or timezone.now()
    lifetime = MailFlowSettings.cached().queue_lifetime
    by_message: dict[int, list[int]] = defaultdict(list)
    for pk, message_id in due_warnings(now).values_list("pk", "message_id")[:batch]:
        by_message[message_id].append(pk)
    warned = 0
    for message_id, ids in by_message.items():
        with transaction.atomic():
            delayed = list(Recipient.objects.select_for_update(skip_locked=True).filter(
                pk__in=ids, status=Recipient.Status.DEFERRED, delay_warned=False).order_by("id"))
            if not delayed:
                continue
            Recipient.objects.filter(pk__in=[r.pk for r in delayed]).update(delay_warned=True)
            message = Message.objects.get(pk=message_id)
            dsn.send_delay_notice(message, delayed, message.received_at + lifetime)
            warned += len(delayed)
            log.info("%s: delay warning to <%s> for %d recipient(s)", message.queue_id, message.envelope_sender,
                     len(delayed))
    return warned
