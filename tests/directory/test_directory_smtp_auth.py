"""SMTP AUTH on the submission ports against the directories (the real slapd and Dovecot): the same logins as the
web, through the same throttle; an LDAP user sends as any address their entry holds, and as nothing else."""

from __future__ import annotations

import smtplib

import pytest
from django.test import Client

from gateway.models import MailFlowSettings, Message, SMTPPolicy
from tests.support.directory import PASSWORDS
from tests.support.servers import insecure_tls

pytestmark = pytest.mark.usefixtures("scanners_off")


def mail(sender: str) -> bytes:
    return (f"From: {sender}\r\nTo: friend@foreign.example\r\nSubject: From the directory\r\n"
            f"Message-ID: <auth-{abs(hash(sender))}@example.edu>\r\n\r\nHello.\r\n").encode()


@pytest.fixture
def outbound(capture_server, transactional_db):
    config = MailFlowSettings.load()
    config.outbound_relay = capture_server.address
    config.save()
    return capture_server


def submit(server, login: str, password: str, sender: str) -> tuple[int, int]:
    """AUTH as login over STARTTLS on the submission port, then one message from sender: (AUTH code, DATA code)."""
    with server.submission() as client:
        client.starttls(context=insecure_tls())
        client.ehlo()
        client.user, client.password = login, password
        try:
            code = client.auth("PLAIN", client.auth_plain)[0]
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, 0
        client.mail(sender)
        client.rcpt("friend@foreign.example")
        return code, client.data(mail(sender))[0]


def test_an_ldap_user_submits_mail_as_their_own_addresses(gateway_smtp_tls, ldap_directory, outbound):
    assert submit(gateway_smtp_tls, "alice", PASSWORDS["alice"], "alice@example.edu") == (235, 250)
    message = Message.objects.get()
    assert message.authenticated_as == "alice@example.edu"
    assert message.checks["auth"]["result"] == "pass"
    # An alias from the directory is one's own to send as; another person's address is not (carol is a user;
    # alice, a domain administrator of example.edu, may send as its addresses).
    assert submit(gateway_smtp_tls, "alice@example.edu", PASSWORDS["alice"], "a.liddell@example.edu") == (235, 250)
    assert submit(gateway_smtp_tls, "carol", PASSWORDS["carol"], "info@example.edu") == (235, 250)
    with gateway_smtp_tls.submission() as client:
        client.starttls(context=insecure_tls())
        client.ehlo()
        client.login("carol", PASSWORDS["carol"])
        code, text = client.mail("alice@example.edu")
        assert code == 553 and b"5.7.1" in text, (code, text)
    assert len(outbound.wait_for(3)) == 3


def test_an_imap_user_submits_mail(gateway_smtp_tls, imap_directory, outbound):
    assert submit(gateway_smtp_tls, "dave@example.org", PASSWORDS["dave@example.org"], "dave@example.org") == (235, 250)
    assert Message.objects.get().authenticated_as == "dave@example.org"
    assert submit(gateway_smtp_tls, "erin@example.org", "not-erins", "erin@example.org") == (535, 0)


def test_a_wrong_directory_password_is_refused_and_counted_with_the_web_logins(gateway_smtp_tls, ldap_directory,
                                                                              settings):
    settings.LOGIN_THROTTLE_PAIR_FAILURES = 3
    SMTPPolicy.objects.update_or_create(pk=1, defaults={"auth_max_failures": 0})  # only the shared throttle
    for _ in range(2):
        response = Client(REMOTE_ADDR="127.0.0.1").post("/login/", {"username": "bob", "password": "nope"})
        assert response.status_code == 200
    # The third failure of bob from 127.0.0.1, two on the web and this one over SMTP, reaches the limit: 421, and
    # the right password is refused after it.
    assert submit(gateway_smtp_tls, "bob", "still-not-it", "bob@example.edu") == (421, 0)
    assert submit(gateway_smtp_tls, "bob", PASSWORDS["bob"], "bob@example.edu") == (421, 0)
    refusals = Message.objects.filter(refusal_reason="auth_failed")
    assert refusals.count() == 2 and refusals.order_by("id").last().checks["auth"]["throttled"] is True
