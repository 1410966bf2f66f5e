"""A process's short memory of answers that are also kept in the database (the call-ahead's, the directory's):
each for at most a given time, thread-safe, and bounded, so that a flood of distinct addresses cannot grow it
without end (past `limit` entries it starts over)."""

from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class ExpiringMemory(Generic[T]):
    def __init__(self, *, most_seconds: float, limit: int = 50_000):
        self.most_seconds = most_seconds
        self.limit = limit
        self._items: dict[str, tuple[float, T]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> T | None:
        with self._lock:
            hit = self._items.get(key)
        if hit is None or hit[0] <= time.monotonic():
            return None
        return hit[1]

    def put(self, key: str, value: T, seconds: float) -> None:
        with self._lock:
            if len(self._items) > self.limit:
                self._items.clear()
            self._items[key] = (time.monotonic() + min(seconds, self.most_seconds), value)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
