"""What the appliance's parts say about themselves: the checks behind /healthz and the /status/ page.

Each check asks the real part (clamd, spamd, the broker, PostgreSQL, the disk, the heartbeats of the SMTP
servers and workers) with a short timeout and says green, amber or red with the reason in words. /healthz
reads only whether each part answers, and says which did not, never a path, an address or a count.
"""

from __future__ import annotations

import shutil
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.db.models import Count, Min
from django.utils import timezone

from gateway.models import Message, NodeHeartbeat, RawMessage, Recipient
from gateway.scan import ScannerUnavailable, clamav, spamassassin

GREEN, AMBER, RED = "green", "amber", "red"
PROBE_TIMEOUT = 3.0
# The Celery queue the mail path's tasks go to (Celery's default).
BROKER_QUEUES = ("celery",)


@dataclass
class Component:
    name: str
    level: str
    reason: str
    details: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.level != RED


def _why(exc: BaseException) -> str:
    """An error in words, without the address it was about (a scanner's ScannerUnavailable by its cause)."""
    if isinstance(exc, ScannerUnavailable):
        if exc.__cause__ is None:
            return "its address is not unix:// or tcp://"
        exc = exc.__cause__
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer within {PROBE_TIMEOUT:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, FileNotFoundError):
        return "its socket does not exist"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.__class__.__name__


def clamd() -> Component:
    if not settings.CLAMD_URL:
        return Component("clamd", AMBER, "not configured (CLAMD_URL): mail is not scanned for viruses")
    try:
        answer = clamav.version(timeout=PROBE_TIMEOUT)
    except ScannerUnavailable as exc:
        return Component("clamd", RED, f"not reachable: {_why(exc)}; scans wait")
    if not answer.startswith("ClamAV"):
        return Component("clamd", RED, f"answered something else than its version: {answer[:60]!r}")
    version, _, rest = answer.partition("/")
    signatures, _, dated = rest.partition("/")
    if not rest:
        # Only local signature files (no daily/main database): clamd then names no version or date of them.
        return Component("clamd", GREEN, "reachable", [("version", version), ("signatures", "local files only")])
    details = [("version", version), ("signatures", signatures or "?"), ("signature date", dated or "?")]
    try:
        age = timezone.now() - timezone.make_aware(time_of(dated), timezone.get_fixed_timezone(0))
    except ValueError:
        return Component("clamd", GREEN, "reachable", details)
    if age > timedelta(days=7):
        return Component("clamd", AMBER, f"reachable, but its signatures are {age.days} days old", details)
    return Component("clamd", GREEN, "reachable, signatures current", details)


def time_of(text: str):
    from datetime import datetime

    return datetime.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y")


def spamd() -> Component:
    if not settings.SPAMD_URL:
        return Component("spamd", AMBER, "not configured (SPAMD_URL): mail gets no spam score")
    try:
        answer = spamassassin.ping_reply(timeout=PROBE_TIMEOUT)
    except ScannerUnavailable as exc:
        return Component("spamd", RED, f"not reachable: {_why(exc)}; scans wait")
    if not answer.startswith("SPAMD/") or "PONG" not in answer:
        return Component("spamd", RED, f"did not answer PING: {answer[:60]!r}")
    return Component("spamd", GREEN, "reachable", [("protocol", answer.split()[0])])


def broker() -> Component:
    url = settings.CELERY_BROKER_URL
    if not url:
        return Component("broker", GREEN, "none configured: the embedded worker takes work from the database")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return Component("broker", AMBER, "not a Redis broker: its queue lengths are not read here")
    import redis

    client = redis.Redis.from_url(url, socket_timeout=PROBE_TIMEOUT, socket_connect_timeout=PROBE_TIMEOUT)
    try:
        client.ping()
        lengths = [(f"queue {name}", str(client.llen(name))) for name in BROKER_QUEUES]
    except redis.RedisError as exc:
        return Component("broker", RED, f"not reachable: {exc.__class__.__name__}; work waits in the database")
    finally:
        client.close()
    return Component("broker", GREEN, "reachable", lengths)


def _size(value: int | None) -> str:
    if value is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "?"


def database() -> Component:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
            if connection.vendor != "postgresql":
                return Component("database", GREEN, f"reachable ({connection.vendor})")
            sizes = []
            for label, models in (("mail log", (Message, Recipient)), ("stored originals", (RawMessage,))):
                total = 0
                for model in models:
                    cursor.execute("SELECT pg_total_relation_size(%s::regclass)", [model._meta.db_table])
                    total += cursor.fetchone()[0] or 0
                sizes.append((label, _size(total)))
            cursor.execute("SELECT pg_database_size(current_database())")
            sizes.append(("whole database", _size(cursor.fetchone()[0])))
    except Exception as exc:  # noqa: BLE001 - whatever the driver raises, the database is not usable
        return Component("database", RED, f"not reachable: {exc.__class__.__name__}")
    return Component("database", GREEN, "reachable (PostgreSQL)", sizes)


