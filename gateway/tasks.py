"""Celery tasks of the mail path: each takes an id, calls its stage, and returns quietly when the row is gone
or already taken. The stages leave every row in a state that tells what happens next, so that the
sweeper can pick up whatever a lost task (a dead worker, a flushed broker) left behind.

Nothing of the mail path imports this module: work is sent by task name (gateway.dispatch).
"""

from __future__ import annotations

import logging

from celery import shared_task

from gateway import sweep as sweeper
from gateway.delivery import delays
from gateway.delivery.attempt import run_delivery
from gateway.scan import ScannerUnavailable
from gateway.scan.run import learn, run_scan

log = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def scan_message(message_id: int) -> str:
    return run_scan(message_id)


@shared_task(ignore_result=True)
def deliver_message(message_id: int) -> None:
    run_delivery(message_id)


@shared_task(ignore_result=True, autoretry_for=(ScannerUnavailable,), retry_backoff=30, retry_backoff_max=900,
             retry_jitter=True, max_retries=20)
def learn_message(message_id: int, as_spam: bool) -> None:
    learn(message_id, as_spam)


@shared_task(ignore_result=True)
def housekeeping() -> dict:
    """Hourly: forget expired greylisting triplets and expired recipient call-ahead answers."""
    return sweeper.forget_expired()


@shared_task(ignore_result=True)
def sweep() -> dict:
    """Re-enqueue what is due and what a lost task left behind (run by beat every minute)."""
    scans, deliveries = sweeper.due_work()
    for message_id in scans:
        scan_message.delay(message_id)
    for message_id in deliveries:
        deliver_message.delay(message_id)
    purged = sweeper.purge_expired()
    if scans or deliveries or purged:
        log.info("sweep: %d scans, %d deliveries re-enqueued, %d purged", len(scans), len(deliveries), purged)
    return {"scans": len(scans), "deliveries": len(deliveries), "purged": purged}


@shared_task(ignore_result=True)
def delay_warnings() -> int:
    """Every few minutes: a delay warning (DSN, Action: delayed) for what has waited DELAY_WARNING_HOURS."""
    return delays.send_delay_warnings()
