"""The heartbeat of a process of the mail path (an SMTP server, a worker): every HEARTBEAT_SECONDS it writes
its row of NodeHeartbeat (when it started, when it was last seen, its open SMTP connections) and adds its
counters to the database (gateway.metrics). The status page and /metrics read them."""

from __future__ import annotations

import logging
import os
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db import close_old_connections, connections
from django.utils import timezone

from gateway import metrics
from gateway.models import NodeHeartbeat

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        with open(Path(settings.BASE_DIR) / "pyproject.toml", "rb") as file:
            return str(tomllib.load(file)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


VERSION = _version()


class Heartbeat:
    """The heartbeat of this process; `start()` runs it in a daemon thread, `stop()` ends it and removes the row
    (a process that stops cleanly is not shown as missing)."""

    def __init__(self, kind: str, *, connections: Callable[[], int] | None = None,
                 interval: float | None = None):
        self.kind = kind
        self.connections = connections
        self.interval = settings.HEARTBEAT_SECONDS if interval is None else interval
        self.started_at = timezone.now()
        self.pid = os.getpid()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def beat(self) -> None:
        """Write this process's row, then its counters."""
        connections = self.connections() if self.connections is not None else None
        NodeHeartbeat.objects.update_or_create(
            node=settings.NODE_NAME, kind=self.kind, pid=self.pid,
            defaults={"version": VERSION, "started_at": self.started_at, "seen_at": timezone.now(),
                      "smtp_connections": connections})
        metrics.flush()

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    close_old_connections()
                    self.beat()
                except Exception as exc:  # noqa: BLE001 - the database away: the next beat tries again
                    log.warning("heartbeat of %s %s failed: %s", self.kind, self.pid, exc)
                self.stopping.wait(self.interval)
            self.last()
        finally:
            connections.close_all()  # this thread's own connection: not left open when the thread ends

    def last(self) -> None:
        """What is still counted goes to the database, and the row goes: a clean stop is not a missing node."""
        try:
            metrics.flush()
            NodeHeartbeat.objects.filter(node=settings.NODE_NAME, kind=self.kind, pid=self.pid).delete()
        except Exception as exc:  # noqa: BLE001
            log.warning("last heartbeat of %s %s failed: %s", self.kind, self.pid, exc)

    def start(self) -> Heartbeat:
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-{self.kind}", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(10)
