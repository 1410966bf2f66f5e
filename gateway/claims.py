"""The timing rules every stage of the worker shares: how long a claim may be carried on, and how long to
wait before the next try.

A scan or a delivery claims its rows (a state change with a timestamp) before it works on them; the
sweeper hands a claim older than STALE_CLAIM_SECONDS to another worker, so work that reaches half of that
renews its claim (or writes what it has) first.
"""

from __future__ import annotations

from django.conf import settings
from django.utils import timezone


def far_from_stale(claimed_at, now=None) -> bool:
    """Whether a claim taken at `claimed_at` is young enough to carry on under it."""
    return ((now or timezone.now()) - claimed_at).total_seconds() < settings.STALE_CLAIM_SECONDS / 2


def backoff(attempt: int, base: int, cap: int) -> int:
    """Seconds before try number `attempt + 1`: base, doubling, at most cap."""
    return min(cap, base * 2 ** max(0, attempt - 1))
