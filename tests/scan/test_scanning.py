"""The scan with the real scanners (clamd, spamd) through our SMTP server, eager tasks, and a capture
server as the organisation's mail server."""

import uuid

import pytest
from django.utils import timezone

from gateway import sweep, tasks
from gateway.delivery import attempt as delivery_attempt
from gateway.intake.rows import Arrival, received_header
from gateway.mailbytes import first_received
from gateway.models import MailFlowSettings, Message, RawMessage, Recipient
from gateway.scan import clamav, spamassassin
from gateway.scan import run as scan_run
from gateway.scan import verdict as scan_verdict
from gateway.scan.spamassassin import parse_report
from tests.support.mail import GTUBE_PATH, MZ_PROGRAM, eicar, message, read_mail, zipped
from tests.support.services import spamc


@pytest.fixture
def scanners(settings, spamd, clamd):
    settings.SPAMD_URL = spamd
    settings.CLAMD_URL = clamd


def send(gateway_smtp, raw: bytes, sender="alice@sender.example", to=("bob@example.org",)) -> Message:
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail(sender)
        for address in to:
            client.rcpt(address)
        code, reply = client.data(raw)
    assert code == 250, reply
    return Message.objects.get(queue_id=reply.decode().rsplit(" ", 1)[1])


def test_report_parsing():
    report = """Content analysis details:   (1000.0 points, 5.0 required)

 pts rule name              description
---- ---------------------- --------------------------------------------------
1000 GTUBE                  BODY: Generic Test for Unsolicited Bulk Email
-0.0 NO_RELAYS              Informational: message was not relayed via SMTP
 0.5 SOME_LONG_RULE         A description that is long and
                            continues on the next line
"""
    rules = parse_report(report)
    assert [r["name"] for r in rules] == ["GTUBE", "NO_RELAYS", "SOME_LONG_RULE"]
    assert rules[0]["score"] == 1000.0
    assert rules[2]["description"] == "A description that is long and continues on the next line"


def test_spamd_scores_gtube_and_ham(scanners, corpus):
    gtube = spamassassin.check(read_mail(corpus(GTUBE_PATH)))
    assert gtube.score > 900 and gtube.is_spam
    assert "GTUBE" in [r["name"] for r in gtube.rules]
    ham = spamassassin.check(message(body="Minutes of today's meeting are attached below.\n"))
    assert ham.score < 5


def test_first_received_takes_our_trace_field_only():
    added = ("Received: from mail.sender.example (mail.sender.example [192.0.2.7])\r\n"
             "\tby mx.example.org (Mailgate) with ESMTP id 0A1B2C3D4E5F;\r\n"
             "\tTue, 01 Dec 2026 10:00:01 +0000\r\n"
             "Received-SPF: pass (mx.example.org: 192.0.2.7 is permitted) client-ip=192.0.2.7;\r\n"
             "Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=sender.example\r\n")
    assert first_received(added) == (b"Received: from mail.sender.example (mail.sender.example [192.0.2.7])\r\n"
                                     b"\tby mx.example.org (Mailgate) with ESMTP id 0A1B2C3D4E5F;\r\n"
                                     b"\tTue, 01 Dec 2026 10:00:01 +0000\r\n")
    assert first_received(added.replace("\r\n", "\n")) == first_received(added)
    assert first_received("Received-SPF: pass client-ip=192.0.2.7;\r\n") == b""
    assert first_received("") == b""


@pytest.mark.parametrize(("client_name", "rdns_none"), [("", True), ("mail.sender.example", False)])
def test_spamassassin_sees_the_connecting_client_in_our_received_field(scanners, db, client_name, rdns_none):
    # A client outside every trusted network: SpamAssassin judges the relay it connected from, as named in
    # the Received field our SMTP server wrote, the field that leads the message spamd is given.
    envelope = Arrival(client_ip="203.0.113.9", client_name=client_name, helo="mail.sender.example",
                        sender="alice@sender.example", recipients=["bob@example.org"], mail_options=[])
    msg = Message(queue_id="0A1B2C3D4E5F", client_ip=envelope.client_ip, client_name=client_name,
                  added_headers=received_header(envelope, "0A1B2C3D4E5F", timezone.now()))
    raw = message(body="Minutes of today's meeting are attached below.\n")
    assert scan_verdict.spamd_input(msg.added_headers, raw).startswith(b"Received: from mail.sender.example (")
    rules = [r["name"] for r in scan_verdict.scan(msg, raw, MailFlowSettings.cached()).spam_rules]
    assert ("RDNS_NONE" in rules) is rdns_none, rules
    assert "NO_RECEIVED" not in rules and "NO_RELAYS" not in rules


def test_learning_teaches_spamd_the_message_as_it_was_scanned(scanners, spamd, gateway_smtp, protected_domain,
                                                              capture_server):
    msg = send(gateway_smtp, message(subject=f"Cheap watches {uuid.uuid4().hex}",
                                     body="Buy cheap replica watches now, limited offer!\n"))
    tasks.learn_message(msg.pk, True)
    scanned = scan_verdict.spamd_input(msg.added_headers, bytes(RawMessage.objects.get(message=msg).data))
    assert scanned.startswith(b"Received: ")
    # Forgotten again (the shared Bayes database keeps only what tests mean to teach it): spamd removes it,
    # so the TELL of learn_message had set it.
    status, headers, _ = spamc(spamd, "TELL", scanned, Message_class="spam", Remove="local")
    assert status.endswith(b" 0 EX_OK") and headers.get("didremove") == "local", (status, headers)


