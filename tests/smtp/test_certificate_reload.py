"""SIGHUP makes a running `manage.py runsmtp` read its certificate and key again (what an ACME client's deploy
hook sends after a renewal): a connection already in TLS goes on undisturbed, new connections on the inbound
port (STARTTLS) and on implicit TLS (465) get the new certificate, and an unusable new pair keeps the old one."""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.smtp.tls import generate_self_signed
from tests.support.mail import message
from tests.support.servers import free_port, insecure_tls
from tests.support.services import database_url_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("scanners_off")


def database_url() -> str:
    return database_url_for("a runsmtp process")


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


class Runsmtp:
    def __init__(self, tmp_path: Path, cert: Path, key: Path):
        self.port, self.smtps_port = free_port(), free_port()
        self.log = tmp_path / "runsmtp.log"
        env = {**os.environ, "DATABASE_URL": database_url(), "SMTP_TLS_CERT": str(cert), "SMTP_TLS_KEY": str(key),
               "SMTP_SMTPS_LISTEN": f"127.0.0.1:{self.smtps_port}", "SMTP_REVERSE_DNS": "false",
               "SMTP_POLICY_TTL": "0", "DATA_DIR": str(tmp_path / "data"), "ALLOW_INSECURE_SECRET": "true",
               "CELERY_BROKER_URL": "", "SMTP_HOSTNAME": "mx.example.org"}
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "manage.py", "runsmtp", "--listen",
                                             f"127.0.0.1:{self.port}"], cwd=ROOT, env=env, stdout=out, stderr=out)
        self.wait_for_log("SMTP listening")

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.read_text(errors="replace").count(text) >= count:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"runsmtp exited:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.1)
        raise AssertionError(f"no '{text}' in the log:\n{self.log.read_text(errors='replace')}")

    def starttls(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example.net", timeout=30)
        client.ehlo()
        client.starttls(context=insecure_tls())
        client.ehlo()
        return client

    def implicit_tls_certificate(self) -> bytes:
        with smtplib.SMTP_SSL("127.0.0.1", self.smtps_port, local_hostname="client.example.net", timeout=30,
                              context=insecure_tls()) as client:
            return client.sock.getpeercert(binary_form=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def certificates(tmp_path):
    """The live pair (what SMTP_TLS_CERT/KEY name) and a renewed pair made beside it."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "fullchain.pem", live / "privkey.pem"
    generate_self_signed("old.mx.example.org", cert, key)
    renewed_cert, renewed_key = tmp_path / "renewed.pem", tmp_path / "renewed.key"
    generate_self_signed("new.mx.example.org", renewed_cert, renewed_key)
    return cert, key, renewed_cert, renewed_key


@pytest.fixture
def runsmtp(transactional_db, tmp_path, certificates, protected_domain):
    server = Runsmtp(tmp_path, certificates[0], certificates[1])
    yield server
    server.stop()


def test_sighup_reloads_the_certificate_without_dropping_a_connection(runsmtp, certificates):
    cert, key, renewed_cert, renewed_key = certificates
    old, new = der(cert), der(renewed_cert)
    early = runsmtp.starttls()
    assert early.sock.getpeercert(binary_form=True) == old
    assert runsmtp.implicit_tls_certificate() == old
    early.mail("alice@sender.example")  # a transaction in progress across the reload

    # What certbot's deploy hook does: the renewed files in place, then SIGHUP.
    key.write_bytes(renewed_key.read_bytes())
    cert.write_bytes(renewed_cert.read_bytes())
    runsmtp.process.send_signal(signal.SIGHUP)
    runsmtp.wait_for_log("TLS certificate reloaded")

    with runsmtp.starttls() as late:
        assert late.sock.getpeercert(binary_form=True) == new
        assert late.noop()[0] == 250
    assert runsmtp.implicit_tls_certificate() == new
    # The connection opened before the reload finishes its message, on its own TLS session.
    assert early.sock.getpeercert(binary_form=True) == old
    assert early.rcpt("bob@example.org")[0] == 250
    code, reply = early.data(message())
    assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as "), reply
    early.quit()
    assert runsmtp.process.poll() is None


def test_an_unusable_renewal_keeps_the_certificate_in_use(runsmtp, certificates, tmp_path):
    cert, key, renewed_cert, _ = certificates
    old = der(cert)
    other_key = tmp_path / "other.key"
    generate_self_signed("other.example.org", tmp_path / "other.pem", other_key)
    # A renewal gone wrong: the new certificate with a key that is not its own.
    cert.write_bytes(renewed_cert.read_bytes())
    key.write_bytes(other_key.read_bytes())
    runsmtp.process.send_signal(signal.SIGHUP)
    runsmtp.wait_for_log("the TLS certificate was not reloaded, the one in use is kept")
    with runsmtp.starttls() as client:
        assert client.sock.getpeercert(binary_form=True) == old
    # And a key file that is gone.
    key.unlink()
    runsmtp.process.send_signal(signal.SIGHUP)
    runsmtp.wait_for_log("the TLS certificate was not reloaded, the one in use is kept", count=2)
    assert runsmtp.implicit_tls_certificate() == old
    assert runsmtp.process.poll() is None
