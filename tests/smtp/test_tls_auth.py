"""STARTTLS on the inbound port, and mail submission (587 STARTTLS, 465 implicit TLS) with SMTP AUTH against the
appliance's users: AUTH is offered and accepted only over TLS, failures are logged and rate-limited, and an
authenticated user may relay to any domain."""

from __future__ import annotations

import smtplib
import ssl

import pytest
from django.contrib.auth import get_user_model

from gateway.models import MailFlowSettings, Message, SMTPPolicy
from tests.support.servers import insecure_tls

pytestmark = pytest.mark.usefixtures("scanners_off")

MAIL = (b"From: Alice <alice@example.org>\r\nTo: friend@foreign.example\r\nSubject: Outbound\r\n"
        b"Message-ID: <out-1@example.org>\r\n\r\nSent from my mail client.\r\n")
PASSWORD = "correct horse battery staple"


@pytest.fixture
def alice(transactional_db):
    return get_user_model().objects.create_user("alice", "alice@example.org", PASSWORD)


@pytest.fixture
def outbound(protected_domain, capture_server):
    config = MailFlowSettings.load()
    config.outbound_relay = capture_server.address  # "the internet" is the capture server
    config.save()
    return capture_server


# --- the inbound port ----------------------------------------------------------------------------------------

def test_starttls_on_the_inbound_port_and_no_auth_there(gateway_smtp_tls, protected_domain, capture_server):
    with gateway_smtp_tls.client() as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        assert client.docmd("AUTH PLAIN AGFsaWNlAHg=")[0] == 503
        client.starttls(context=insecure_tls())
        client.ehlo()
        assert not client.has_extn("starttls")
        assert not client.has_extn("auth")  # an MX takes no logins, not even over TLS
        code, text = client.docmd("AUTH PLAIN AGFsaWNlAHg=")
        assert (code, text) == (503, b"5.5.1 Authentication not enabled")
        # The session after STARTTLS knows its client and takes mail as before.
        client.mail("sender@elsewhere.example")
        assert client.rcpt("bob@example.org")[0] == 250
        assert client.data(b"Subject: over TLS\r\n\r\nhello\r\n")[0] == 250
    message = Message.objects.get()
    assert message.client_ip == "127.0.0.1"
    assert message.checks["tls"] is True and message.checks["tls_cipher"].startswith("TLSv1.")
    received = capture_server.wait_for(1)[0].data
    assert b"with ESMTPS id" in received


def test_a_self_signed_certificate_is_made_on_first_start(settings, gateway_smtp_tls):
    from pathlib import Path

    cert = Path(settings.DATA_DIR) / "tls" / "smtp-selfsigned.crt"
    key = Path(settings.DATA_DIR) / "tls" / "smtp-selfsigned.key"
    assert cert.exists() and key.exists()
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    pem = ssl.get_server_certificate(("127.0.0.1", gateway_smtp_tls.smtps_port))
    assert pem.strip() == cert.read_text().strip()


def test_a_configured_certificate_is_used(settings, tmp_path):
    from gateway.smtp import tls

    tls.generate_self_signed("mx.configured.example", tmp_path / "c.pem", tmp_path / "k.pem")
    settings.SMTP_TLS_CERT, settings.SMTP_TLS_KEY = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    settings.DATA_DIR = tmp_path / "data"
    assert tls.certificate_paths() == (tmp_path / "c.pem", tmp_path / "k.pem")
    assert tls.server_context() is not None
    assert not (tmp_path / "data").exists()


# --- submission ----------------------------------------------------------------------------------------------

def test_auth_is_not_offered_before_starttls(gateway_smtp_tls, alice):
    with gateway_smtp_tls.submission() as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        code, text = client.docmd("AUTH PLAIN " + smtplib_plain("alice", PASSWORD))
        assert code == 530 and text.startswith(b"5.7.0 Must issue a STARTTLS command first")
        assert client.docmd("MAIL FROM:<alice@example.org>")[0] == 530
        client.starttls(context=insecure_tls())
        client.ehlo()
        assert client.has_extn("auth")
        assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}


def test_submission_requires_auth(gateway_smtp_tls, alice):
    with gateway_smtp_tls.submission() as client:
        client.starttls(context=insecure_tls())
        client.ehlo()
        code, text = client.mail("alice@example.org")
        assert (code, text) == (530, b"5.7.0 Authentication required")


def test_failed_auth_is_logged_and_rate_limited(gateway_smtp_tls, alice):
    policy = SMTPPolicy.load()
    policy.auth_max_failures = 3
    policy.save()
    with gateway_smtp_tls.submission() as client:
        client.starttls(context=insecure_tls())
        client.ehlo()
        client.user = "alice"
        for password in ("wrong password", "still wrong"):
            client.password = password
            with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
                client.auth("PLAIN", client.auth_plain)
            assert excinfo.value.smtp_code == 535
            assert excinfo.value.smtp_error == b"5.7.8 Authentication credentials invalid"
        with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
            client.auth("PLAIN", client.auth_plain)
        assert excinfo.value.smtp_code == 421
    refusals = Message.objects.filter(refusal_reason="auth_failed").order_by("id")
    assert refusals.count() == 3
    assert refusals[0].checks["auth"]["login"] == "alice"
    assert refusals[0].checks["auth"]["result"] == "fail"
    assert "wrong password" not in str(refusals[0].checks)
    # Even the right password is refused now, from this address, for the window.
    with gateway_smtp_tls.smtps() as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPException):
            client.login("alice", PASSWORD)


def test_relay_after_auth_on_the_submission_port(gateway_smtp_tls, alice, outbound):
    with gateway_smtp_tls.submission() as client:
        client.starttls(context=insecure_tls())
        client.ehlo()
        assert client.login("alice", PASSWORD)[0] == 235
        client.mail("alice@example.org")
        assert client.rcpt("friend@foreign.example")[0] == 250
        code, text = client.data(MAIL)
        assert code == 250, text
    message = Message.objects.get()
    assert message.authenticated_as == "alice"
    assert message.direction == Message.Direction.OUTBOUND
    assert message.checks["auth"]["result"] == "pass" and message.checks["relay"] == "authenticated"
    delivered = outbound.wait_for(1)[0]
    assert delivered.recipients == ["friend@foreign.example"]
    assert b"with ESMTPSA id" in delivered.data


def test_implicit_tls_with_auth_login_by_email_address(gateway_smtp_tls, alice, outbound):
    with gateway_smtp_tls.smtps() as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        client.user, client.password = "alice@example.org", PASSWORD
        assert client.auth("LOGIN", client.auth_login, initial_response_ok=False)[0] == 235
        client.mail("alice@example.org")
        assert client.rcpt("friend@foreign.example")[0] == 250
        assert client.data(MAIL)[0] == 250
    assert Message.objects.get().authenticated_as == "alice"


def test_unauthenticated_mail_to_a_foreign_domain_is_still_refused(gateway_smtp_tls, protected_domain):
    with gateway_smtp_tls.client() as client:
        client.ehlo()
        client.starttls(context=insecure_tls())
        client.ehlo()
        client.mail("alice@example.org")
        assert client.rcpt("friend@foreign.example")[0] == 550


def smtplib_plain(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()
