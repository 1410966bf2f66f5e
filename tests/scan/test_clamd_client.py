"""Our own clamd client (issue 15, item 9): zINSTREAM in chunks written whole (sendall), one deadline for each
exchange honoured exactly and never retried, PING and VERSION; and clamd's limits (item 6): a message larger
than clamd takes is unscannable, never delivered unscanned, and the size limits are checked at start.

Against the real clamd (Unix socket and TCP) where it can answer; a loopback server of the test's own where
clamd would have to misbehave (never answer, never read, answer an error)."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time

import pytest
from django.core import checks

from gateway.models import MailFlowSettings, Message, Verdict
from gateway.scan import ScannerUnavailable, clamav
from gateway.scan import verdict as scan_verdict
from tests.support.mail import eicar, message, zipped
from tests.support.services import require


class LoopbackServer:
    """A TCP server on 127.0.0.1 that accepts and then does what `serve(connection)` does."""

    def __init__(self, serve):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.connections: list[socket.socket] = []
        self.serve = serve
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.connections.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def loopback():
    servers = []

    def start(serve):
        servers.append(LoopbackServer(serve))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def silent(conn: socket.socket) -> None:
    """Accepts, reads what it is sent, never answers."""
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


def deaf(conn: socket.socket) -> None:
    """Accepts and neither reads nor answers: the client's writes block once the buffers are full."""
    time.sleep(30)


def answering(reply: bytes):
    """Reads one zINSTREAM to its end marker, then answers `reply`."""
    def serve(conn: socket.socket) -> None:
        data = b""
        while not data.endswith(b"\0\0\0\0"):
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        conn.sendall(reply)
    return serve


# --- One deadline, honoured exactly -----------------------------------------------------------------------

def test_a_clamd_that_never_answers_is_given_up_after_the_timeout_once(settings, loopback):
    settings.SCANNER_TIMEOUT = 1.0
    server = loopback(silent)
    started = time.monotonic()
    with pytest.raises(ScannerUnavailable, match="clamd at tcp://127.0.0.1"):
        clamav.scan(message(subject="Waits"), url=server.url)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 1.5, elapsed  # once, not five times
    assert server.accepted == 1


def test_a_clamd_that_never_reads_is_given_up_after_the_timeout(settings, loopback):
    settings.SCANNER_TIMEOUT = 1.0
    server = loopback(deaf)
    started = time.monotonic()
    with pytest.raises(ScannerUnavailable):
        clamav.scan(b"x" * (16 * 1024 * 1024), url=server.url)  # more than the socket buffers hold
    assert 1.0 <= time.monotonic() - started < 1.5


def test_a_hung_clamd_defers_the_scan(settings, loopback, db):
    settings.SCANNER_TIMEOUT = 1.0
    settings.CLAMD_URL = loopback(silent).url
    settings.SPAMD_URL = ""
    with pytest.raises(ScannerUnavailable):
        scan_verdict.scan(Message(queue_id="0A1B2C3D4E5F"), message(), MailFlowSettings.cached())


def test_nothing_listening_is_unavailable_at_once(settings):
    from tests.support.servers import free_port

    started = time.monotonic()
    with pytest.raises(ScannerUnavailable):
        clamav.scan(b"data", url=f"tcp://127.0.0.1:{free_port()}")
    with pytest.raises(ScannerUnavailable):
        clamav.scan(b"data", url="unix:///nonexistent/clamd.sock")
    assert time.monotonic() - started < 0.5
    assert clamav.ping(f"tcp://127.0.0.1:{free_port()}") is False


@pytest.mark.parametrize(("reply", "match"), [
    (b"stream: Can't allocate memory ERROR\0", "Can't allocate memory"),
    (b"what is this\0", "unexpected reply"),
])
def test_an_error_or_a_reply_that_makes_no_sense_is_unavailable_not_clean(settings, loopback, reply, match):
    server = loopback(answering(reply))
    with pytest.raises(ScannerUnavailable, match=match):
        clamav.scan(b"data", url=server.url)
    assert server.accepted == 1  # not tried again


def test_clamds_own_limit_reached_is_unscannable_not_a_virus(loopback):
    server = loopback(answering(b"stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND\0"))
    result = clamav.scan(b"data", url=server.url)
    assert not result.infected and "Heuristics.Limits.Exceeded.MaxFileSize" in result.unscannable[0]


# --- The protocol ---------------------------------------------------------------------------------------------

def slow_reader(received: list[bytes]):
    """Reads a zINSTREAM a few bytes at a time through a small receive buffer, so that the client's writes
    are taken in part only, and answers OK once the stream ends."""
    def serve(conn: socket.socket) -> None:
        data = b""
        while True:
            chunk = conn.recv(1024)
            if not chunk:
                return
            data += chunk
            if data.endswith(b"\0\0\0\0") and len(data) > 20:
                received.append(data)
                conn.sendall(b"stream: OK\0")
                return
    return serve


def unframed(data: bytes) -> bytes:
    """The stream's content from a zINSTREAM: the command, then chunks each after its 4-byte length."""
    assert data.startswith(b"zINSTREAM\0")
    pos, content = len(b"zINSTREAM\0"), b""
    while True:
        (length,) = struct.unpack("!L", data[pos:pos + 4])
        pos += 4
        if not length:
            assert pos == len(data)
            return content
        content += data[pos:pos + length]
        pos += length


