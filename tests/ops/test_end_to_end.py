"""End to end with the real parts: `manage.py runsmtp` and a Celery worker as separate processes,
PostgreSQL, Redis as the broker, spamd, clamd, and a capture server as the organisation's mail server."""

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

from gateway.models import MailFlowSettings, Message, Recipient
from tests.support.mail import GTUBE_PATH, MZ_PROGRAM, eicar, message, read_mail, zipped
from tests.support.scheduling import thread_policies
from tests.support.servers import free_port
from tests.support.services import database_url_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.services


def database_url() -> str:
    return database_url_for("the end-to-end tests")


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
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


def test_the_whole_flow(appliance, capture_server, corpus):
    ham_path = sorted(corpus("ham/sa2002-easy-ham").iterdir())[1]
    ham = read_mail(ham_path)
    cases = {
        "ham": ham,
        "gtube": read_mail(corpus(GTUBE_PATH)),
        "eicar": message(subject="Scan", attachments=[("eicar.com", "application/octet-stream", eicar())]),
        "eicar_zip": message(subject="Zip", attachments=[("a.zip", "application/zip", zipped({"e.com": eicar()}))]),
        "exe_zip": message(subject="Exe", attachments=[("b.zip", "application/zip",
                                                         zipped({"invoice.pdf.exe": MZ_PROGRAM}))]),
    }
    ids = {}
    for name, raw in cases.items():
        code, reply = appliance.send(raw)
        assert code == 250, (name, reply)
        assert reply.startswith("2.0.0")
        ids[name] = queue_id_of(reply)
    code, reply = appliance.send(message(), sender="spammer@outside.example", to=("victim@foreign.example",))
    assert code == 550 and reply.startswith("5.7.1")

    results = {name: wait_until(lambda q=q: settled(q), what=f"{name} to settle") for name, q in ids.items()}

    assert results["ham"].state == "delivered" and results["ham"].verdict == "clean"
    (delivered,) = capture_server.wait_for(1)
    assert delivered.data.endswith(ham), "the body and headers of the original arrive unchanged"
    added = delivered.data[: -len(ham)]
    assert b"X-Mailgate-Verdict: clean" in added and b"X-Spam-Status: No" in added
    assert b"Received: from client.example.net" in added and b"by " in added

    gtube = results["gtube"]
    assert gtube.state == "quarantined" and gtube.spam_score > 900
    assert "GTUBE" in [rule["name"] for rule in gtube.spam_rules]
    for name in ("eicar", "eicar_zip"):
        assert results[name].verdict == "virus" and results[name].state == "quarantined"
        assert results[name].virus_names[0].startswith("Eicar-Test-Signature")
    assert results["exe_zip"].verdict == "blocked_attachment" and results["exe_zip"].state == "quarantined"

    refused = Message.objects.get(state="refused")
    assert refused.refusal_reason == "relay_denied" and refused.recipients.get().address == "victim@foreign.example"

    # Release the GTUBE message: the worker delivers the stored original, without scanning it again, once.
    first = appliance.manage("release", gtube.queue_id)
    assert first.returncode == 0, first.stderr
    second = appliance.manage("release", gtube.queue_id)  # a second release does nothing
    assert second.returncode != 0 and "not in quarantine" in second.stderr
    wait_until(lambda: len(capture_server.messages) == 2, what="the released message")
    time.sleep(1)
    assert len(capture_server.messages) == 2
    released = capture_server.messages[1]
    assert b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X" in released.data
    gtube.refresh_from_db()
    assert gtube.state == "released" and gtube.attempts == 1

    # Every thread of the SMTP server and of the worker (its pool's included) runs under SCHED_BATCH.
    for name in ("smtp", "worker"):
        assert thread_policies(appliance.processes[name].pid) == {os.SCHED_BATCH}, name


def test_downstream_451_is_retried_and_delivered_once_and_550_gives_a_dsn(appliance, capture_server):
    capture_server.handler.data_script = ["451 4.3.0 mailbox busy"]
    code, reply = appliance.send(message(subject="Retry me"))
    assert code == 250
    queue_id = queue_id_of(reply)
    recipient = wait_until(lambda: Recipient.objects.filter(message__queue_id=queue_id, status="delivered").first(),
                           what="the retried delivery")
    assert recipient.attempts == 2 and capture_server.handler.attempts == 2
    time.sleep(3)  # a duplicate would show up here
    assert len(capture_server.messages) == 1

    capture_server.handler.rcpt_script = {"gone@example.org": ["550 5.1.1 <gone@example.org>: user unknown"]}
    code, reply = appliance.send(message(subject="To nobody", to="gone@example.org"), to=("gone@example.org",))
    assert code == 250
    wait_until(lambda: len(capture_server.messages) == 2, what="the DSN")
    notice = capture_server.messages[1]
    assert notice.recipients == ["alice@sender.example"]
    assert b"multipart/report" in notice.data and b"Status: 5.1.1" in notice.data
    assert Message.objects.get(queue_id=queue_id_of(reply)).state == "bounced"


def test_spamd_down_defers_and_delivers_when_back(appliance, capture_server, tmp_path):
    # The worker is restarted pointing at a spamd that does not answer.
    appliance.stop("worker")
    dead = f"tcp://127.0.0.1:{free_port()}"
    good = appliance.env["SPAMD_URL"]
    appliance.env["SPAMD_URL"] = dead
    appliance.start_worker()
    code, reply = appliance.send(message(subject="Patience"))
    assert code == 250
    queue_id = queue_id_of(reply)
    deferred = wait_until(lambda: Message.objects.filter(queue_id=queue_id, state="scan_deferred").first(),
                          what="scan deferred")
    assert "spamd" in deferred.last_error
    assert capture_server.messages == []
    # spamd is back (the worker sees the real one again); the sweeper, as beat runs it, re-enqueues.
    appliance.stop("worker")
    appliance.env["SPAMD_URL"] = good
    appliance.start_worker()
    Message.objects.filter(queue_id=queue_id).update(next_attempt_at=deferred.received_at)
    swept = appliance.manage("shell", "-c", "from gateway.tasks import sweep; sweep.delay()")
    assert swept.returncode == 0, swept.stderr
    delivered = wait_until(lambda: settled(queue_id), what="delivery after spamd is back")
    assert delivered.state == "delivered"
    time.sleep(1)
    assert len(capture_server.messages) == 1


def test_sigterm_finishes_the_transaction_in_flight(appliance):
    with socket.create_connection(("127.0.0.1", appliance.smtp_port), timeout=60) as sock:
        stream = sock.makefile("rwb")
        stream.readline()
        for command in (b"EHLO client.example.net", b"MAIL FROM:<alice@sender.example>", b"RCPT TO:<bob@example.org>",
                        b"DATA"):
            stream.write(command + b"\r\n")
            stream.flush()
            line = stream.readline()
            while line[3:4] == b"-":
                line = stream.readline()
        assert line.startswith(b"354")
        stream.write(message(subject="In flight"))
        stream.flush()
        appliance.processes["smtp"].send_signal(signal.SIGTERM)
        time.sleep(0.5)
        stream.write(b".\r\n")
        stream.flush()
        reply = stream.readline()
    assert reply.startswith(b"250 2.0.0"), reply
    assert appliance.processes["smtp"].wait(30) == 0
    appliance.processes.pop("smtp")
    assert Message.objects.filter(subject="In flight").count() == 1
