"""The services the tests rely on answer as the rest of the suite expects (integration tests).

They run against the spamd and clamd that `make services` starts (offline configuration) and the
machine's Redis; without them they are skipped, and with CI set they fail.
"""

from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlparse

import pytest

from tests.support import services
from tests.support.services import spamc

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
CLAMAV_TESTFILES = "/usr/share/clamav-testfiles"


def message(subject: str, body: bytes) -> bytes:
    return (
        b"From: Alice Example <alice@example.org>\r\n"
        b"To: bob@example.net\r\n"
        b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        b"Message-ID: <" + uuid.uuid4().hex.encode() + b"@example.org>\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"\r\n" + body + b"\r\n"
    )


def spam_score(url: str, raw: bytes) -> float:
    status, headers, _ = spamc(url, "CHECK", raw)
    assert status.endswith(b" 0 EX_OK"), status
    # Spam: True ; 1000.5 / 5.0
    return float(headers["spam"].split(";")[1].split("/")[0])


class RawClamd:
    """clamd spoken by hand (PING, INSTREAM), so that these tests check the service itself and not
    the gateway's own client in gateway/scan/clamav.py."""

    def __init__(self, url: str):
        self.url = urlparse(url)

    def _ask(self, payload: bytes) -> str:
        if self.url.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(self.url.path)
        else:
            sock = socket.create_connection((self.url.hostname, self.url.port), timeout=10)
        with sock:
            sock.sendall(payload)
            reply = b""
            while not reply.endswith(b"\0"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.rstrip(b"\0").decode()

    def ping(self) -> bool:
        return self._ask(b"zPING\0") == "PONG"

    def scan_stream(self, data: bytes) -> tuple[str, str] | None:
        """("FOUND", signature) or None for a clean stream, as clamd answers "stream: NAME FOUND"."""
        reply = self._ask(b"zINSTREAM\0" + len(data).to_bytes(4, "big") + data + b"\0\0\0\0")
        if reply == "stream: OK":
            return None
        assert reply.endswith(" FOUND"), reply
        return "FOUND", reply.removeprefix("stream: ").removesuffix(" FOUND")


def clamd_client(url: str) -> RawClamd:
    return RawClamd(url)


# --- the helpers themselves ------------------------------------------------------------------------


def test_urls_default_to_the_addresses_of_make_services(monkeypatch):
    for name in ("SPAMD_URL", "CLAMD_URL", "REDIS_URL", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    assert services.spamd_url() == "tcp://127.0.0.1:7830"
    assert services.clamd_url() == "unix:///run/mailgate-clamd/clamd.sock"
    assert services.redis_url() == "redis://127.0.0.1:6379/15"
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:6379/3")
    assert services.redis_url() == "redis://127.0.0.1:6379/3"
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/4")
    monkeypatch.setenv("SPAMD_URL", "tcp://127.0.0.1:783")
    assert services.redis_url() == "redis://127.0.0.1:6379/4"
    assert services.spamd_url() == "tcp://127.0.0.1:783"


@pytest.mark.parametrize("ci", ["", "0", "false"])
def test_a_missing_service_skips_outside_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="spamd at tcp://127.0.0.1:9 does not answer"):
        services.require("spamd", "tcp://127.0.0.1:9")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        services.require_binary("/nonexistent/bin/spamd")
    with pytest.raises(pytest.skip.Exception):
        services.require("clamd", "unix:///nonexistent/clamd.sock")


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_a_missing_service_fails_on_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        services.require("redis", "redis://127.0.0.1:9/0")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        services.require_binary("no-such-program-mailgate")


def test_a_port_that_speaks_another_protocol_is_not_the_service(monkeypatch, redis):
    """Redis answers on its port, but not to the spamd PING: require() must not accept it."""
    monkeypatch.delenv("CI", raising=False)
    redis_port = urlparse(redis).port or 6379
    with pytest.raises(pytest.skip.Exception, match="does not answer"):
        services.require("spamd", f"tcp://127.0.0.1:{redis_port}")


# --- the programs the interop and browser tests drive ---------------------------------------------


@pytest.mark.parametrize(
    "program", [services.CHROMIUM, services.SPAMD, services.SWAKS, services.OPENDKIM_TESTMSG, "spamc", "postconf"]
)
def test_programs_are_installed(program):
    path = services.require_binary(program)
    assert os.access(path, os.X_OK)


# --- clamd ----------------------------------------------------------------------------------------


@pytest.mark.services
def test_clamd_finds_eicar_through_instream(clamd):
    eicar = services.require_corpus("virus/eicar/eicar.com").read_bytes()
    client = clamd_client(clamd)
    assert client.ping()
    status, name = client.scan_stream(eicar)
    assert status == "FOUND"
    assert name.startswith("Eicar-Test-Signature")  # ".UNOFFICIAL": it comes from our local.hdb
    assert client.scan_stream(b"just a harmless text\r\n") is None


@pytest.mark.services
def test_clamd_answers_over_tcp_too(clamd):
    url = services.require("clamd", os.getenv("CLAMD_TCP_URL") or "tcp://127.0.0.1:3310")
    result = clamd_client(url).scan_stream(services.require_corpus("virus/eicar/eicar.com").read_bytes())
    assert result is not None and result[0] == "FOUND"


@pytest.mark.services
@pytest.mark.parametrize("name", ["clam.exe", "clam.zip", "clam.exe.mbox.base64", "clam-upx.exe", "clam.7z"])
def test_clamd_finds_the_clamav_test_files(clamd, name):
    """The offline database catches the harmless clam.exe, also packed, archived and mailed."""
    path = os.path.join(CLAMAV_TESTFILES, name)
    if not os.path.exists(path):
        services.unavailable(f"{path} is missing (Debian package clamav-testfiles)")
    with open(path, "rb") as f:
        status, signature = clamd_client(clamd).scan_stream(f.read())
    assert status == "FOUND"
    assert signature.startswith("ClamAV-Test-File")


# --- spamd ----------------------------------------------------------------------------------------


@pytest.mark.services
def test_spamd_scores_gtube_about_1000(spamd):
    score = spam_score(spamd, message("test", GTUBE))
    assert score > 100


@pytest.mark.services
def test_spamd_scores_plain_ham_low(spamd):
    body = b"Hi Bob,\r\n\r\nthe minutes of Tuesday's meeting are below. See you next week.\r\n\r\nAlice"
    assert spam_score(spamd, message("Minutes of the meeting", body)) < 5


@pytest.mark.services
def test_spamd_scores_the_corpus_gtube_message(spamd):
    raw = services.require_corpus("mime/spamassassin-t-data/t/data/spam/gtube.eml").read_bytes()
    assert spam_score(spamd, raw) > 100


@pytest.mark.services
def test_spamd_answers_quickly_without_dns(spamd):
    """With dns_available no, a message with URLs and a Received chain does not wait on DNS."""
    import time

    raw = (
        b"Received: from mail.example.org (mail.example.org [192.0.2.10])\r\n"
        b"\tby mx.example.net with ESMTP id 1; Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    ) + message("links", b"Visit http://www.example.com/ and https://example.org/offer now")
    started = time.monotonic()
    spam_score(spamd, raw)
    assert time.monotonic() - started < 10


@pytest.mark.services
def test_spamd_learns_through_tell_and_forgets(spamd):
    """--allow-tell with -x: TELL writes the shared Bayes database (bayes_path in local.cf)."""
    raw = message("Cheap watches " + uuid.uuid4().hex, b"Buy cheap replica watches now, limited offer!")
    status, headers, _ = spamc(spamd, "TELL", raw, Message_class="spam", Set="local")
    assert status.endswith(b" 0 EX_OK"), status
    assert headers.get("didset") == "local"
    # Forget it again, so that the shared database only holds what tests meant to teach it.
    status, headers, _ = spamc(spamd, "TELL", raw, Message_class="spam", Remove="local")
    assert status.endswith(b" 0 EX_OK"), status
    assert headers.get("didremove") == "local"


# --- Redis ----------------------------------------------------------------------------------------


@pytest.mark.services
def test_redis_stores_and_returns_a_value(redis):
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis, socket_timeout=3)
    key = f"mailgate-test:{uuid.uuid4().hex}"
    try:
        client.set(key, b"queued", ex=60)
        assert client.get(key) == b"queued"
    finally:
        client.delete(key)
        client.close()