def disk() -> Component:
    try:
        usage = shutil.disk_usage(settings.DATA_DIR)
    except OSError as exc:
        return Component("disk", RED, f"the data directory cannot be read: {_why(exc)}")
    free = usage.free / usage.total if usage.total else 0
    details = [("free", f"{_size(usage.free)} of {_size(usage.total)} ({free:.0%})")]
    if free < 0.05:
        return Component("disk", RED, f"only {free:.0%} free where the data directory is", details)
    if free < 0.15:
        return Component("disk", AMBER, f"{free:.0%} free where the data directory is", details)
    return Component("disk", GREEN, f"{free:.0%} free", details)


def backlog() -> Component:
    """What waits for a scan and for a delivery, and for how long the oldest has waited."""
    now = timezone.now()
    scans = Message.objects.filter(state__in=(Message.State.RECEIVED, Message.State.SCANNING,
                                              Message.State.SCAN_DEFERRED)).aggregate(n=Count("id"),
                                                                                      oldest=Min("received_at"))
    deliveries = Recipient.objects.filter(status__in=(Recipient.Status.PENDING, Recipient.Status.DEFERRED,
                                                      Recipient.Status.DELIVERING)).exclude(
        message__state__in=(Message.State.RECEIVED, Message.State.SCANNING, Message.State.SCAN_DEFERRED)).aggregate(
        n=Count("id"), oldest=Min("message__received_at"))
    details = [("waiting for a scan", str(scans["n"])), ("waiting for delivery", str(deliveries["n"]))]
    ages = [now - row["oldest"] for row in (scans, deliveries) if row["oldest"]]
    oldest = max(ages) if ages else None
    if oldest is not None:
        details.append(("oldest", _duration(oldest)))
    if scans["oldest"] and now - scans["oldest"] > timedelta(minutes=30):
        return Component("backlog", RED, f"a message has waited {_duration(now - scans['oldest'])} for its scan",
                         details)
    if oldest is not None and oldest > timedelta(hours=1):
        return Component("backlog", AMBER, f"mail has waited {_duration(oldest)} in the queue", details)
    return Component("backlog", GREEN, "nothing waits long", details)


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


@dataclass
class Node:
    name: str
    level: str
    reason: str
    processes: list[NodeHeartbeat]


def nodes() -> list[Node]:
    """Each node with its SMTP servers and workers, as their heartbeats say: red when none has beaten for
    three heartbeats."""
    now = timezone.now()
    late = timedelta(seconds=3 * settings.HEARTBEAT_SECONDS)
    grouped: dict[str, list[NodeHeartbeat]] = {}
    for beat in NodeHeartbeat.objects.all():
        grouped.setdefault(beat.node, []).append(beat)
    found = []
    for name, beats in sorted(grouped.items()):
        for beat in beats:
            beat.late = now - beat.seen_at > late
            beat.uptime = _duration(now - beat.started_at)
            beat.seen = _duration(now - beat.seen_at)
        alive = [b for b in beats if not b.late]
        kinds = {b.kind for b in alive}
        if not alive:
            found.append(Node(name, RED, f"no heartbeat for {min(b.seen for b in beats)}", beats))
        elif any(b.late for b in beats):
            found.append(Node(name, AMBER, "a process stopped beating", beats))
        else:
            found.append(Node(name, GREEN, "running: " + ", ".join(sorted(kinds)), beats))
    return found


def last_errors(limit: int = 10) -> list[dict]:
    """The newest scan errors and delivery failures still in the queue, for the status page."""
    scans = Message.objects.filter(state=Message.State.SCAN_DEFERRED).exclude(last_error="").order_by(
        "-received_at").values("queue_id", "received_at", "last_error")[:limit]
    deliveries = Recipient.objects.filter(status=Recipient.Status.DEFERRED).exclude(reply_text="").order_by(
        "-id").values("message__queue_id", "message__received_at", "reply_text")[:limit]
    errors = [{"queue_id": s["queue_id"], "at": s["received_at"], "what": "scan", "text": s["last_error"]}
              for s in scans]
    errors += [{"queue_id": d["message__queue_id"], "at": d["message__received_at"], "what": "delivery",
                "text": d["reply_text"]} for d in deliveries]
    return sorted(errors, key=lambda e: e["at"], reverse=True)[:limit]


def components() -> list[Component]:
    return [database(), broker(), clamd(), spamd(), disk(), backlog()]


def health() -> tuple[bool, dict[str, str]]:
    """What /healthz says: whether this process reaches what it needs (the database; the broker, clamd and
    spamd when configured), and for each what failed, in words."""
    checks: dict[str, str] = {}
    started = time.monotonic()
    database_ = database()
    checks["database"] = "ok" if database_.ok else database_.reason
    if settings.CELERY_BROKER_URL:
        part = broker()
        checks["broker"] = "ok" if part.ok else part.reason
    for name, probe, configured in (("clamd", clamd, settings.CLAMD_URL), ("spamd", spamd, settings.SPAMD_URL)):
        if configured:
            part = probe()
            checks[name] = "ok" if part.ok else part.reason
    checks_ok = all(value == "ok" for value in checks.values())
    checks["seconds"] = f"{time.monotonic() - started:.3f}"
    return checks_ok, checks
