"""End to end with the real parts: `manage.py runsmtp` and a Celery worker as separate processes,
PostgreSQL, Redis as the broker, spamd, clamd, and a capture server as the organisation's mail server."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from gateway.models import Message, Recipient
from tests.support.appliance import queue_id_of, settled, wait_until
from tests.support.mail import GTUBE_PATH, MZ_PROGRAM, eicar, message, read_mail, zipped
from tests.support.scheduling import thread_policies
from tests.support.servers import free_port

pytestmark = pytest.mark.services


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
