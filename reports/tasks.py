"""Celery tasks of the reports: the roll-up, run by beat every minute."""

from __future__ import annotations

from celery import shared_task

from .rollup import refresh


@shared_task(ignore_result=True)
def rollup() -> int:
    """Recompute the roll-up rows of the days whose messages changed; cheap when nothing did."""
    return refresh()
