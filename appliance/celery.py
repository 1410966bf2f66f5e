import os
import time

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

app = Celery("appliance")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Threads, not forked processes, unless `--pool` or CELERY_WORKER_POOL says otherwise: a task spends
# its time waiting on clamd, spamd, PostgreSQL and the next hop, and the prefork pool's hand-over of
# every task from the parent to a child (pipes, pickling, a second process woken) cost ~0.7 ms of CPU
# per message in bench/pipeline, a sixth of the worker's share. Each thread has its own database
# connection and clamd client.
app.conf.worker_pool = os.getenv("CELERY_WORKER_POOL", "threads")
app.autodiscover_tasks()


# A connection whose last statement was less than this many seconds ago is taken as it is, without
# Django's health check (a `SELECT 1` round trip, ~0.3 ms of the worker's CPU and a wake-up of its PostgreSQL
# backend per task). The check is for a connection that sat idle while its server restarted or dropped it;
# on a busy worker, a server that goes away fails the tasks in flight whatever is checked, and those tasks'
# rows are taken up again (a failed scan is sent again by the sweeper, a delivery is retried).
HEALTH_CHECK_AFTER_IDLE = 1.0


def _note_statement(execute, sql, params, many, context):
    """Django execute wrapper: when the connection last ran a statement."""
    try:
        return execute(sql, params, many, context)
    finally:
        context["connection"].mailgate_statement_at = time.monotonic()


@signals.task_prerun.connect
@signals.task_postrun.connect
def _database_connections(signal=None, **kwargs) -> None:
    # Connections are reused across tasks (CELERY_DB_REUSE_MAX); this drops the old and the broken ones.
    from django.db import close_old_connections, connections

    close_old_connections()
    if signal is not signals.task_prerun:
        return
    now = time.monotonic()
    for connection in connections.all():
        if _note_statement not in connection.execute_wrappers:
            connection.execute_wrappers.append(_note_statement)
        last = getattr(connection, "mailgate_statement_at", None)
        if connection.connection is not None and last is not None and now - last < HEALTH_CHECK_AFTER_IDLE:
            connection.health_check_done = True


_heartbeat = []


@signals.worker_ready.connect
def _start_heartbeat(**kwargs) -> None:
    # The worker's row on the status page and its counters for /metrics (gateway/heartbeat.py).
    from gateway.heartbeat import Heartbeat

    _heartbeat.append(Heartbeat("worker").start())


@signals.worker_shutdown.connect
def _stop_heartbeat(**kwargs) -> None:
    while _heartbeat:
        _heartbeat.pop().stop()


ASYNCHRONOUS_COMMIT = "mailgate-asynchronous-commit"


def _asynchronous_commit(sender, connection, **kwargs) -> None:
    if connection.vendor == "postgresql":
        with connection.connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO off")


def worker_commits_asynchronously() -> None:
    """The worker's commits return before PostgreSQL has flushed them to disk (unless
    WORKER_SYNCHRONOUS_COMMIT): a flush per commit is ~0.15 ms of the database's CPU and ~0.3 ms of
    waiting, three times per message. What they record is the progress of mail already stored: the SMTP
    server's own commits (the message, then `250`) stay synchronous. A database server that crashes loses
    at most its last ~0.6 s of the worker's progress, which is then done again (a scan, or a delivery
    sent twice), never a message (docs/decisions.md)."""
    from django.conf import settings
    from django.db import connections
    from django.db.backends.signals import connection_created

    if settings.WORKER_SYNCHRONOUS_COMMIT:
        return
    connection_created.connect(_asynchronous_commit, dispatch_uid=ASYNCHRONOUS_COMMIT)
    for connection in connections.all(initialized_only=True):  # those opened before (start-up checks)
        if connection.connection is not None:
            _asynchronous_commit(None, connection)


@signals.worker_init.connect
def _worker_init(**kwargs) -> None:
    from appliance.scheduling import schedule_mail_path
    from gateway.checks import warn_about_scan_limits

    # In the main thread, before the pool's threads (or processes) exist: they inherit it.
    schedule_mail_path("celery worker")
    warn_about_scan_limits()  # Django's system checks do not run in a Celery worker
    worker_commits_asynchronously()

