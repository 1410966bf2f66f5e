"""System checks of the scan's limits, run as the appliance's commands start (runsmtp, runworker, runappliance,
`manage.py check`), and the same warning in the log as a Celery worker starts (appliance/celery.py).

The largest message the SMTP server accepts (MailFlowSettings.max_message_size) must fit in one clamd stream
(CLAMD_STREAM_MAX_LENGTH, which must match clamd's StreamMaxLength): a larger one is accepted, then held as
unscannable, never delivered unscanned. Better to know before the first one arrives.

Nothing of the scanners is imported here: the SMTP process runs these checks too (tests/smtp/
test_process_imports.py).
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.core import checks
from django.db import DatabaseError, connections

log = logging.getLogger(__name__)

SCAN_LIMITS = ("SCAN_MAX_PARTS", "SCAN_MAX_DEPTH", "SCAN_MAX_ARCHIVE_MEMBERS", "SCAN_MAX_ARCHIVE_DEPTH",
               "SCAN_MAX_DECOMPRESSED_BYTES", "SCAN_MAX_COMPRESSION_RATIO", "CLAMD_STREAM_MAX_LENGTH")


def max_message_size() -> int | None:
    """The SMTP size limit as configured, or its default before the row exists; None when the database
    cannot tell (not migrated yet, not reachable)."""
    from gateway.models import MailFlowSettings

    try:
        stored = MailFlowSettings.objects.filter(pk=1).values_list("max_message_size", flat=True).first()
    except DatabaseError:
        return None
    return stored if stored is not None else MailFlowSettings._meta.get_field("max_message_size").default


def clamd_stream_problem() -> str:
    """Why some accepted messages would be too large for clamd, or ''."""
    if not settings.CLAMD_URL:
        return ""
    size = max_message_size()
    limit = settings.CLAMD_STREAM_MAX_LENGTH
    if size is None or size <= limit:
        return ""
    return (f"the SMTP server accepts messages up to {size} bytes (mail-flow settings, maximum message size) but "
            f"clamd takes {limit} (CLAMD_STREAM_MAX_LENGTH): larger messages will be held as unscannable. Raise "
            "clamd's StreamMaxLength and CLAMD_STREAM_MAX_LENGTH, or lower the maximum message size.")


@checks.register("mailgate")
def scan_limits(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    found: list[checks.CheckMessage] = []
    for name in SCAN_LIMITS:
        value = getattr(settings, name)
        if not isinstance(value, int) or value < 1:
            found.append(checks.Error(f"{name} is {value!r}: it must be a whole number of at least 1",
                                      hint="docs/configuration.md, Scanners", id="mailgate.E001"))
    problem = clamd_stream_problem()
    if problem:
        found.append(checks.Warning(problem, hint="docs/security-scanning.md", id="mailgate.W001"))
    return found


def warn_about_scan_limits() -> None:
    """Log what the check says, for a process that does not run Django's checks (the Celery worker). The
    connection it opened is closed again: a worker's pool must not inherit it (prefork)."""
    try:
        problem = clamd_stream_problem()
    finally:
        connections.close_all()
    if problem:
        log.warning("scan limits: %s", problem)
