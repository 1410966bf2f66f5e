"""Celery tasks of the digests: beat asks every DIGEST_CHECK_INTERVAL seconds which digests are due."""

from __future__ import annotations

from celery import shared_task

from .send import send_all


@shared_task(ignore_result=True)
def send_due_digests() -> int:
    sent, _ = send_all(due_only=True)
    return len(sent)
