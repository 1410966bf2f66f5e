"""The sweeper and the retention purge, run by beat every minute (and by the embedded worker): what a lost
task left behind is handed back and sent again, and what is past its time goes, in batches."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from gateway.models import (
    ACTIVE_RECIPIENT_STATUSES,
    DirectoryLookup,
    MailFlowSettings,
    Message,
    RawMessage,
    Recipient,
    RecipientVerification,
    SMTPPolicy,
)
from gateway.policy import greylist

log = logging.getLogger(__name__)


def due_work(now=None, *, received_grace: float = 120) -> tuple[list[int], list[int]]:
    """Ids of the messages due for a scan, and of those with recipients due for delivery.

    A message just received is left alone for `received_grace` seconds: its task is on its way.
    """
    now = now or timezone.now()
    stale = now - timedelta(seconds=settings.STALE_CLAIM_SECONDS)
    # Claims held by a worker that died are handed back.
    Message.objects.filter(state=Message.State.SCANNING, claimed_at__lt=stale).update(
        state=Message.State.SCAN_DEFERRED, next_attempt_at=now, last_error="the scan was interrupted")
    Recipient.objects.filter(status=Recipient.Status.DELIVERING, claimed_at__lt=stale).update(
        status=Recipient.Status.DEFERRED, next_attempt_at=now, claimed_at=None)
    scans = list(Message.objects.filter(
        Q(state=Message.State.RECEIVED, received_at__lte=now - timedelta(seconds=received_grace))
        | Q(state=Message.State.SCAN_DEFERRED, next_attempt_at__lte=now)
    ).order_by("received_at").values_list("pk", flat=True)[:1000])
    deliveries = list(Recipient.objects.filter(
        status__in=[Recipient.Status.PENDING, Recipient.Status.DEFERRED], next_attempt_at__lte=now
    ).values_list("message_id", flat=True).distinct()[:1000])
    return scans, deliveries


def purge_expired(now=None, batch: int = 1000) -> int:
    """Retention: the bytes of quarantined mail past its time go, in batches; the log entries stay."""
    now = now or timezone.now()
    config = MailFlowSettings.cached()
    cutoff = now - timedelta(days=config.quarantine_retention_days)
    # A message whose other recipients are still being delivered keeps its bytes until they are done.
    ids = list(Message.objects.filter(state=Message.State.QUARANTINED, received_at__lt=cutoff)
               .exclude(recipients__status__in=ACTIVE_RECIPIENT_STATUSES).values_list("pk", flat=True)[:batch])
    if ids:
        RawMessage.objects.filter(message_id__in=ids).delete()
        Recipient.objects.filter(message_id__in=ids, status=Recipient.Status.QUARANTINED).update(
            status=Recipient.Status.DELETED)
        Message.objects.filter(pk__in=ids, state=Message.State.QUARANTINED).update(
            state=Message.State.DELETED, quarantined=False, last_error="quarantine retention expired")
    log_cutoff = now - timedelta(days=config.log_retention_days)
    old = list(Message.objects.filter(received_at__lt=log_cutoff).exclude(
        state__in=[Message.State.RECEIVED, Message.State.SCANNING, Message.State.SCAN_DEFERRED,
                   Message.State.DELIVERING, Message.State.QUARANTINED]).values_list("pk", flat=True)[:batch])
    if old:
        Message.objects.filter(pk__in=old).delete()
    return len(ids) + len(old)




def forget_expired() -> dict:
    """Hourly: forget expired greylisting triplets, and the expired answers of the recipient call-ahead and of the
    directories' recipient check (a dictionary attack leaves one row per address it tried)."""
    policy = SMTPPolicy.load()
    triplets = greylist.purge(retry_window_hours=policy.greylist_retry_window_hours,
                              lifetime_days=policy.greylist_lifetime_days)
    now = timezone.now()
    answers = RecipientVerification.objects.filter(expires_at__lt=now).delete()[0]
    lookups = DirectoryLookup.objects.filter(expires_at__lt=now).delete()[0]
    return {"greylist": triplets, "callahead": answers, "directory": lookups}
