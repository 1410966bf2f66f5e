import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import close_old_connections

from gateway import tasks

log = logging.getLogger(__name__)


def _in_thread(func, *args):
    try:
        return func(*args)
    except Exception:
        log.exception("%s%r failed", func.__name__, args)
    finally:
        close_old_connections()


class Command(BaseCommand):
    help = ("The embedded worker for a single machine without a broker: takes the due scans and deliveries "
            "from the database and runs them here. With CELERY_BROKER_URL set, run Celery instead.")

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
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
        signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
        last_housekeeping = last_hourly = 0.0
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="worker") as pool:
            while not stopping:
                try:
                    scans, deliveries = tasks.due_work(received_grace=0)
                    list(pool.map(lambda i: _in_thread(tasks.run_scan, i), scans))
                    # Deliveries due now include those the scans just made due.
                    _, deliveries = tasks.due_work(received_grace=0)
                    list(pool.map(lambda i: _in_thread(tasks.run_delivery, i), deliveries))
                    if time.monotonic() - last_housekeeping > 60 or once:
                        last_housekeeping = time.monotonic()
                        tasks.purge_expired()
                        self._rollup()
                    if time.monotonic() - last_hourly > 3600:
                        last_hourly = time.monotonic()
                        tasks.housekeeping()
                except Exception:
                    log.exception("worker pass failed; trying again")
                finally:
                    close_old_connections()
                if once:
                    break
                time.sleep(interval)

    @staticmethod
    def _rollup() -> None:
        try:
            from reports.tasks import rollup
        except ImportError:
            return
        rollup()
