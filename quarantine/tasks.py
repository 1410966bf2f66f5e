"""Celery tasks of the quarantine: a bulk job worked to its end by a worker (quarantine.bulk)."""

from __future__ import annotations

from celery import shared_task

from .bulk import work_to_end


@shared_task(ignore_result=True)
def run_bulk_job(job_id: int) -> None:
    """Work a job to its end. A missing or finished job returns quietly (a duplicate delivery of the task)."""
    work_to_end(job_id)
