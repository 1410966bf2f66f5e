"""Bulk actions on quarantined mail, worked in chunks so that progress can be shown while a long one runs.

A job is advanced one chunk at a time by `advance_bulk_job`: by the Celery task (quarantine.tasks) when a
broker is configured, otherwise by the progress poll of the page that started it (no thread to lose, nothing to set
up for `make run`). Either way the chunk holds the job's row lock, so two advancers never work one chunk
twice, and each message goes through the same action as a single click: its claim, its audit row.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from gateway.dispatch import enqueue
from gateway.models import Message, record_audit

from . import actions
from .models import BulkJob
from .selection import filtered_quarantine, quarantine_of

log = logging.getLogger(__name__)

RUN_TASK = "quarantine.tasks.run_bulk_job"  # sent by name: the task module imports this one
CHUNK_SIZE = 50
# A job that has not moved for this long lost its worker: the page's poll takes it over.
STALL_SECONDS = 30
MAX_ERRORS_KEPT = 20


def broker_configured() -> bool:
    return bool(settings.CELERY_BROKER_URL) and not settings.CELERY_TASK_ALWAYS_EAGER


def job_messages(job: BulkJob) -> QuerySet[Message]:
    """The messages the job still has to visit, re-scoped to its owner on every chunk."""
    if job.selection is not None:
        qs = quarantine_of(job.created_by).filter(pk__in=job.selection)
    else:
        qs = filtered_quarantine(job.created_by, job.filters)
    qs = qs.filter(pk__gt=job.cursor)
    if job.upto is not None:
        qs = qs.filter(pk__lte=job.upto)
    return qs.order_by("pk")


def start_bulk_job(*, user, ip: str | None, action: str, selection: list[int] | None,
                   filters: dict) -> BulkJob:
    """Record the job (and its audit row), then work its first chunk at once: a small job is done by
    the time the page reloads, a large one shows its progress."""
    with transaction.atomic():
        job = BulkJob(created_by=user, ip=ip, action=action, selection=selection, filters=filters)
        # The last id that matches now: mail quarantined after the click is not part of "all that match".
        qs = job_messages(job)
        job.total = qs.count()
        job.upto = qs.order_by("-pk").values_list("pk", flat=True).first() or 0
        job.save()
        record_audit(f"bulk_{action}", user=user, ip=ip, target=f"{job.total} messages",
                     job=job.pk, filters=filters if selection is None else None,
                     selected=len(selection) if selection is not None else None)
    advance_bulk_job(job.pk)
    job.refresh_from_db()
    if not job.finished and broker_configured():
        transaction.on_commit(lambda: enqueue.publish(RUN_TASK, (job.pk,)))
    return job


def _perform(job: BulkJob, message: Message) -> bool:
    """Apply the job's action to one message: True if done, False if it was no longer quarantined. The action
    itself keeps to the held recipients the job's owner acts for, and refuses a message they only see as its
    sender (PermissionDenied: counted as failed, with its reason)."""
    user = job.created_by
    if job.action == BulkJob.Action.RELEASE:
        return actions.release_message(message, by=user, ip=job.ip)
    if job.action == BulkJob.Action.DELETE:
        return actions.delete_message(message, by=user, ip=job.ip)
    actions.learn_message(message, as_spam=job.action == BulkJob.Action.LEARN_SPAM, by=user, ip=job.ip)
    return True


def advance_bulk_job(job_id: int, *, chunk: int = CHUNK_SIZE) -> BulkJob | None:
    """Work one chunk of a job. Returns the job, or None when another advancer holds it or it is finished."""
    with transaction.atomic():
        job = (BulkJob.objects.select_for_update(skip_locked=True).select_related("created_by")
               .filter(pk=job_id, state=BulkJob.State.RUNNING).first())
        if job is None:
            return None
        batch = list(job_messages(job)[:chunk])
        for message in batch:
            try:
                # A savepoint per message: one failure leaves the rest of the chunk standing.
                with transaction.atomic():
                    ok = _perform(job, message)
                if ok:
                    job.succeeded += 1
                else:
                    job.skipped += 1
            except (PermissionDenied, ValidationError) as exc:
                job.failed += 1
                reason = exc.messages[0] if isinstance(exc, ValidationError) else str(exc)
                if len(job.errors) < MAX_ERRORS_KEPT:
                    job.errors.append(f"{message.queue_id}: {reason}")
            except Exception:  # one bad message must not stall the whole job
                log.exception("bulk job %s: %s on %s failed", job.pk, job.action, message.queue_id)
                job.failed += 1
                if len(job.errors) < MAX_ERRORS_KEPT:
                    job.errors.append(f"{message.queue_id}: internal error")
            job.cursor = message.pk
            job.done += 1
        job.updated_at = timezone.now()
        if len(batch) < chunk:
            # Nothing left that matches: what was counted but is gone (released meanwhile, or out of
            # the owner's scope now) is skipped, so that done reaches total.
            if job.done < job.total:
                job.skipped += job.total - job.done
                job.done = job.total
            job.total = max(job.total, job.done)
            job.state = BulkJob.State.DONE
            job.finished_at = job.updated_at
        job.save()
        return job


def advance_if_due(job: BulkJob) -> None:
    """Called by the progress poll: work a chunk when no Celery worker does, or when the worker was lost."""
    if job.finished:
        return
    stalled = job.updated_at < timezone.now() - timedelta(seconds=STALL_SECONDS)
    if not broker_configured() or stalled:
        advance_bulk_job(job.pk)


def work_to_end(job_id: int) -> None:
    """Work a job to its end. A missing or finished job returns quietly (a duplicate delivery of the task)."""
    while True:
        job = advance_bulk_job(job_id)
        if job is None or job.finished:
            return


def expire_stale_jobs(days: int = 7) -> int:
    """Finished jobs are only a progress record; drop old ones (their audit rows stay)."""
    cutoff = timezone.now() - timedelta(days=days)
    deleted, _ = BulkJob.objects.filter(finished_at__lt=cutoff).delete()
    return deleted

