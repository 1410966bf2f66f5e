"""The mail log in Postfix's shape (gateway/maillog.py): the lines of an accepted, a refused, a deferred and a
bounced message as our SMTP server and delivery write them, read back by Debian's pflogsumm; LOG_SYSLOG sending
them to syslog with facility mail; `manage.py maillog --follow`."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import maillog
from gateway.models import MailFlowSettings, Message, Route
from tests.support.mail import message
from tests.support.servers import free_port, send
from tests.support.services import database_url_for, require_binary

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("scanners_off")


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def matching(path: Path, pattern: str) -> list[str]:
    return [line for line in lines_of(path) if re.search(pattern, line)]


SYSLOG_PREFIX = r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d mx1 mailgate/(\w+)\[\d+\]: "


def test_an_accepted_and_delivered_message(gateway_smtp, protected_domain, capture_server, mail_log):
    raw = message(subject="Hello")
    msg = send(gateway_smtp, raw)
    assert msg.recipients.get().status == "delivered"
    q = msg.queue_id
    lines = lines_of(mail_log)
    assert all(re.match(SYSLOG_PREFIX, line) for line in lines), lines
    (client,) = matching(mail_log, rf"mailgate/smtpd\[\d+\]: {q}: client=")
    assert client.endswith(f"{q}: client=unknown[127.0.0.1]")
    (queued,) = matching(mail_log, rf"mailgate/qmgr\[\d+\]: {q}: from=")
    assert queued.endswith(f"{q}: from=<alice@sender.example>, size={len(raw)}, nrcpt=1 (queue active)")
    (sent,) = matching(mail_log, rf"mailgate/smtp\[\d+\]: {q}: to=")
    assert re.search(rf"{q}: to=<bob@example.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{capture_server.port}, "
                     r"delay=[\d.e-]+, dsn=2\.0\.0, status=sent \(250 2\.0\.0 captured\)$", sent), sent
    (scanned,) = matching(mail_log, rf"mailgate/scan\[\d+\]: {q}: ")
    assert "verdict=clean, action=deliver" in scanned


def test_a_refused_recipient(gateway_smtp, protected_domain, mail_log):
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("spammer@outside.example")
        code, _ = client.rcpt("victim@foreign.example")
        assert code == 550
        code, _ = client.rcpt("nobody@example.org")  # example.org takes any recipient (no list): accepted
        assert code == 250
    (line,) = matching(mail_log, r"NOQUEUE: reject:")
    assert re.match(SYSLOG_PREFIX + r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.1\]: 550 5\.7\.1 "
                    r"<victim@foreign\.example>: Relay access denied; from=<spammer@outside\.example> "
                    r"to=<victim@foreign\.example> proto=ESMTP helo=<client\.example\.net>$", line), line
    assert re.match(SYSLOG_PREFIX, line).group(1) == "smtpd"


def test_a_deferred_and_a_bounced_recipient(gateway_smtp, protected_domain, capture_server, mail_log):
    config = MailFlowSettings.load()
    config.outbound_relay = capture_server.address  # the DSN to the sender leaves this way
    config.save()
    capture_server.handler.data_script = ["451 4.3.0 try again later"]
    deferred = send(gateway_smtp, message())
    (line,) = matching(mail_log, rf"{deferred.queue_id}: to=")
    assert re.search(rf"to=<bob@example.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{capture_server.port}, "
                     r"delay=[\d.e-]+, dsn=4\.3\.0, status=deferred \(451 4\.3\.0 try again later\)$", line), line

    capture_server.handler.rcpt_script = {"gone@example.org": ["550 5.1.1 <gone@example.org>: no such user"]}
    bounced = send(gateway_smtp, message(to="gone@example.org"), to=("gone@example.org",))
    (line,) = matching(mail_log, rf"{bounced.queue_id}: to=")
    assert re.search(r"to=<gone@example.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, delay=[\d.e-]+, dsn=5\.1\.1, "
                     r"status=bounced \(550 5\.1\.1 <gone@example.org>: no such user\)$", line), line
    (notice,) = matching(mail_log, rf"mailgate/bounce\[\d+\]: {bounced.queue_id}: sender non-delivery notification: ")
    dsn_id = notice.rsplit(" ", 1)[1]
    assert Message.objects.get(queue_id=dsn_id).direction == Message.Direction.DSN
    assert matching(mail_log, rf"{dsn_id}: to=<alice@sender.example>, .*status=sent")


def test_a_route_that_refuses_connections_is_deferred_with_its_relay(gateway_smtp, protected_domain, mail_log):
    Route.objects.filter(pk=protected_domain.route_id).update(port=free_port())  # nothing listens there
    msg = send(gateway_smtp, message())
    (line,) = matching(mail_log, rf"{msg.queue_id}: to=")
    assert re.search(r"relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, delay=[\d.e-]+, dsn=4\.\d\.\d, status=deferred \(451 ",
                     line), line


def test_pflogsumm_counts_what_the_gateway_did(gateway_smtp, protected_domain, capture_server, mail_log):
    pflogsumm = require_binary("pflogsumm")
    send(gateway_smtp, message(subject="one"))
    send(gateway_smtp, message(subject="two"), to=("bob@example.org", "carol@example.org"))
    capture_server.handler.data_script = ["451 4.3.0 try again later"]
    send(gateway_smtp, message(subject="three"))
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("spammer@outside.example")
        assert client.rcpt("victim@foreign.example")[0] == 550
    report = subprocess.run([pflogsumm, "--syslog-name=mailgate", str(mail_log)], capture_output=True, text=True,
                            timeout=60, check=True).stdout

    def count(what: str) -> int:
        found = re.search(rf"^\s*(\d+)\s+{what}\b", report, re.M)
        assert found, f"no '{what}' in pflogsumm's report:\n{report}"
        return int(found.group(1))

    assert count("received") == 3
    assert count("delivered") == 3  # one, and two's two recipients
    assert count("deferred") == 1
    assert count("bounced") == 0
    assert count("rejected") == 1
    assert "sender.example" in report  # the senders by domain: the from= lines were read with their sizes
    assert "Relay access denied" in report


def test_control_characters_from_a_client_stay_on_their_line(mail_log):
    maillog.auth_failed(client_name="evil]\n[6.6.6.6", client_ip="192.0.2.9", mechanism="PLAIN",
                        username="bob\nDec  7 17:40:01 mx1 mailgate/smtpd[1]: warning: unknown[6.6.6.6]: x")
    (line,) = lines_of(mail_log)
    assert "warning: unknown[192.0.2.9]: SASL PLAIN authentication failed: user=<bob\\x0aDec" in line


def test_log_syslog_sends_the_lines_to_syslog_with_facility_mail(tmp_path):
    path = str(tmp_path / "log.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    env = {**os.environ, "LOG_SYSLOG": "true", "LOG_SYSLOG_ADDRESS": path, "ALLOW_INSECURE_SECRET": "true",
           "DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": ""}
    code = ("from gateway import maillog; maillog.accepted('4ABC', client_name='mail.example.net', "
            "client_ip='192.0.2.7', sender='a@example.net', size=10, recipients=1); "
            "maillog.auth_failed(client_name=None, client_ip='192.0.2.9', mechanism='LOGIN', username='bob')")
    subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=env, check=True, timeout=60,
                   capture_output=True)
    receiver.settimeout(5)
    datagrams = [receiver.recv(4096) for _ in range(3)]
    receiver.close()
    # <PRI> = facility * 8 + severity: mail (2) and info (6) = 22, mail and warning (4) = 20.
    assert re.match(rb"<22>mailgate/smtpd\[\d+\]: 4ABC: client=mail\.example\.net\[192\.0\.2\.7\]\x00$", datagrams[0])
    assert re.match(rb"<22>mailgate/qmgr\[\d+\]: 4ABC: from=<a@example\.net>, size=10, nrcpt=1", datagrams[1])
    assert re.match(rb"<20>mailgate/smtpd\[\d+\]: warning: unknown\[192\.0\.2\.9\]: SASL LOGIN authentication "
                    rb"failed: user=<bob>", datagrams[2])


def test_a_bad_syslog_address_is_a_clear_error():
    with pytest.raises(ValueError, match="LOG_SYSLOG_ADDRESS"):
        maillog.syslog_address("localhost")
    assert maillog.syslog_address("127.0.0.1:514") == ("127.0.0.1", 514)
    assert maillog.syslog_address("/dev/log") == "/dev/log"


# --- manage.py maillog --follow ------------------------------------------------------------------------------

def database_url() -> str:
    return database_url_for("maillog --follow")


def read_record(process: subprocess.Popen, timeout: float = 20) -> dict:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "maillog --follow printed nothing"
    return json.loads(process.stdout.readline())


def test_maillog_follow_prints_new_messages_and_changes_of_state(transactional_db, tmp_path):
    first = Message.objects.create(node="mx1", state=Message.State.RECEIVED, envelope_sender="a@example.net")
    env = {**os.environ, "DATABASE_URL": database_url(), "ALLOW_INSECURE_SECRET": "true"}
    process = subprocess.Popen([sys.executable, "manage.py", "maillog", "--follow", "--interval", "0.2"], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert read_record(process)["id"] == first.queue_id
        second = Message.objects.create(node="mx2", state=Message.State.REFUSED, envelope_sender="b@example.net")
        record = read_record(process)
        assert (record["id"], record["node"], record["state"]) == (second.queue_id, "mx2", "refused")
        Message.objects.filter(pk=first.pk).update(state=Message.State.DELIVERED)
        record = read_record(process)
        assert (record["id"], record["state"]) == (first.queue_id, "delivered")
        time.sleep(1)  # nothing changes: nothing more is printed
        assert select.select([process.stdout], [], [], 0)[0] == []
    finally:
        process.terminate()
        process.wait(10)


def test_maillog_filters_by_node(transactional_db, capsys):
    from django.core.management import call_command

    Message.objects.create(node="mx1", state=Message.State.REFUSED)
    wanted = Message.objects.create(node="mx2", state=Message.State.REFUSED)
    call_command("maillog", "--node", "mx2")
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in records] == [wanted.queue_id]
