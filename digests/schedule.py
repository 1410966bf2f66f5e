"""When a digest is due: the latest slot of its frequency (at the hour, in TIME_ZONE) that has passed, against
the last time its receiver's digest was due."""

from __future__ import annotations

from datetime import datetime, time, timedelta

from django.utils import timezone

from .models import Frequency


def latest_slot(now: datetime, frequency: str, hour: int, weekday: int) -> datetime | None:
    """The newest moment at or before `now` when a digest of this frequency goes out; None when it is off."""
    if frequency not in (Frequency.DAILY, Frequency.TWICE_DAILY, Frequency.WEEKLY):
        return None
    local = timezone.localtime(now)
    hours = sorted({hour, (hour + 12) % 24}) if frequency == Frequency.TWICE_DAILY else [hour]
    for days_back in range(8):
        day = local.date() - timedelta(days=days_back)
        if frequency == Frequency.WEEKLY and day.weekday() != weekday:
            continue
        slots = [timezone.make_aware(datetime.combine(day, time(h))) for h in hours]
        passed = [slot for slot in slots if slot <= local]
        if passed:
            return max(passed)
    return None


def is_due(last_run_at: datetime | None, now: datetime, frequency: str, hour: int, weekday: int) -> bool:
    slot = latest_slot(now, frequency, hour, weekday)
    if slot is None:
        return False
    return last_run_at is None or last_run_at < slot