def test_every_byte_is_sent_in_its_frame_however_slowly_clamd_reads(loopback):
    received: list[bytes] = []
    server = loopback(slow_reader(received))
    content = os.urandom(3 * 1024 * 1024 + 17)
    assert clamav.scan(content, url=server.url).infected is False
    assert unframed(received[0]) == content


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_large_message_reaches_clamd_whole(settings, clamd, transport):
    url = clamd if transport == "unix" else require("clamd", os.getenv("CLAMD_TCP_URL") or "tcp://127.0.0.1:3310")
    filler = os.urandom(12 * 1024 * 1024)
    raw = message(attachments=[("data.bin", "application/octet-stream", filler),
                               ("eicar.com", "application/octet-stream", eicar())])
    result = clamav.scan(raw, url=url)
    assert result.infected and result.virus_names[0].startswith("Eicar-Test-Signature")


def test_ping_and_version(clamd):
    assert clamav.ping(clamd)
    assert clamav.version(clamd).startswith("ClamAV ")


def test_the_streams_of_one_message_share_one_connection(settings, clamd, monkeypatch, db):
    settings.CLAMD_URL, settings.SPAMD_URL = clamd, ""
    opened = []
    connect = clamav._connect
    monkeypatch.setattr(clamav, "_connect", lambda *a: opened.append(1) or connect(*a))
    raw = message(attachments=[("a.zip", "application/zip", zipped({"one.txt": b"1", "two.txt": b"2"})),
                               ("notes.txt", "text/plain", b"some notes")])
    outcome = scan_verdict.scan(Message(queue_id="0A1B2C3D4E5F"), raw, MailFlowSettings.cached())
    assert outcome.verdict == Verdict.CLEAN and len(opened) == 1


# --- Too big for clamd (item 6) -----------------------------------------------------------------------------

def test_a_message_over_clamds_stream_limit_is_unscannable_not_sent(settings, clamd, db):
    settings.CLAMD_URL, settings.SPAMD_URL = clamd, ""
    settings.CLAMD_STREAM_MAX_LENGTH = 10_000
    outcome = scan_verdict.scan(Message(queue_id="0A1B2C3D4E5F"), message(body="x" * 20_000 + "\n"),
                                MailFlowSettings.cached())
    assert outcome.verdict == Verdict.UNSCANNABLE
    assert any("more than clamd takes (CLAMD_STREAM_MAX_LENGTH 10000)" in note for note in outcome.notes)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_message_clamd_refuses_for_its_size_is_unscannable(settings, clamd, transport, db):
    """clamd's StreamMaxLength (50M in .ci/services.sh) below CLAMD_STREAM_MAX_LENGTH: clamd reads no further and
    says so; the message is unscannable, not clean with a note and not a scan tried again for ever."""
    url = clamd if transport == "unix" else require("clamd", os.getenv("CLAMD_TCP_URL") or "tcp://127.0.0.1:3310")
    settings.CLAMD_URL, settings.SPAMD_URL = url, ""
    settings.CLAMD_STREAM_MAX_LENGTH = 200 * 1024 * 1024
    raw = b"From: alice@sender.example\r\nSubject: Long\r\n\r\n" + b"A long letter.\r\n" * (4 * 1024 * 1024)  # 64 MiB
    outcome = scan_verdict.scan(Message(queue_id="0A1B2C3D4E5F"), raw, MailFlowSettings.cached())
    assert outcome.verdict == Verdict.UNSCANNABLE
    assert any("refused by clamd for its size" in note for note in outcome.notes), outcome.notes


def test_the_start_up_check_compares_the_message_size_with_clamds_limit(settings, db):
    settings.CLAMD_URL = "unix:///run/clamav/clamd.ctl"
    settings.CLAMD_STREAM_MAX_LENGTH = 25 * 1024 * 1024
    assert [m.id for m in checks.run_checks(tags=["mailgate"])] == []  # the default size: 25 MiB
    config = MailFlowSettings.load()
    config.max_message_size = 40 * 1024 * 1024
    config.save()
    (warning,) = checks.run_checks(tags=["mailgate"])
    assert warning.id == "mailgate.W001" and "41943040" in warning.msg and "26214400" in warning.msg
    settings.CLAMD_URL = ""
    assert checks.run_checks(tags=["mailgate"]) == []


def test_the_check_says_nothing_while_the_table_is_not_there(settings, db, monkeypatch):
    from django.db import ProgrammingError

    settings.CLAMD_URL = "unix:///run/clamav/clamd.ctl"

    def not_migrated(*args, **kwargs):
        raise ProgrammingError('relation "gateway_mailflowsettings" does not exist')

    monkeypatch.setattr(MailFlowSettings.objects, "filter", not_migrated)
    assert checks.run_checks(tags=["mailgate"]) == []


def test_a_limit_that_is_not_a_positive_number_is_an_error(settings):
    settings.CLAMD_URL = ""
    settings.SCAN_MAX_PARTS = 0
    assert [m.id for m in checks.run_checks(tags=["mailgate"])] == ["mailgate.E001"]


def test_the_worker_says_so_in_its_log_as_it_starts(settings, transactional_db, caplog, monkeypatch):
    from appliance import celery
    from gateway import checks as gateway_checks

    settings.CLAMD_URL = "unix:///run/clamav/clamd.ctl"
    config = MailFlowSettings.load()
    config.max_message_size = 40 * 1024 * 1024
    config.save()
    with caplog.at_level(logging.WARNING, logger="gateway.checks"):
        gateway_checks.warn_about_scan_limits()
    assert "larger messages will be held as unscannable" in caplog.text
    # ... called as the Celery worker starts (its other start-up work left out here: it is the process's own).
    called = []
    monkeypatch.setattr(gateway_checks, "warn_about_scan_limits", lambda: called.append(1))
    monkeypatch.setattr("appliance.scheduling.schedule_mail_path", lambda name: None)
    monkeypatch.setattr(celery, "worker_commits_asynchronously", lambda: None)
    celery._worker_init()
    assert called == [1]
