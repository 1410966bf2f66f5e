"""The per-IP limits of the SMTP server (connections, messages per minute, failed AUTH) counted for all nodes
together in Redis (gateway/policy/limits.py): two SMTP servers, each with its own handler and counters, allow a
client the limit once between them, not once each; without Redis each counts alone, and a Redis that does not
answer leaves each enforcing its own counts."""

from __future__ import annotations

import logging
import smtplib
import time

import pytest
from django.contrib.auth import get_user_model

from gateway.models import Message, SMTPPolicy
from tests.support.servers import GatewayServer, PolicyGatewayServer, free_port, insecure_tls

pytestmark = pytest.mark.usefixtures("scanners_off")
PASSWORD = "correct horse battery staple"


def set_policy(**fields) -> None:
    policy = SMTPPolicy.load()
    for name, value in fields.items():
        setattr(policy, name, value)
    policy.save()


@pytest.fixture
def shared_redis(redis, settings):
    import redis as redis_client

    client = redis_client.Redis.from_url(redis)
    for key in client.scan_iter("mailgate:limits:*"):
        client.delete(key)
    settings.SMTP_SHARED_LIMITS_URL = redis
    yield client
    for key in client.scan_iter("mailgate:limits:*"):
        client.delete(key)
    client.close()


def start_nodes(settings, server_class=GatewayServer, count: int = 2) -> list:
    settings.CELERY_TASK_ALWAYS_EAGER = True
    settings.SMTP_REVERSE_DNS = False
    settings.SMTP_POLICY_TTL = 0
    return [server_class().start() for _ in range(count)]


@pytest.fixture
def two_nodes(transactional_db, settings, protected_domain):
    nodes = start_nodes(settings)
    yield nodes
    for node in nodes:
        node.stop()


def connect(node) -> smtplib.SMTP:
    client = node.client()
    client.ehlo()
    return client


def test_connections_are_counted_over_both_nodes(shared_redis, two_nodes):
    a, b = two_nodes
    set_policy(max_connections_per_ip=2)
    first, second = connect(a), connect(b)
    try:
        with pytest.raises(smtplib.SMTPConnectError) as excinfo:
            connect(a)
        assert excinfo.value.smtp_code == 421
        assert excinfo.value.smtp_error.startswith(b"4.7.0 Too many connections from [127.0.0.1]")
        with pytest.raises(smtplib.SMTPConnectError):
            connect(b)
    finally:
        first.quit()
    # The connection closed on node a is counted down for node b too.
    deadline = time.monotonic() + 5
    while shared_redis.zcard("mailgate:limits:conn:127.0.0.1") > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    third = connect(b)
    third.quit()
    second.quit()
    assert Message.objects.filter(refusal_reason="rate_limit").count() == 2


def test_messages_per_minute_are_counted_over_both_nodes(shared_redis, two_nodes):
    a, b = two_nodes
    set_policy(max_messages_per_minute=3)
    with connect(a) as on_a, connect(b) as on_b:
        for client in (on_a, on_b, on_a):
            assert client.mail("alice@sender.example")[0] == 250
            client.rset()
        code, text = on_b.mail("alice@sender.example")
    assert code == 421 and text.startswith(b"4.7.0 Too many messages from [127.0.0.1]")


def test_failed_auth_is_counted_over_both_nodes(shared_redis, transactional_db, settings, tmp_path):
    get_user_model().objects.create_user("alice", "alice@example.org", PASSWORD)
    settings.DATA_DIR = tmp_path
    settings.SMTP_TLS_CERT = ""
    settings.LOGIN_THROTTLE_PAIR_FAILURES = 0  # the login throttle (gateway.throttle) aside: the SMTP limit alone
    set_policy(auth_max_failures=3)
    nodes = start_nodes(settings, PolicyGatewayServer)
    try:
        replies = []
        for node in (nodes[0], nodes[1], nodes[0], nodes[1]):
            with node.submission() as client:
                client.starttls(context=insecure_tls())
                client.ehlo()
                client.user, client.password = "alice", "wrong"
                with pytest.raises(smtplib.SMTPException) as excinfo:
                    client.auth("PLAIN", client.auth_plain)
                replies.append(getattr(excinfo.value, "smtp_code", None))
        # Two failures on each node: the third, wherever it was made, reached the limit.
        assert replies == [535, 535, 421, 421]
    finally:
        for node in nodes:
            node.stop()


def test_without_shared_counts_each_node_counts_alone(transactional_db, settings, protected_domain):
    settings.SMTP_SHARED_LIMITS_URL = ""
    nodes = start_nodes(settings)
    try:
        set_policy(max_connections_per_ip=1)
        first, second = connect(nodes[0]), connect(nodes[1])  # one each: both taken
        first.quit()
        second.quit()
    finally:
        for node in nodes:
            node.stop()


def test_redis_that_does_not_answer_leaves_each_node_its_own_limit(transactional_db, settings, protected_domain,
                                                                   caplog):
    settings.SMTP_SHARED_LIMITS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    nodes = start_nodes(settings)
    logging.getLogger("gateway.policy.limits").addHandler(caplog.handler)
    try:
        set_policy(max_connections_per_ip=1)
        first = connect(nodes[0])  # mail goes on
        with pytest.raises(smtplib.SMTPConnectError):  # and this node's own limit holds
            connect(nodes[0])
        first.quit()
    finally:
        logging.getLogger("gateway.policy.limits").removeHandler(caplog.handler)
        for node in nodes:
            node.stop()
    assert any("each node enforces its own counts" in r.getMessage() for r in caplog.records)


def test_a_shared_limits_url_that_is_not_redis_is_refused():
    from gateway.policy.limits import shared_counts

    with pytest.raises(ValueError, match="SMTP_SHARED_LIMITS_URL"):
        shared_counts("http://127.0.0.1:6379", 0.5)
    assert shared_counts("", 0.5) is None
