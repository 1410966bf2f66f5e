"""Per-client-IP counters, in memory on this node: the hot path asks no database for them.

Each node counts its own connections; behind a load balancer spreading clients over N nodes the effective
limits are up to N times the configured ones (docs/smtp-policy.md).
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict


class SlidingCounter:
    """Events per window per key, by two fixed buckets (the current one and the previous one weighted by
    how much of it still lies in the window): O(1) memory per key, accurate to a few percent."""

    def __init__(self, window: float = 60.0, clock=time.monotonic):
        self.window = window
        self.clock = clock
        self._buckets: dict[str, tuple[int, int, int]] = {}  # key → (bucket index, current, previous)
        self._calls = 0

    def _rate(self, key: str, now: float, add: int) -> float:
        index = int(now // self.window)
        bucket, current, previous = self._buckets.get(key, (index, 0, 0))
        if bucket != index:
            previous = current if bucket == index - 1 else 0
            current = 0
        current += add
        self._buckets[key] = (index, current, previous)
        elapsed = (now % self.window) / self.window
        return current + previous * (1.0 - elapsed)

    def hit(self, key: str) -> float:
        """Count one event; the number in the last window, this one included."""
        self._calls += 1
        now = self.clock()
        if self._calls % 10_000 == 0:
            self._expire(now)
        return self._rate(key, now, 1)

    def count(self, key: str) -> float:
        return self._rate(key, self.clock(), 0) if key in self._buckets else 0.0

    def reset(self, key: str) -> None:
        self._buckets.pop(key, None)

    def _expire(self, now: float) -> None:
        index = int(now // self.window)
        for key in [k for k, (bucket, _, _) in self._buckets.items() if bucket < index - 1]:
            del self._buckets[key]


class ExpiringSet:
    """Keys remembered for `ttl` seconds, at most `size` of them (the oldest forgotten first)."""

    def __init__(self, ttl: float, size: int = 100_000, clock=time.monotonic):
        self.ttl, self.size, self.clock = ttl, size, clock
        self._data: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        expires = self._data.get(key)
        if expires is None:
            return False
        if expires < self.clock():
            del self._data[key]
            return False
        return True

    def add(self, key: str, ttl: float | None = None) -> None:
        self._data[key] = self.clock() + (self.ttl if ttl is None else ttl)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def discard(self, key: str) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()


class ClientLimits:
    """What the SMTP server counts per client IP on this node."""

    def __init__(self, clock=time.monotonic):
        self.connections: dict[str, int] = defaultdict(int)
        self.messages = SlidingCounter(60.0, clock)
        self.auth_failures = SlidingCounter(60.0, clock)
        self.greeted = ExpiringSet(24 * 3600, clock=clock)  # clients that waited for the greeting

    def connect(self, ip: str) -> int:
        self.connections[ip] += 1
        return self.connections[ip]

    def disconnect(self, ip: str) -> None:
        count = self.connections.get(ip, 0) - 1
        if count > 0:
            self.connections[ip] = count
        else:
            self.connections.pop(ip, None)

    def auth_failure_window(self, minutes: int) -> None:
        window = max(1, minutes) * 60.0
        if self.auth_failures.window != window:
            self.auth_failures = SlidingCounter(window, self.auth_failures.clock)
