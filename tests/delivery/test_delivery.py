"""Delivery to the route: per-recipient replies, retries with back-off, exactly-once, DSNs."""

import email
from datetime import timedelta

import pytest
from django.utils import timezone

from gateway import sweep
from gateway.claims import backoff
from gateway.delivery import attempt as delivery_attempt
from gateway.delivery.content import tag_subject
from gateway.models import MailFlowSettings, Message, Recipient
from gateway.scan import run as scan_run
from tests.support.mail import message
from tests.support.servers import send

pytestmark = pytest.mark.usefixtures("scanners_off")


def make_due(msg):
    Recipient.objects.filter(message=msg, status="deferred").update(next_attempt_at=timezone.now())


def run_due_deliveries():
    for message_id in sweep.due_work()[1]:
        delivery_attempt.run_delivery(message_id)


def test_temporary_failure_is_retried_and_delivered_exactly_once(gateway_smtp, protected_domain, capture_server):
    capture_server.handler.data_script = ["451 4.3.0 try again later"]
    msg = send(gateway_smtp, message())
    recipient = msg.recipients.get()
    assert recipient.status == Recipient.Status.DEFERRED
    assert recipient.reply_text.startswith("451 4.3.0 try again later")
    assert recipient.next_attempt_at > timezone.now()
    assert capture_server.messages == []
    # Not due yet: nothing happens.
    run_due_deliveries()
    assert capture_server.messages == []
    make_due(msg)
    run_due_deliveries()
    run_due_deliveries()  # a second pass (or a duplicated task) finds nothing to do
    delivery_attempt.run_delivery(msg.pk)
    assert len(capture_server.messages) == 1
    recipient.refresh_from_db()
    assert recipient.status == Recipient.Status.DELIVERED and recipient.attempts == 2
    msg.refresh_from_db()
    assert msg.state == Message.State.DELIVERED


