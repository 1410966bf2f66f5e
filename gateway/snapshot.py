"""Per-process snapshots of configuration read on the path of every message (the mail-flow settings,
whether any allow/block entry exists, the routes): read at most every CONFIG_CACHE_SECONDS, and at once
again in the process that saved a change."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from django.conf import settings
from django.db.models.signals import post_delete, post_save

T = TypeVar("T")


class Snapshot(Generic[T]):
    every: list[Snapshot] = []  # all of them, for the tests to start each from an empty one

    def __init__(self, load: Callable[[], T]):
        self.load = load
        self._held: tuple[T, float] | None = None  # one attribute, swapped whole: threads read it unlocked
        Snapshot.every.append(self)

    def get(self) -> T:
        held = self._held
        if held is None or time.monotonic() - held[1] >= settings.CONFIG_CACHE_SECONDS:
            held = self._held = (self.load(), time.monotonic())
        return held[0]

    def clear(self, **_signal) -> None:
        self._held = None

    def clear_on_change(self, *models) -> Snapshot[T]:
        """Read again after a row of these models is saved or deleted in this process."""
        for model in models:
            post_save.connect(self.clear, sender=model, weak=False)
            post_delete.connect(self.clear, sender=model, weak=False)
        return self
