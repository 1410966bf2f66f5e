"""The appliance as an administrator starts it, for end-to-end tests: `manage.py runsmtp` and a Celery worker as
separate processes against the test database, Redis, spamd, clamd and a capture server (the `appliance`
fixture), and the waits such tests need (a port that listens, a condition that becomes true)."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.models import MailFlowSettings, Message
from tests.support.servers import free_port
from tests.support.services import database_url_for

ROOT = Path(__file__).resolve().parents[2]


def database_url() -> str:
    return database_url_for("the end-to-end tests")


def wait_port(port: int, timeout: float = 30, process: subprocess.Popen | None = None) -> None:
    """Until something listens on 127.0.0.1:port; fail at once if `process`, the server, ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, "the server ended before it listened"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def wait_until(predicate, timeout: float = 90, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Appliance:
    """The SMTP server and a Celery worker, started as an administrator would start them."""

    def __init__(self, env: dict[str, str], logdir: Path):
        self.env, self.logdir = env, logdir
        self.smtp_port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}

    def start_smtp(self) -> None:
        self._start("smtp", [sys.executable, "manage.py", "runsmtp", "--listen", f"127.0.0.1:{self.smtp_port}"])
        wait_port(self.smtp_port)

    def start_worker(self) -> None:
        self._start("worker", [sys.executable, "-m", "celery", "-A", "appliance", "worker", "-l", "info",
                               "--concurrency", "2", "--without-gossip", "--without-mingle", "-n", "e2e@%h"])

    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=log)

    def manage(self, *args: str) -> subprocess.CompletedProcess:
        """A management command as an administrator runs it, against the same database and broker."""
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=60)

    def stop(self, name: str, sig=signal.SIGTERM, timeout: float = 40) -> int:
        process = self.processes.pop(name)
        process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def send(self, raw: bytes, sender: str = "alice@sender.example", to=("bob@example.org",)) -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="client.example.net", timeout=60) as client:
            client.ehlo()
            client.mail(sender)
            for address in to:
                code, reply = client.rcpt(address)
                if code >= 400:
                    return code, reply.decode()
            code, reply = client.data(raw)
            return code, reply.decode()


@pytest.fixture
def appliance(transactional_db, capture_server, redis, spamd, clamd, tmp_path, settings):
    from gateway.models import Domain, Route

    route = Route.objects.create(name="mailstore", host="127.0.0.1", port=capture_server.port)
    Domain.objects.create(name="example.org", route=route)
    config = MailFlowSettings.load()
    config.outbound_relay = capture_server.address  # DSNs to senders elsewhere leave through here
    config.save()
    import redis as redis_client

    broker = redis_client.Redis.from_url(redis)
    broker.flushdb()
    env = {
        **os.environ, "DATABASE_URL": database_url(), "CELERY_BROKER_URL": redis, "SPAMD_URL": spamd,
        "CLAMD_URL": clamd, "SMTP_POLICY_TTL": "0", "SMTP_REVERSE_DNS": "false", "DELIVERY_RETRY_BASE": "2",
        "SCAN_RETRY_BASE": "2", "DJANGO_SETTINGS_MODULE": "appliance.settings", "NODE_NAME": "e2e-node",
    }
    env.pop("CELERY_TASK_ALWAYS_EAGER", None)
    running = Appliance(env, tmp_path)
    running.start_smtp()
    running.start_worker()
    yield running
    running.stop_all()
    broker.flushdb()
    for log in tmp_path.glob("*.log"):
        sys.stderr.write(f"--- {log.name} (last lines) ---\n")
        sys.stderr.write("\n".join(log.read_text(errors="replace").splitlines()[-30:]) + "\n")


def settled(queue_id: str) -> Message | None:
    message = Message.objects.filter(queue_id=queue_id).first()
    if message and message.state in ("delivered", "quarantined", "bounced", "partial", "deleted", "released"):
        return message
    return None


def queue_id_of(reply: str) -> str:
    return reply.rsplit(" ", 1)[1]