def test_clamd_finds_eicar_in_an_attachment_and_in_a_zip(scanners):
    plain = clamav.scan(message(attachments=[("eicar.com", "application/octet-stream", eicar())]))
    assert plain.infected and plain.virus_names[0].startswith("Eicar-Test-Signature")
    inzip = clamav.scan(message(attachments=[("docs.zip", "application/zip", zipped({"eicar.com": eicar()}))]))
    assert inzip.infected


def test_ham_is_delivered_unchanged_with_our_headers(scanners, gateway_smtp, protected_domain, capture_server,
                                                     corpus):
    path = sorted(corpus("ham/sa2002-easy-ham").iterdir())[0]
    raw = read_mail(path)
    msg = send(gateway_smtp, raw)
    (delivered,) = capture_server.wait_for(1)
    head, original = delivered.data.split(b"X-Mailgate-Queue-ID: ", 1)[0], delivered.data
    assert original.endswith(raw)  # the message itself is untouched
    added = original[: len(original) - len(raw)]
    assert b"Received: from client.example.net" in added
    assert b"X-Spam-Status: No, score=" in added and b"X-Mailgate-Verdict: clean" in head
    msg.refresh_from_db()
    assert msg.state == Message.State.DELIVERED and msg.verdict == "clean"
    assert msg.spam_score is not None and msg.spam_score < 5
    recipient = msg.recipients.get()
    assert recipient.status == Recipient.Status.DELIVERED and recipient.reply_text.startswith("250")


def test_gtube_is_quarantined_with_its_score_and_rule(scanners, gateway_smtp, protected_domain, capture_server,
                                                      corpus):
    msg = send(gateway_smtp, read_mail(corpus(GTUBE_PATH)))
    msg.refresh_from_db()
    assert msg.state == Message.State.QUARANTINED and msg.quarantined
    assert msg.verdict == "high_spam" and msg.spam_score > 900
    gtube = next(r for r in msg.spam_rules if r["name"] == "GTUBE")
    assert gtube["score"] >= 1000 and "Unsolicited Bulk Email" in gtube["description"]
    assert msg.recipients.get().status == Recipient.Status.QUARANTINED
    assert capture_server.messages == []


@pytest.mark.parametrize("wrap", ["base64", "zip"])
def test_eicar_is_quarantined_with_the_virus_name(scanners, gateway_smtp, protected_domain, capture_server, wrap):
    attachment = ("eicar.com", "application/octet-stream", eicar()) if wrap == "base64" else \
        ("files.zip", "application/zip", zipped({"eicar.com": eicar()}))
    msg = send(gateway_smtp, message(subject="Your invoice", attachments=[attachment]))
    msg.refresh_from_db()
    assert msg.verdict == "virus" and msg.state == Message.State.QUARANTINED
    assert msg.virus_names and msg.virus_names[0].startswith("Eicar-Test-Signature")
    assert capture_server.messages == []


def test_exe_in_zip_is_a_blocked_attachment(scanners, gateway_smtp, protected_domain, capture_server):
    raw = message(attachments=[("invoice.zip", "application/zip", zipped({"invoice.pdf.exe": MZ_PROGRAM}))])
    msg = send(gateway_smtp, raw)
    msg.refresh_from_db()
    assert msg.verdict == "blocked_attachment" and msg.state == Message.State.QUARANTINED
    assert any(a["blocked"] and a["name"] == "invoice.pdf.exe" for a in msg.attachments)


def test_spam_is_delivered_tagged(scanners, gateway_smtp, protected_domain, capture_server, settings):
    from gateway.models import MailFlowSettings

    config = MailFlowSettings.load()
    config.spam_threshold, config.high_spam_threshold = -100, 10000  # every message counts as (low) spam
    config.save()
    msg = send(gateway_smtp, message(subject="Cheap watches"))
    (delivered,) = capture_server.wait_for(1)
    assert b"Subject: [SPAM] Cheap watches" in delivered.data
    assert b"X-Spam-Flag: YES" in delivered.data
    msg.refresh_from_db()
    assert msg.verdict == "spam" and msg.action == "tag"
    # The verdict and the delivery's outcome, written together (scan_record.HeldVerdict), reach both rows.
    recipient = msg.recipients.get()
    assert msg.state == Message.State.DELIVERED and msg.spam_score is not None and msg.spam_rules
    assert (recipient.verdict, recipient.action, recipient.status) == ("spam", "tag", Recipient.Status.DELIVERED)


def test_scanner_down_defers_the_scan_and_delivers_once_it_is_back(scanners, gateway_smtp, protected_domain,
                                                                     capture_server, settings, spamd):
    from tests.support.servers import free_port

    settings.SPAMD_URL = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    msg = send(gateway_smtp, message(subject="Waits for spamd"))
    msg.refresh_from_db()
    assert msg.state == Message.State.SCAN_DEFERRED
    assert "spamd" in msg.last_error and msg.next_attempt_at is not None
    assert capture_server.messages == []
    # Still down at the next attempt: still waiting, never delivered unscanned.
    Message.objects.filter(pk=msg.pk).update(next_attempt_at=msg.received_at)
    scans, _ = sweep.due_work()
    assert msg.pk in scans
    assert scan_run.run_scan(msg.pk) == "deferred"
    assert capture_server.messages == []
    # spamd is back: the sweeper's next pass scans and delivers it, once.
    settings.SPAMD_URL = spamd
    Message.objects.filter(pk=msg.pk).update(next_attempt_at=msg.received_at)
    for message_id in sweep.due_work()[0]:
        scan_run.run_scan(message_id)
    for message_id in sweep.due_work()[1]:
        delivery_attempt.run_delivery(message_id)
    assert len(capture_server.wait_for(1)) == 1
    msg.refresh_from_db()
    assert msg.state == Message.State.DELIVERED and msg.attempts == 3
    assert sweep.due_work() == ([], [])
