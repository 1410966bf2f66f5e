import os
import secrets
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from gateway.scan import clamav, spamassassin


class Command(BaseCommand):
    help = "Run the whole appliance on this machine: the SMTP server, the web UI and the worker."

    def add_arguments(self, parser):
        parser.add_argument("--smtp", default=settings.SMTP_LISTEN, help="SMTP HOST:PORT (default %(default)s)")
        parser.add_argument("--web", default=os.getenv("WEB_LISTEN", "127.0.0.1:8000"), help="web UI HOST:PORT")

    def handle(self, *args, smtp: str, web: str, **options):
        self._first_admin()
        self._say_what_is_on()
        python = sys.executable
        manage = [python, str(settings.BASE_DIR / "manage.py")]
        if settings.CELERY_BROKER_URL:
            worker = [python, "-m", "celery", "-A", "appliance", "worker", "-B", "-l", "info", "--concurrency", "4"]
        else:
            worker = manage + ["runworker"]
        commands = {
            "smtp": manage + ["runsmtp", "--listen", smtp],
            "web": [python, "-m", "gunicorn", "appliance.wsgi", "-b", web, "--workers", "2", "--threads", "4",
                    "--access-logfile", "-"],
            "worker": worker,
        }
        children = {name: subprocess.Popen(cmd, cwd=settings.BASE_DIR) for name, cmd in commands.items()}
        self.stdout.write(f"SMTP on {smtp}, web UI on http://{web}/ — Ctrl-C stops all")
        stopping = []

        def stop(*_):
            stopping.append(1)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        exit_code = 0
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    self.stderr.write(f"{name} exited with {child.returncode}; stopping the appliance")
                    exit_code = child.returncode or 1
                    stopping.append(1)
                    break
            time.sleep(0.5)
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children.values():
            try:
                child.wait(timeout=40)
            except subprocess.TimeoutExpired:
                child.kill()
        sys.exit(exit_code)

    def _first_admin(self) -> None:
        User = get_user_model()
        if User.objects.exists():
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser("admin", "", password)
        self.stdout.write(self.style.WARNING(
            f"First start: created the administrator 'admin' with password {password} — change it after login."))

    def _say_what_is_on(self) -> None:
        db = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
        tasks = "Celery at " + settings.CELERY_BROKER_URL if settings.CELERY_BROKER_URL else "the embedded worker"
        self.stdout.write(f"Database: {db}; tasks: {tasks}")
        for name, module, var in (("virus scan", clamav, "CLAMD_URL"), ("spam scan", spamassassin, "SPAMD_URL")):
            if module.configured():
                state = "answers" if module.ping() else "DOES NOT ANSWER (mail waits in 'scan deferred')"
                self.stdout.write(f"{name}: {getattr(settings, var)} {state}")
            else:
                self.stdout.write(self.style.WARNING(f"{name} is OFF: {var} is not set"))
