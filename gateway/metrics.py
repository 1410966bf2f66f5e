"""The counters of the mail path, kept in memory by each process and added to the database every
HEARTBEAT_SECONDS, from where the web process serves them at /metrics (docs/decisions.md, "Metrics go
through the database").

Counting is a dictionary update under a lock: nothing on the path of a message waits for a network or a
database because of it. What a process counted and had not yet flushed when it died is lost (at most
HEARTBEAT_SECONDS of counts); what it flushed stays, across restarts, as a Prometheus counter should.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F

from gateway.models import MetricTotal

log = logging.getLogger(__name__)

# Seconds: what an administrator looks at, from a fast scan to a message that waited for an hour.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)

_lock = threading.Lock()
_pending: dict[tuple[str, str], float] = defaultdict(float)


def label_text(labels: dict[str, str]) -> str:
    """The labels as stored: name=value pairs, sorted, tab-separated (values have no tabs: they are ours)."""
    return "\t".join(f"{name}={str(value).replace(chr(9), ' ')}" for name, value in sorted(labels.items()))


def parse_labels(text: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in text.split("\t")) if text else {}


def count(name: str, amount: float = 1, **labels: str) -> None:
    """Add to a counter (its name without the _total suffix, as prometheus_client names counters)."""
    key = (name, label_text(labels))
    with _lock:
        _pending[key] += amount


def observe(name: str, seconds: float, **labels: str) -> None:
    """One observation of a histogram: its buckets, its sum and its count."""
    text = label_text(labels)
    with _lock:
        for bound in LATENCY_BUCKETS:
            if seconds <= bound:
                _pending[(f"{name}_bucket", label_text({**labels, "le": repr(bound)}))] += 1
        _pending[(f"{name}_bucket", label_text({**labels, "le": "+Inf"}))] += 1
        _pending[(f"{name}_sum", text)] += seconds
        _pending[(f"{name}_count", text)] += 1


def take() -> dict[tuple[str, str], float]:
    """What was counted since the last flush, and forget it (here)."""
    with _lock:
        taken = dict(_pending)
        _pending.clear()
    return taken


def give_back(counts: dict[tuple[str, str], float]) -> None:
    with _lock:
        for key, value in counts.items():
            _pending[key] += value


def flush(node: str | None = None) -> int:
    """Add what this process counted to its node's totals in the database; on failure keep it for the next
    flush. Returns the number of series written."""
    counts = take()
    if not counts:
        return 0
    node = node or settings.NODE_NAME
    try:
        with transaction.atomic():
            for (name, labels), value in sorted(counts.items()):
                _add(node, name, labels, value)
    except Exception:
        give_back(counts)
        raise
    return len(counts)


def _add(node: str, name: str, labels: str, value: float) -> None:
    if MetricTotal.objects.filter(node=node, name=name, labels=labels).update(value=F("value") + value):
        return
    try:
        with transaction.atomic():
            MetricTotal.objects.create(node=node, name=name, labels=labels, value=value)
    except IntegrityError:
        # Another process of this node created the row meanwhile.
        MetricTotal.objects.filter(node=node, name=name, labels=labels).update(value=F("value") + value)
