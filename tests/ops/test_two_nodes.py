"""Several nodes, one view: two SMTP nodes (`manage.py runsmtp` with NODE_NAME mx1 and mx2) and two Celery
workers, as separate processes against one PostgreSQL and one Redis broker, with spamd, clamd and a capture
server as the organisation's mail server. Mail accepted on either node is scanned by either worker, is logged
once with the node that took it, a release made from the web UI's view on two nodes at once is delivered once,
and the per-IP connection limit holds for both nodes together."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.models import Domain, MailFlowSettings, Message, Route, SMTPPolicy
from tests.support.appliance import wait_until
from tests.support.mail import GTUBE_PATH, message, read_mail
from tests.support.people import make_user
from tests.support.servers import free_port
from tests.support.services import database_url_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.services
FINAL = ("delivered", "quarantined", "bounced", "partial", "deleted", "released")


def database_url() -> str:
    return database_url_for("the two-node test")


class Cluster:
    """Two SMTP nodes and two workers, each a process of its own, started as an administrator would."""

    def __init__(self, env: dict[str, str], logdir: Path):
        self.env, self.logdir = env, logdir
        self.smtp_ports = {"mx1": free_port(), "mx2": free_port()}
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        for node, port in self.smtp_ports.items():
            self._start(node, {"NODE_NAME": node},
                        [sys.executable, "manage.py", "runsmtp", "--listen", f"127.0.0.1:{port}"])
        for worker in ("w1", "w2"):
            # One task at a time each: a burst of mail is shared between the two workers.
            self._start(worker, {"NODE_NAME": worker},
                        [sys.executable, "-m", "celery", "-A", "appliance", "worker", "-l", "info", "--concurrency",
                         "1", "--without-gossip", "--without-mingle", "-n", f"{worker}@%h"])
        # From their logs, not by connecting: a probe connection would count against the limits below.
        for node in self.smtp_ports:
            wait_until(lambda n=node: "SMTP listening" in self.log(n), timeout=60, what=f"{node} listening")
        for worker in ("w1", "w2"):
            wait_until(lambda w=worker: "ready." in self.log(w), timeout=60, what=f"worker {worker} ready")

    def _start(self, name: str, extra: dict[str, str], command: list[str]) -> None:
        out = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen(command, cwd=ROOT, env={**self.env, **extra}, stdout=out,
                                                stderr=out)

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def client(self, node: str) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.smtp_ports[node], local_hostname="client.example.net", timeout=60)
        client.ehlo()
        return client

    def send(self, node: str, raw: bytes) -> str:
        with self.client(node) as client:
            client.mail("alice@sender.example")
            assert client.rcpt("bob@example.org")[0] == 250
            code, reply = client.data(raw)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]

    def web(self, node: str, code: str) -> subprocess.Popen:
        """A web process of this node: Django's test client on the real views and settings (no server needed)."""
        return subprocess.Popen([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, text=True,
                                env={**self.env, "NODE_NAME": node, "ALLOWED_HOSTS": "testserver"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def cluster(transactional_db, capture_server, redis, spamd, clamd, tmp_path):
    route = Route.objects.create(name="mailstore", host="127.0.0.1", port=capture_server.port)
    Domain.objects.create(name="example.org", route=route)
    config = MailFlowSettings.load()
    config.outbound_relay = capture_server.address
    config.save()
    import redis as redis_client

    broker = redis_client.Redis.from_url(redis)
    broker.flushdb()
    env = {
        **os.environ, "DATABASE_URL": database_url(), "CELERY_BROKER_URL": redis, "SPAMD_URL": spamd,
        "CLAMD_URL": clamd, "SMTP_POLICY_TTL": "0", "SMTP_REVERSE_DNS": "false", "DJANGO_SETTINGS_MODULE":
        "appliance.settings", "ALLOW_INSECURE_SECRET": "true", "CONFIG_CACHE_SECONDS": "0",
    }
    for name in ("CELERY_TASK_ALWAYS_EAGER", "CACHE_URL", "SMTP_SHARED_LIMITS_URL", "MAIL_LOG_FILE", "LOG_SYSLOG"):
        env.pop(name, None)
    running = Cluster(env, tmp_path)
    try:
        running.start()
        yield running
    finally:
        running.stop_all()
        broker.flushdb()
        broker.close()
        for log in sorted(tmp_path.glob("*.log")):
            sys.stderr.write(f"--- {log.name} (last lines) ---\n")
            sys.stderr.write("\n".join(log.read_text(errors="replace").splitlines()[-20:]) + "\n")


def scanned_by(cluster: Cluster, worker: str) -> set[str]:
    return set(re.findall(r"mailgate/scan\[\d+\]: (\w+): verdict=", cluster.log(worker)))


def test_two_nodes_and_two_workers_one_view(cluster, capture_server, corpus):
    make_user("admin", role="admin", email="postmaster@example.org", password="Two-nodes-admin-2026!")
    sent: dict[str, str] = {}
    for number in range(8):
        node = ("mx1", "mx2")[number % 2]
        sent[cluster.send(node, message(subject=f"Ham {number}"))] = node
    gtube = cluster.send("mx2", read_mail(corpus(GTUBE_PATH)))
    sent[gtube] = "mx2"

    wait_until(lambda: Message.objects.filter(queue_id__in=sent, state__in=FINAL).count() == len(sent),
               timeout=120, what="every message to settle")
    # Once in the log each, with the node that took it.
    logged = {m.queue_id: m for m in Message.objects.filter(queue_id__in=sent)}
    assert len(logged) == len(sent) == Message.objects.filter(direction="inbound").count()
    assert {q: m.node for q, m in logged.items()} == sent
    assert logged[gtube].state == "quarantined"
    assert all(m.state == "delivered" for q, m in logged.items() if q != gtube)
    # Scanned by either worker, each message by one of them.
    w1, w2 = scanned_by(cluster, "w1"), scanned_by(cluster, "w2")
    assert w1 | w2 == set(sent) and not w1 & w2, (w1, w2)
    assert w1 and w2, "both workers took a share of the burst"
    # Delivered once each.
    wait_until(lambda: len(capture_server.messages) == len(sent) - 1, timeout=120, what="the deliveries")
    subjects = [re.search(rb"Subject: (Ham \d)", m.data).group(1) for m in capture_server.messages]
    assert sorted(subjects) == sorted(f"Ham {n}".encode() for n in range(8))
    # `manage.py maillog --node` is the same view from the shell.
    listed = subprocess.run([sys.executable, "manage.py", "maillog", "--node", "mx1"], cwd=ROOT, env=cluster.env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert set(re.findall(r'"id": "(\w+)"', listed.stdout)) == {q for q, n in sent.items() if n == "mx1"}

    # The release button, pressed on both nodes' web UI at once: delivered once.
    release = ("from django.test import Client; from django.contrib.auth import get_user_model; "
               "c = Client(); c.force_login(get_user_model().objects.get(username='admin')); "
               f"r = c.post('/quarantine/{gtube}/release', {{}}); print(r.status_code)")
    presses = [cluster.web(node, release) for node in ("mx1", "mx2")]
    for press in presses:
        out, err = press.communicate(timeout=120)
        assert press.returncode == 0 and out.strip().splitlines()[-1] == "302", err
    wait_until(lambda: len(capture_server.messages) == len(sent), timeout=120, what="the released message")
    time.sleep(3)  # a second delivery would show up here
    assert len(capture_server.messages) == len(sent)
    assert b"GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL" in capture_server.messages[-1].data
    released = Message.objects.get(queue_id=gtube)
    assert released.state == "released"
    assert released.recipients.get().attempts == 1


def test_the_connection_limit_holds_for_both_nodes_together(cluster):
    policy = SMTPPolicy.load()
    policy.max_connections_per_ip = 1
    policy.save()
    first = cluster.client("mx1")
    try:
        with pytest.raises(smtplib.SMTPConnectError) as excinfo:
            cluster.client("mx2")
        assert excinfo.value.smtp_code == 421
    finally:
        first.quit()
    refused = Message.objects.get(refusal_reason="rate_limit")
    assert refused.node == "mx2"
    wait_until(lambda: _connects(cluster, "mx2"), timeout=10, what="mx2 to take a connection once mx1's closed")


def _connects(cluster: Cluster, node: str) -> bool:
    try:
        cluster.client(node).quit()
        return True
    except smtplib.SMTPConnectError:
        return False


def test_the_compose_healthchecks_of_the_smtp_nodes_and_the_workers_pass(cluster):
    """docker-compose.yml's healthcheck commands, as Docker runs them in each container, against these
    processes: the greeting of each SMTP node, a ping answered by each worker by its name."""
    import socket

    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    smtp_check, worker_check = (services[name]["healthcheck"]["test"][2:] for name in ("smtp", "worker"))
    for node, port in cluster.smtp_ports.items():
        command = [sys.executable, *(arg.replace("127.0.0.1:25", f"127.0.0.1:{port}") for arg in smtp_check)]
        done = subprocess.run(command, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "smtp: ok" in done.stdout, (node, done.stdout, done.stderr)
    for worker in ("w1", "w2"):
        name = f"{worker}@{socket.gethostname()}"
        done = subprocess.run([sys.executable, *worker_check, name], cwd=ROOT, env=cluster.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and f"worker: ok: {name}: {{'ok': 'pong'}}" in done.stdout, done.stdout
