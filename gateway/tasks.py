"""Celery tasks of the mail path. Each takes an id, returns quietly when the row is gone or already
taken, and leaves the row in a state that tells what happens next, so that the sweeper can pick up
whatever a lost task (a dead worker, a flushed broker) left behind."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import NamedTuple

from celery import shared_task
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from . import delivery, pipeline, queue, rowsql
from .models import MailFlowSettings, Message, RawMessage, Recipient
from .scanners import ScannerUnavailable, spamassassin

log = logging.getLogger(__name__)


PENDING_COLUMNS = ("id", "address", "domain", "attempts", "released")


class ScanClaim(NamedTuple):
    message: Message
    raw: bytes
    recipient_count: int
    # The recipients waiting for this scan's verdict (PostgreSQL; None elsewhere), for a delivery that
    # follows the scan before its verdict is written (pipeline.HeldVerdict).
    pending: list[Recipient] | None


def claim_scan(message_id: int) -> ScanClaim | None:
    """Claim the message for a scan (received or scan-deferred → scanning, one more attempt) and read it,
    its raw bytes, its number of recipients and (PostgreSQL) its pending recipients, in one statement;
    None when it is not there to claim."""
    message_table, raw_table, recipient_table = (rowsql.table(m) for m in (Message, RawMessage, Recipient))
    message_id_column = f"{message_table}.{rowsql.column(Message, 'id')}"
    attempts = rowsql.column(Message, "attempts")
    of_message = f"{rowsql.column(Recipient, 'message')} = {message_id_column}"
    extra = [f"(SELECT {rowsql.column(RawMessage, 'data')} FROM {raw_table} "
             f"WHERE {rowsql.column(RawMessage, 'message')} = {message_id_column})",
             f"(SELECT COUNT(*) FROM {recipient_table} WHERE {of_message})"]
    if rowsql.writes_in_one_statement():
        columns = ", ".join(rowsql.column(Recipient, name) for name in PENDING_COLUMNS)
        # The status is one of our own constants, written into the text (the statement stays the same), and
        # checked the way state_is() does: found by the message, not through recipient_due's dead entries.
        extra.append(f"(SELECT json_agg(json_build_array({columns}) ORDER BY {rowsql.column(Recipient, 'id')})::text "
                     f"FROM {recipient_table} WHERE {of_message} "
                     f"AND ({rowsql.column(Recipient, 'status')} = '{Recipient.Status.PENDING.value}') IS TRUE)")
    rows = rowsql.update_returning(
        Message,
        {"state": Message.State.SCANNING, "claimed_at": timezone.now(), "attempts": rowsql.Raw(f"{attempts} + 1")},
        f"{message_id_column} = %s AND {rowsql.state_is(Message, 'state', 2)}",
        [message_id, Message.State.RECEIVED, Message.State.SCAN_DEFERRED], extra=extra)
    if not rows:
        return None
    ((message, (raw, recipient_count, *pending)),) = rows
    return ScanClaim(message, bytes(raw or b""), int(recipient_count),
                     _pending_recipients(message, pending[0]) if pending else None)


def _pending_recipients(message: Message, listed: str | None) -> list[Recipient]:
    """The claim's JSON list of pending recipients as instances (the other fields have their values of a
    recipient not yet scanned: no verdict, action, reply or claim)."""
    return [Recipient(message=message, status=Recipient.Status.PENDING, **dict(zip(PENDING_COLUMNS, row, strict=True)))
            for row in json.loads(listed or "[]")]


def run_scan(message_id: int) -> str:
    claimed = claim_scan(message_id)
    if claimed is None:
        return "taken" if Message.objects.filter(pk=message_id).exists() else "gone"
    message, raw, recipient_count, pending = claimed
    config = MailFlowSettings.cached()
    try:
        outcome = pipeline.scan(message, raw, config)
    except ScannerUnavailable as exc:
        # Not delivered unscanned: the message waits, visibly, and is tried again later.
        delay = delivery.backoff(message.attempts, settings.SCAN_RETRY_BASE, settings.SCAN_RETRY_MAX)
        Message.objects.filter(pk=message.pk, state=Message.State.SCANNING, claimed_at=message.claimed_at).update(
            state=Message.State.SCAN_DEFERRED, last_error=str(exc)[:2000], claimed_at=None,
            next_attempt_at=timezone.now() + timedelta(seconds=delay))
        log.warning("scan of %s deferred for %ss: %s", message.queue_id, delay, exc)
        queue.enqueue_scan(message.pk, countdown=delay)
        return "deferred"
    held = pipeline.hold_verdict(message, outcome, config, pending)
    if held is not None:
        # Delivered under the scan's claim, the verdict written with the delivery's outcome: one write
        # fewer per message (pipeline.HeldVerdict).
        delivery.deliver(message, raw, recipient_count=recipient_count, held=held)
        return message.verdict
    applied = pipeline.apply_verdict(message, outcome, config)
    if applied is None:
        return "taken"  # the claim went stale and another worker scanned it meanwhile
    if applied.deliver:
        # Delivered here and now, with the message, its bytes and (usually) its claimed recipients in hand:
        # no second task, no second read. A failure leaves the recipients due, and deliver_message / the
        # sweeper retries them.
        delivery.deliver(message, raw, recipient_count=recipient_count, claimed=applied.claimed)
    return message.verdict


def run_delivery(message_id: int) -> None:
    message = Message.objects.filter(pk=message_id).first()
    if message is not None:
        delivery.deliver(message)


@shared_task(ignore_result=True)
def scan_message(message_id: int) -> str:
    return run_scan(message_id)


@shared_task(ignore_result=True)
def deliver_message(message_id: int) -> None:
    run_delivery(message_id)


@shared_task(ignore_result=True, autoretry_for=(ScannerUnavailable,), retry_backoff=30, retry_backoff_max=900,
             retry_jitter=True, max_retries=20)
def learn_message(message_id: int, as_spam: bool) -> None:
    stored = RawMessage.objects.filter(message_id=message_id).values_list("data", "message__added_headers").first()
    if stored is None or not spamassassin.configured():
        return
    raw, added_headers = stored
    # Learnt as it was scanned: the connecting client's relay is among the tokens Bayes keeps.
    spamassassin.tell(pipeline.spamd_input(added_headers, bytes(raw)), as_spam=as_spam)


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


ACTIVE_RECIPIENT_STATUSES = [Recipient.Status.PENDING, Recipient.Status.DEFERRED, Recipient.Status.DELIVERING]


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


@shared_task(ignore_result=True)
def housekeeping() -> dict:
    """Hourly: forget expired greylisting triplets and expired recipient call-ahead answers."""
    from gateway.models import RecipientVerification, SMTPPolicy
    from gateway.policy import greylist

    policy = SMTPPolicy.load()
    triplets = greylist.purge(retry_window_hours=policy.greylist_retry_window_hours,
                              lifetime_days=policy.greylist_lifetime_days)
    answers = RecipientVerification.objects.filter(expires_at__lt=timezone.now()).delete()[0]
    return {"greylist": triplets, "callahead": answers}


@shared_task(ignore_result=True)
def sweep() -> dict:
    """Re-enqueue what is due and what a lost task left behind (run by beat every minute)."""
    scans, deliveries = due_work()
    for message_id in scans:
        scan_message.delay(message_id)
    for message_id in deliveries:
        deliver_message.delay(message_id)
    purged = purge_expired()
    if scans or deliveries or purged:
        log.info("sweep: %d scans, %d deliveries re-enqueued, %d purged", len(scans), len(deliveries), purged)
    return {"scans": len(scans), "deliveries": len(deliveries), "purged": purged}
