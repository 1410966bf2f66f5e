"""/healthz, /metrics and /status/: against the real clamd, spamd, Redis and PostgreSQL, with a known run of mail
through our SMTP server; an unreachable clamd is a socket nobody listens on (the shared clamd keeps running)."""

from __future__ import annotations

import os
import tempfile

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.heartbeat import Heartbeat
from gateway.models import MetricTotal, NodeHeartbeat
from tests.support.mail import message
from tests.support.people import logged_in, make_user
from tests.support.servers import free_port, send


@pytest.fixture(autouse=True)
def fresh_counts():
    """What earlier tests in this process counted and did not flush is not this test's (autouse: before the
    SMTP server of a test starts, whose heartbeat would flush it)."""
    metrics.take()
    yield
    metrics.take()


def unused_socket() -> str:
    """A unix socket path nothing listens on."""
    return "unix://" + os.path.join(tempfile.mkdtemp(), "clamd.sock")


def test_healthz_is_200_when_every_part_answers(db, client, settings, clamd, spamd, redis):
    settings.CLAMD_URL, settings.SPAMD_URL, settings.CELERY_BROKER_URL = clamd, spamd, redis
    answer = client.get("/healthz")
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ok"
    assert {k: v for k, v in body["checks"].items() if k != "seconds"} == {
        "database": "ok", "broker": "ok", "clamd": "ok", "spamd": "ok"}


def test_healthz_is_503_when_clamd_is_unreachable(db, client, settings, spamd):
    settings.SPAMD_URL = spamd
    settings.CLAMD_URL = unused_socket()
    answer = client.get("/healthz")
    assert answer.status_code == 503
    body = answer.json()
    assert body["status"] == "fail" and body["checks"]["database"] == "ok" and body["checks"]["spamd"] == "ok"
    assert body["checks"]["clamd"].startswith("not reachable")
    assert "clamd.sock" not in answer.content.decode()  # no paths, addresses or counts

    settings.CLAMD_URL = f"tcp://127.0.0.1:{free_port()}"
    assert client.get("/healthz").json()["checks"]["clamd"] == "not reachable: connection refused; scans wait"


def test_healthz_needs_no_login_and_says_nothing_of_the_mail(db, client, settings, protected_domain):
    settings.CLAMD_URL = settings.SPAMD_URL = settings.CELERY_BROKER_URL = ""
    answer = client.get("/healthz")
    assert answer.status_code == 200
    assert set(answer.json()["checks"]) == {"database", "seconds"}
    assert "example.org" not in answer.content.decode()


def scrape(client, **extra) -> dict:
    answer = client.get("/metrics", **extra)
    assert answer.status_code == 200, answer.content
    samples = {}
    for family in text_string_to_metric_families(answer.content.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "node")))
            samples[key] = samples.get(key, 0) + sample.value  # summed over the nodes
    return samples


def test_metrics_show_the_counts_of_a_known_run(gateway_smtp, protected_domain, capture_server, client, settings,
                                               scanners_off):
    settings.NODE_NAME = "node-a"
    for _ in range(3):
        send(gateway_smtp, message())
    capture_server.handler.data_script = ["451 4.3.0 busy"]
    send(gateway_smtp, message())
    with gateway_smtp.client() as smtp:  # one refusal: a domain that is not ours
        smtp.ehlo()
        smtp.mail("alice@sender.example")
        code, _ = smtp.rcpt("someone@elsewhere.example")
        assert 500 <= code < 600
    capture_server.wait_for(3)
    # The SMTP server and the worker count in memory; their heartbeat adds it to the database.
    Heartbeat("worker").beat()
    samples = scrape(client)
    assert samples[("mailgate_messages_accepted_total", ())] == 4
    assert samples[("mailgate_messages_refused_total", (("reason", "relay_denied"),))] == 1
    assert samples[("mailgate_verdicts_total", (("verdict", "clean"),))] == 4
    assert samples[("mailgate_deliveries_total", (("outcome", "delivered"),))] == 3
    assert samples[("mailgate_deliveries_total", (("outcome", "deferred"),))] == 1
    assert samples[("mailgate_scan_seconds_count", ())] == 4
    assert samples[("mailgate_scan_seconds_bucket", (("le", "+Inf"),))] == 4
    assert samples[("mailgate_delivery_seconds_count", ())] == 3
    assert samples[("mailgate_queue_depth", (("state", "deferred"),))] == 1
    assert samples[("mailgate_smtp_connections_total", ())] == 5
    # Another flush adds to the same totals: counters, not snapshots.
    metrics.count("mailgate_messages_accepted")
    metrics.flush()
    assert scrape(client)[("mailgate_messages_accepted_total", ())] == 5
    assert MetricTotal.objects.filter(node="node-a", name="mailgate_messages_accepted").get().value == 5