def test_permanent_failure_sends_a_dsn_to_the_sender(gateway_smtp, protected_domain, capture_server):
    config = MailFlowSettings.load()
    config.outbound_relay = capture_server.address  # the sender's domain is not ours: DSNs leave this way
    config.save()
    capture_server.handler.rcpt_script = {"gone@example.org": ["550 5.1.1 <gone@example.org>: no such user"]}
    msg = send(gateway_smtp, message(to="bob@example.org, gone@example.org"), to=("bob@example.org",
                                                                                   "gone@example.org"))
    delivered = capture_server.wait_for(2)
    assert len(delivered) == 2
    original, notice = delivered
    assert original.recipients == ["bob@example.org"]
    assert notice.sender in ("", "<>") and notice.recipients == ["alice@sender.example"]
    report = email.message_from_bytes(notice.data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = report.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    text = status.as_string()
    assert "Final-Recipient: rfc822; gone@example.org" in text
    assert "Status: 5.1.1" in text and "Action: failed" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1" in text
    msg.refresh_from_db()
    assert msg.state == Message.State.PARTIAL
    assert msg.recipients.get(address="gone@example.org").status == Recipient.Status.BOUNCED
    dsn = Message.objects.get(direction=Message.Direction.DSN)
    assert dsn.state == Message.State.DELIVERED


def test_no_dsn_for_a_null_sender(gateway_smtp, protected_domain, capture_server):
    capture_server.handler.rcpt_script = {"gone@example.org": ["550 5.1.1 no such user"]}
    msg = send(gateway_smtp, message(to="gone@example.org"), to=("gone@example.org",), sender="")
    assert msg.recipients.get().status == Recipient.Status.BOUNCED
    assert not Message.objects.filter(direction=Message.Direction.DSN).exists()


def test_refused_connection_is_deferred_then_expires_with_a_dsn(gateway_smtp, protected_domain, capture_server):
    from tests.support.servers import free_port

    route = protected_domain.route
    real_port, route.port = route.port, free_port()
    route.save()
    config = MailFlowSettings.load()
    config.outbound_relay = capture_server.address
    config.save()
    msg = send(gateway_smtp, message())
    recipient = msg.recipients.get()
    assert recipient.status == Recipient.Status.DEFERRED
    assert recipient.reply_code == 451 and "refused" in recipient.reply_text.lower()
    # Five days later it is still down: the message expires and the sender hears of it.
    Message.objects.filter(pk=msg.pk).update(received_at=timezone.now() - timedelta(days=5, minutes=1))
    make_due(msg)
    run_due_deliveries()
    recipient.refresh_from_db()
    assert recipient.status == Recipient.Status.EXPIRED
    (notice,) = capture_server.wait_for(1)
    assert notice.recipients == ["alice@sender.example"]
    assert b"Action: failed" in notice.data
    route.port = real_port
    route.save()


def test_backoff_doubles_up_to_the_cap():
    assert [backoff(n, 60, 3600) for n in (1, 2, 3, 7, 10)] == [60, 120, 240, 3600, 3600]


def test_tag_subject_touches_only_the_subject():
    raw = b"From: a@b.example\r\nSubject: Hello\r\n\r\nSubject: body line\r\n"
    assert tag_subject(raw, "[SPAM]") == b"From: a@b.example\r\nSubject: [SPAM] Hello\r\n\r\nSubject: body line\r\n"
    assert tag_subject(b"From: a@b.example\r\n\r\nbody", "[SPAM]").startswith(b"From: a@b.example\r\nSubject: [SPAM]")


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-command-at-a-time"])
def test_a_non_ascii_recipient_is_sent_with_smtputf8(gateway_smtp, protected_domain, capture_server, pipelining):
    from quarantine.actions import release_message

    capture_server.handler.pipelining = pipelining
    msg = send(gateway_smtp, message())
    Message.objects.filter(pk=msg.pk).update(state=Message.State.QUARANTINED)
    Recipient.objects.filter(message=msg).update(status=Recipient.Status.QUARANTINED)
    msg.refresh_from_db()
    capture_server.messages.clear()
    config = MailFlowSettings.load()
    config.outbound_relay = capture_server.address
    config.save()
    assert release_message(msg, by=None, to_address="user@bücher.example")
    recipient = msg.recipients.get(address="user@bücher.example")
    # The capture server offers SMTPUTF8: the transaction asks for it, and the address arrives as it is.
    assert recipient.status == Recipient.Status.DELIVERED
    delivered = capture_server.messages[-1]
    assert delivered.recipients == ["user@bücher.example"] and "SMTPUTF8" in delivered.options


def test_a_delivery_whose_claim_was_handed_to_another_worker_is_not_sent_again(gateway_smtp, protected_domain,
                                                                                 capture_server, settings):
    from gateway.delivery.attempt import DeliveryAttempt

    settings.CELERY_TASK_ALWAYS_EAGER = False
    msg = send(gateway_smtp, message())
    scan_run.run_scan(msg.pk)  # not eager: the test scans it here
    msg.refresh_from_db()
    Recipient.objects.filter(message=msg).update(status=Recipient.Status.PENDING, next_attempt_at=timezone.now())
    capture_server.messages.clear()
    attempt = DeliveryAttempt(msg)
    (recipient,) = attempt.claim()
    # The pass took an hour; meanwhile the sweeper judged the claim stale and another worker took it.
    recipient.claimed_at = timezone.now() - timedelta(hours=1)
    Recipient.objects.filter(pk=recipient.pk).update(claimed_at=timezone.now())
    assert attempt._reclaim([recipient]) == []
    assert capture_server.messages == []


def test_a_non_ascii_recipient_bounces_where_smtputf8_is_not_offered(gateway_smtp, protected_domain,
                                                                     capture_server):
    from aiosmtpd.controller import Controller

    from quarantine.actions import release_message
    from tests.support.servers import CaptureHandler, free_port

    plain_port = free_port()
    plain = Controller(CaptureHandler(), hostname="127.0.0.1", port=plain_port, enable_SMTPUTF8=False)
    plain.start()
    try:
        config = MailFlowSettings.load()
        config.outbound_relay = f"127.0.0.1:{plain_port}"
        config.save()
        msg = send(gateway_smtp, message())
        Message.objects.filter(pk=msg.pk).update(state=Message.State.QUARANTINED)
        Recipient.objects.filter(message=msg).update(status=Recipient.Status.QUARANTINED)
        msg.refresh_from_db()
        assert release_message(msg, by=None, to_address="user@bücher.example")
        recipient = msg.recipients.get(address="user@bücher.example")
        assert recipient.status == Recipient.Status.BOUNCED
        assert recipient.reply_text.startswith("553 5.6.7")
        assert plain.handler.messages[-1].recipients == ["alice@sender.example"]  # the DSN, not the message
    finally:
        plain.stop()


def _writes_to_the_route(monkeypatch) -> list[bytes]:
    """What delivery writes to the downstream server, one item per write."""
    import smtplib

    writes: list[bytes] = []
    original = smtplib.SMTP.send

    def send(self, s):
        writes.append(s if isinstance(s, bytes) else s.encode())
        return original(self, s)

    monkeypatch.setattr(smtplib.SMTP, "send", send)
    return writes


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-command-at-a-time"])
def test_each_recipient_gets_its_own_reply_with_and_without_pipelining(gateway_smtp, protected_domain,
                                                                        capture_server, monkeypatch, pipelining):
    capture_server.handler.pipelining = pipelining
    capture_server.handler.rcpt_script = {"gone@example.org": ["550 5.1.1 no such user"],
                                          "busy@example.org": ["452 4.2.2 mailbox full"]}
    writes = _writes_to_the_route(monkeypatch)
    # A line that starts with a dot must arrive as it was sent (dot-stuffed on the wire, RFC 5321 §4.5.2).
    raw = message(body="first line\r\n.a line that starts with a dot\r\n..and two\r\n.\r\nend\r\n")
    msg = send(gateway_smtp, raw, to=("bob@example.org", "gone@example.org", "busy@example.org", "carol@example.org"))
    statuses = dict(msg.recipients.values_list("address", "status"))
    assert statuses == {"bob@example.org": "delivered", "gone@example.org": "bounced",
                        "busy@example.org": "deferred", "carol@example.org": "delivered"}
    (delivered,) = capture_server.wait_for(1)
    assert delivered.recipients == ["bob@example.org", "carol@example.org"]
    assert delivered.data.endswith(b"first line\r\n.a line that starts with a dot\r\n..and two\r\n.\r\nend\r\n")
    envelope = [w for w in writes if w.startswith(b"MAIL FROM:")]
    assert len(envelope) == 1
    lines = envelope[0].split(b"\r\n")
    assert lines[0].startswith(b"MAIL FROM:<alice@sender.example>")
    if pipelining:  # MAIL, the four RCPTs and DATA in one write: one round trip
        assert lines[1:] == [b"RCPT TO:<%s@example.org>" % name for name in (b"bob", b"gone", b"busy", b"carol")] + [
            b"DATA", b""]
    else:
        assert lines[1:] == [b""]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-command-at-a-time"])
def test_every_recipient_refused_sends_no_data_and_keeps_the_session(gateway_smtp, protected_domain, capture_server,
                                                                     pipelining):
    capture_server.handler.pipelining = pipelining
    capture_server.handler.rcpt_script = {"gone@example.org": ["550 5.1.1 no such user"],
                                          "left@example.org": ["550 5.1.1 no such user"]}
    first = send(gateway_smtp, message(), to=("gone@example.org", "left@example.org"))
    assert set(first.recipients.values_list("status", flat=True)) == {"bounced"}
    assert capture_server.handler.attempts == 0  # no DATA was taken
    # The session is left in a clean state (RSET) and carries the next message.
    second = send(gateway_smtp, message(subject="second"), to=("bob@example.org",))
    assert second.recipients.get().status == "delivered"
    assert [m for m in capture_server.messages if m.recipients == ["bob@example.org"]]
