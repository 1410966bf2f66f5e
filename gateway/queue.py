"""Handing work to the task workers, always after the transaction that made it due commits.

With a broker (CELERY_BROKER_URL) the Celery task is sent; with CELERY_TASK_ALWAYS_EAGER (tests)
it runs at once in this process; with neither, nothing is sent: the embedded worker of `make run`
(`manage.py runworker`) finds the due rows in the database itself. Either way the row's state and
next_attempt_at are the truth, and the sweeper picks up whatever a lost task left behind.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction

log = logging.getLogger(__name__)


def _publish(task, args: tuple, **options) -> None:
    # The arguments are ids and flags: their plain repr is what Celery's saferepr would give for the task
    # message's argsrepr/kwargsrepr, at a fifth of its cost (a sixth of a publish's CPU, measured).
    task.apply_async(args=args, argsrepr=repr(args), kwargsrepr="{}", **options)


def _send(task_name: str, *args, countdown: float | None = None) -> None:
    if not settings.CELERY_BROKER_URL:
        if not settings.CELERY_TASK_ALWAYS_EAGER or countdown:
            # Eager mode would run a delayed retry at once, in a loop: the sweeper takes it when due.
            return
    from gateway import tasks

    task = getattr(tasks, task_name)
    if not settings.CELERY_BROKER_URL:
        transaction.on_commit(lambda: _publish(task, args, countdown=countdown))
        return

    def send() -> None:
        try:
            _publish(task, args, countdown=countdown)
        except Exception:  # noqa: BLE001 - the broker is down: the row is committed, the sweeper sends it later
            log.exception("could not enqueue %s%r; the sweeper will pick it up", task_name, args)

    # The row is committed by now: a broker that is down must not turn into an error reply to the client
    # (which would send the message again), only into a later pick-up by the sweeper.
    transaction.on_commit(send)


def enqueue_scan(message_id: int, *, countdown: float | None = None) -> None:
    _send("scan_message", message_id, countdown=countdown)


def enqueue_scans(message_ids: list[int]) -> None:
    """The scans of messages already committed (the SMTP server's group commit): with a broker, one round
    trip for all of them (kombu's publish batch: one Redis pipeline)."""
    if not settings.CELERY_BROKER_URL or len(message_ids) < 2:
        for message_id in message_ids:
            enqueue_scan(message_id)  # outside a transaction: sent at once
        return
    from appliance.celery import app
    from gateway import tasks

    try:
        with app.producer_or_acquire() as producer, producer.batch():
            for message_id in message_ids:
                _publish(tasks.scan_message, (message_id,), producer=producer)
    except Exception:  # noqa: BLE001 - the broker is down: the rows are committed, the sweeper sends them later
        log.exception("could not enqueue the scans of %d messages; the sweeper will pick them up", len(message_ids))


def enqueue_delivery(message_id: int, *, countdown: float | None = None) -> None:
    _send("deliver_message", message_id, countdown=countdown)


def enqueue_learn(message_id: int, as_spam: bool) -> None:
    _send("learn_message", message_id, as_spam)


def tasks_are_sent() -> bool:
    return bool(settings.CELERY_BROKER_URL or settings.CELERY_TASK_ALWAYS_EAGER)
