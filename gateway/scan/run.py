"""The scan task's course: claim the message, ask the scanners, write (or hold) the verdict, and deliver
what the verdict made due at once, with the message and its bytes in hand (docs/decisions.md: "The scan
task delivers at once"). A scanner that does not answer defers the scan: never delivered unscanned."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import NamedTuple

from django.conf import settings
from django.utils import timezone

from gateway import claims, metrics
from gateway.db import statements
from gateway.delivery import attempt as delivery
from gateway.dispatch import enqueue
from gateway.models import MailFlowSettings, Message, RawMessage, Recipient

from . import ScannerUnavailable, record, spamassassin, verdict

log = logging.getLogger(__name__)


class ScanClaim(NamedTuple):
    message: Message
    raw: bytes
    recipient_count: int
    # The recipients waiting for this scan's verdict (PostgreSQL; None elsewhere), for a delivery that
    # follows the scan before its verdict is written (gateway.scan.record.HeldVerdict).
    pending: list[Recipient] | None


def claim_scan(message_id: int) -> ScanClaim | None:
    """Claim the message for a scan (received or scan-deferred → scanning, one more attempt) and read it,
    its raw bytes, its number of recipients and (PostgreSQL) its pending recipients, in one statement;
    None when it is not there to claim."""
    joined = statements.joined()
    claimed = statements.claim_scan(message_id, timezone.now(), with_pending=joined)
    if claimed is None:
        return None
    message, (raw, recipient_count, *pending) = claimed
    return ScanClaim(message, bytes(raw or b""), int(recipient_count),
                     statements.pending_recipients(message, pending[0]) if joined else None)


def run_scan(message_id: int) -> str:
    claimed = claim_scan(message_id)
    if claimed is None:
        return "taken" if Message.objects.filter(pk=message_id).exists() else "gone"
    message, raw, recipient_count, pending = claimed
    config = MailFlowSettings.cached()
    started = time.monotonic()
    try:
        outcome = verdict.scan(message, raw, config)
    except ScannerUnavailable as exc:
        metrics.count("mailgate_scanner_errors", scanner=_scanner_of(exc))
        # Not delivered unscanned: the message waits, visibly, and is tried again later.
        delay = claims.backoff(message.attempts, settings.SCAN_RETRY_BASE, settings.SCAN_RETRY_MAX)
        Message.objects.filter(pk=message.pk, state=Message.State.SCANNING, claimed_at=message.claimed_at).update(
            state=Message.State.SCAN_DEFERRED, last_error=str(exc)[:2000], claimed_at=None,
            next_attempt_at=timezone.now() + timedelta(seconds=delay))
        log.warning("scan of %s deferred for %ss: %s", message.queue_id, delay, exc)
        enqueue.scan(message.pk, countdown=delay)
        return "deferred"
    metrics.observe("mailgate_scan_seconds", time.monotonic() - started)
    metrics.count("mailgate_verdicts", verdict=outcome.verdict)
    held = record.hold_verdict(message, outcome, config, pending)
    if held is not None:
        # Delivered under the scan's claim, the verdict written with the delivery's outcome: one write
        # fewer per message (gateway.scan.record.HeldVerdict).
        delivery.deliver(message, raw, recipient_count=recipient_count, held=held)
        return message.verdict
    applied = record.apply_verdict(message, outcome, config, pending)
    if applied is None:
        return "taken"  # the claim went stale and another worker scanned it meanwhile
    if applied.deliver:
        # Delivered here and now, with the message, its bytes and (usually) its claimed recipients in hand:
        # no second task, no second read. A failure leaves the recipients due, and deliver_message / the
        # sweeper retries them.
        delivery.deliver(message, raw, recipient_count=recipient_count, claimed=applied.claimed)
    return message.verdict


def _scanner_of(exc: ScannerUnavailable) -> str:
    # The scanners' errors name them first ("clamd at ...", "spamd at ..."): the label of the counter.
    text = str(exc).lower()
    return next((name for name in ("clamd", "spamd") if name in text), "other")


def learn(message_id: int, as_spam: bool) -> None:
    """Teach spamd's Bayes filter that a stored message is spam, or ham (TELL)."""
    stored = RawMessage.objects.filter(message_id=message_id).values_list("data", "message__added_headers").first()
    if stored is None or not spamassassin.configured():
        return
    raw, added_headers = stored
    # Learnt as it was scanned: the connecting client's relay is among the tokens Bayes keeps.
    spamassassin.tell(verdict.spamd_input(added_headers, bytes(raw)), as_spam=as_spam)
