import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from celery.schedules import maybe_schedule
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import close_old_connections

from gateway import sweep
from gateway.delivery.attempt import run_delivery
from gateway.dispatch.enqueue import celery_app
from gateway.heartbeat import Heartbeat
from gateway.scan.run import run_scan

log = logging.getLogger(__name__)

# The beat entry this command's own loop stands for: it takes the due work from the database every pass.
SWEEP_TASK = "gateway.tasks.sweep"
# How often the loop purges what retention has let go (the sweep does it every minute).
PURGE_SECONDS = 60.0


def _in_thread(func, *args):
    try:
        return func(*args)
    except Exception:
        log.exception("%s%r failed", func.__name__, args)
    finally:
        close_old_connections()


class Periodic:
    """The beat schedule's other tasks (the roll-up of the reports, the hourly housekeeping), run here by
    their names when due, as beat would have them run: this command is its own beat."""

    def __init__(self, schedule: dict):
        app = celery_app()
        app.loader.import_default_modules()  # every installed app's tasks module, as a worker loads them
        self.entries = [(entry["task"], maybe_schedule(entry["schedule"], app=app))
                        for entry in schedule.values() if entry["task"] != SWEEP_TASK]
        self.tasks = {name: app.tasks[name] for name, _ in self.entries}
        self.last_run: dict[str, datetime] = {}
        self.app = app

    def run_due(self, *, every: bool = False) -> None:
        now = self.app.now()
        for name, schedule in self.entries:
            last = self.last_run.get(name)
            if not every and last is not None and not schedule.is_due(last).is_due:
                continue
            self.last_run[name] = now
            try:
                self.tasks[name]()
            except Exception:
                log.exception("%s failed", name)


class Command(BaseCommand):
    help = ("The embedded worker for a single machine without a broker: takes the due scans and deliveries "
            "from the database and runs them here, with the beat schedule's periodic tasks. With "
            "CELERY_BROKER_URL set, run Celery instead.")

    def add_arguments(self, parser):
        parser.add_argument("--interval", type=float, default=1.0, help="seconds between looks (default 1)")
        parser.add_argument("--threads", type=int, default=4)
        parser.add_argument("--once", action="store_true", help="one pass, then exit (for scripts and tests)")

    def handle(self, *args, interval: float, threads: int, once: bool, **options):
        if settings.CELERY_BROKER_URL:
            self.stderr.write("CELERY_BROKER_URL is set: run `celery -A appliance worker -B` instead")
        from appliance.celery import worker_commits_asynchronously
        from appliance.scheduling import schedule_mail_path

        schedule_mail_path("runworker")  # before the pool's threads exist: they inherit it
        worker_commits_asynchronously()
        periodic = Periodic(settings.CELERY_BEAT_SCHEDULE)
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
        signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
        last_purge = None
        heartbeat = Heartbeat("worker").start()
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="worker") as pool:
            while not stopping:
                try:
                    scans, deliveries = sweep.due_work(received_grace=0)
                    list(pool.map(lambda i: _in_thread(run_scan, i), scans))
                    # Deliveries due now include those the scans just made due.
                    _, deliveries = sweep.due_work(received_grace=0)
                    list(pool.map(lambda i: _in_thread(run_delivery, i), deliveries))
                    if last_purge is None or time.monotonic() - last_purge > PURGE_SECONDS or once:
                        last_purge = time.monotonic()
                        sweep.purge_expired()
                    periodic.run_due(every=once)
                except Exception:
                    log.exception("worker pass failed; trying again")
                finally:
                    close_old_connections()
                if once:
                    break
                time.sleep(interval)
        heartbeat.stop()