def test_scanner_errors_are_counted(transactional_db, client, settings, protected_domain):
    from gateway.models import Message, RawMessage, Recipient
    from gateway.scan.run import run_scan

    settings.CLAMD_URL = unused_socket()
    settings.SPAMD_URL = ""
    msg = Message.objects.create(envelope_sender="alice@sender.example")
    RawMessage.objects.create(message=msg, data=message())
    Recipient.objects.create(message=msg, address="bob@example.org")
    assert run_scan(msg.pk) == "deferred"
    metrics.flush()
    assert scrape(client)[("mailgate_scanner_errors_total", (("scanner", "clamd"),))] == 1


def test_metrics_are_protected_by_token_or_allow_list(db, client, settings):
    settings.METRICS_ALLOW = ["127.0.0.1"]
    settings.METRICS_TOKEN = "s3cret-token"
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.9").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.9", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.9",
                      HTTP_AUTHORIZATION="Bearer s3cret-token").status_code == 200
    settings.METRICS_ALLOW, settings.METRICS_TOKEN = [], ""
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403  # neither: closed


def test_the_status_page_shows_nodes_and_components(transactional_db, client, settings, clamd, spamd, redis):
    settings.CLAMD_URL, settings.SPAMD_URL, settings.CELERY_BROKER_URL = clamd, spamd, redis
    settings.NODE_NAME = "mx1"
    beat = Heartbeat("smtp", connections=lambda: 7)
    beat.beat()
    admin = make_user("admin", role="admin", email="postmaster@example.org")
    page = logged_in(client, admin).get("/status/")
    assert page.status_code == 200
    levels = {c.name: (c.level, c.reason) for c in page.context["components"]}
    assert levels["clamd"][0] in ("green", "amber") and levels["clamd"][1].startswith("reachable")
    assert levels["spamd"] == ("green", "reachable")
    assert levels["broker"] == ("green", "reachable")
    assert levels["database"][0] == "green"
    (node,) = page.context["nodes"]
    assert node.name == "mx1" and node.level == "green"
    html = page.content.decode()
    assert "7 SMTP connections now" in html and "ClamAV" in html and "stored originals" in html
    settings.CLAMD_URL = unused_socket()
    page = logged_in(client, admin).get("/status/")
    assert dict((c.name, c.level) for c in page.context["components"])["clamd"] == "red"
    assert page.context["worst"] == "red"
    beat.last()
    assert not NodeHeartbeat.objects.exists()


def test_the_status_page_is_for_administrators(db, client):
    dana = make_user("dana", role="domain_admin", email="dana@example.org")
    assert logged_in(client, dana).get("/status/").status_code == 403


@pytest.mark.parametrize("kind", ["smtp", "worker"])
def test_a_heartbeat_thread_writes_its_row_and_removes_it_on_stop(transactional_db, kind):
    beat = Heartbeat(kind, interval=0.05).start()
    import time

    deadline = time.monotonic() + 10
    while not NodeHeartbeat.objects.filter(kind=kind).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert NodeHeartbeat.objects.filter(kind=kind, pid=os.getpid()).exists()
    beat.stop()
    assert not NodeHeartbeat.objects.filter(kind=kind).exists()


def test_the_grafana_dashboard_asks_only_for_metrics_we_export(db, client, settings):
    """conf/grafana/mailgate-dashboard.json: every mailgate_ series it queries is one /metrics can answer."""
    import json
    import re
    from pathlib import Path

    settings.METRICS_ALLOW = ["127.0.0.1"]
    metrics.count("mailgate_messages_accepted")
    metrics.observe("mailgate_scan_seconds", 0.2)
    metrics.observe("mailgate_delivery_seconds", 2.0)
    metrics.flush()
    exported = set()
    for family in text_string_to_metric_families(client.get("/metrics").content.decode()):
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
    exported |= {f"{name}_total" for name in exported}
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "conf/grafana/mailgate-dashboard.json").read_text())
    asked = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"mailgate_\w+", target["expr"])}
    assert asked and asked <= exported, asked - exported


def test_the_smtp_server_beats_with_its_open_connections(transactional_db, client, settings):
    """runsmtp's own heartbeat (gateway.smtp.serve): its row says how many connections are open, /metrics too."""
    import time

    from tests.support.servers import GatewayServer

    settings.HEARTBEAT_SECONDS = 0.1
    settings.SMTP_REVERSE_DNS = False
    settings.METRICS_ALLOW = ["127.0.0.1"]
    server = GatewayServer().start()
    try:
        with server.client() as smtp:
            smtp.ehlo()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not NodeHeartbeat.objects.filter(kind="smtp",
                                                                                   smtp_connections=1).exists():
                time.sleep(0.05)
            beat = NodeHeartbeat.objects.get(kind="smtp", pid=os.getpid())
            assert beat.smtp_connections == 1 and beat.node == settings.NODE_NAME
            assert scrape(client)[("mailgate_smtp_connections_open", ())] == 1
    finally:
        server.stop()
    assert not NodeHeartbeat.objects.filter(kind="smtp").exists()  # a clean stop removes its row
