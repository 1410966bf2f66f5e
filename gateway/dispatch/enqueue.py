"""Handing work to the task workers, always after the transaction that made it due commits.

With a broker (CELERY_BROKER_URL) the Celery task is sent by its name; with CELERY_TASK_ALWAYS_EAGER
(tests) it runs at once in this process; with neither, nothing is sent: the embedded worker of `make run`
(`manage.py runworker`) finds the due rows in the database itself. Either way the row's state and
next_attempt_at are the truth, and the sweeper picks up whatever a lost task left behind.

Tasks are named, not imported: the process that sends a scan (the SMTP server) has no business loading
the scanners and the delivery code that the task module brings in. The names are those gateway/tasks.py
registers.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction

log = logging.getLogger(__name__)

SCAN = "gateway.tasks.scan_message"
DELIVER = "gateway.tasks.deliver_message"
LEARN = "gateway.tasks.learn_message"

# The options every task of the mail path is sent with: the same as the tasks' own (@shared_task), so that
# a task sent by name is the message Celery makes from the task itself.
SEND_OPTIONS = {"ignore_result": True}


def celery_app():
    from appliance.celery import app

    return app


def registered_task(name: str):
    """The task object, for running it in this process (eager mode): Celery's own task discovery loads the
    task modules of the installed apps the first time one is asked for."""
    app = celery_app()
    task = app.tasks.get(name)
    if task is None:
        app.loader.import_default_modules()
        task = app.tasks[name]
    return task


def publish(name: str, args: tuple, **options) -> None:
    # The arguments are ids and flags: their plain repr is what Celery's saferepr would give for the task
    # message's argsrepr/kwargsrepr, at a fifth of its cost (a sixth of a publish's CPU, measured).
    celery_app().send_task(name, args=args, argsrepr=repr(args), kwargsrepr="{}", **SEND_OPTIONS, **options)


def _send(name: str, *args, countdown: float | None = None) -> None:
    if not settings.CELERY_BROKER_URL:
        if not settings.CELERY_TASK_ALWAYS_EAGER or countdown:
            # Eager mode would run a delayed retry at once, in a loop: the sweeper takes it when due.
            return
        task = registered_task(name)
        transaction.on_commit(lambda: task.apply_async(args=args, argsrepr=repr(args), kwargsrepr="{}"))
        return

    def send() -> None:
        try:
            publish(name, args, countdown=countdown)
        except Exception:  # noqa: BLE001 - the broker is down: the row is committed, the sweeper sends it later
            log.exception("could not enqueue %s%r; the sweeper will pick it up", name.rpartition(".")[2], args)

    # The row is committed by now: a broker that is down must not turn into an error reply to the client
    # (which would send the message again), only into a later pick-up by the sweeper.
    transaction.on_commit(send)


def scan(message_id: int, *, countdown: float | None = None) -> None:
    _send(SCAN, message_id, countdown=countdown)


def scans(message_ids: list[int]) -> None:
    """The scans of messages already committed (the SMTP server's group commit): with a broker, one round
    trip for all of them (kombu's publish batch: one Redis pipeline)."""
    if not settings.CELERY_BROKER_URL or len(message_ids) < 2:
        for message_id in message_ids:
            scan(message_id)  # outside a transaction: sent at once
        return
    app = celery_app()
    try:
        with app.producer_or_acquire() as producer, producer.batch():
            for message_id in message_ids:
                publish(SCAN, (message_id,), producer=producer)
    except Exception:  # noqa: BLE001 - the broker is down: the rows are committed, the sweeper sends them later
        log.exception("could not enqueue the scans of %d messages; the sweeper will pick them up", len(message_ids))


def delivery(message_id: int, *, countdown: float | None = None) -> None:
    _send(DELIVER, message_id, countdown=countdown)


def learn(message_id: int, as_spam: bool) -> None:
    _send(LEARN, message_id, as_spam)


def tasks_are_sent() -> bool:
    return bool(settings.CELERY_BROKER_URL or settings.CELERY_TASK_ALWAYS_EAGER)
