"""DKIM signing of our outgoing mail: `manage.py dkim genkey` makes the key and prints the record; mail that an
authenticated user (or a trusted network) sends from our domain leaves signed, and the signature verifies with
the published key (served by the DNS stub) and fails once a byte of the body changes."""

from __future__ import annotations

import io
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from gateway.mailauth import dkim
from gateway.mailauth.dns import Resolver
from gateway.models import DKIMKey, MailFlowSettings, Message, TrustedNetwork
from tests.support.servers import insecure_tls

pytestmark = pytest.mark.usefixtures("scanners_off")

PASSWORD = "correct horse battery staple"
MAIL = (b"From: Alice <alice@example.org>\r\nTo: friend@foreign.example\r\nSubject: Signed\r\n"
        b"Message-ID: <signed-1@example.org>\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\n\r\n"
        b"This message is ours, and says so.\r\n")


def genkey(*args: str) -> str:
    out = io.StringIO()
    call_command("dkim", "genkey", *args, stdout=out)
    return out.getvalue()


def published(output: str) -> tuple[str, str]:
    """(record name, TXT value) from the zone file line genkey printed."""
    line = next(line for line in output.splitlines() if " IN TXT " in line)
    name = line.split()[0].rstrip(".")
    return name, "".join(re.findall(r'"([^"]*)"', line))


@pytest.mark.django_db
def test_genkey_stores_the_key_and_prints_the_record(protected_domain):
    output = genkey("example.org")
    name, txt = published(output)
    assert name == "mailgate._domainkey.example.org"
    assert txt.startswith("v=DKIM1; k=rsa; p=")
    key = DKIMKey.objects.get()
    assert key.public_txt == txt and key.algorithm == "rsa-sha256" and key.active
    assert "PRIVATE KEY" in key.private_key and "PRIVATE KEY" not in output
    # A second key (rotation) needs its own selector, and becomes the one that signs.
    with pytest.raises(CommandError, match="exists already"):
        genkey("example.org")
    output = genkey("example.org", "--selector", "2027", "--algorithm", "ed25519")
    assert "k=ed25519" in output
    assert list(DKIMKey.objects.filter(active=True).values_list("selector", flat=True)) == ["2027"]
    with pytest.raises(CommandError, match="not a protected domain"):
        genkey("foreign.example")


@pytest.fixture
def signing_setup(settings, checks_on, protected_domain, capture_server):
    """alice@example.org may submit; example.org has a key published in the stub; the internet is the capture
    server."""
    get_user_model().objects.create_user("alice", "alice@example.org", PASSWORD)
    config = MailFlowSettings.load()
    config.outbound_relay = capture_server.address
    config.save()
    name, txt = published(genkey("example.org", "--selector", "s2026"))
    checks_on.add(name, {"TXT": [txt[i:i + 255] for i in range(0, len(txt), 255)]})
    return Resolver(nameservers=[checks_on.host], port=checks_on.port, timeout=2)


def test_mail_submitted_over_tls_leaves_dkim_signed(gateway_smtp_tls, signing_setup, capture_server):
    with gateway_smtp_tls.submission() as client:
        client.starttls(context=insecure_tls())
        client.ehlo()
        client.login("alice", PASSWORD)
        client.mail("alice@example.org")
        assert client.rcpt("friend@foreign.example")[0] == 250
        assert client.data(MAIL)[0] == 250
    delivered = capture_server.wait_for(1)[0]
    assert delivered.recipients == ["friend@foreign.example"]
    assert delivered.data.startswith(b"DKIM-Signature: ")
    [result] = dkim.verify(delivered.data, signing_setup)
    assert (result.result, result.domain, result.selector) == ("pass", "example.org", "s2026")
    # One byte of the body changed: the signature fails.
    tampered = delivered.data.replace(b"says so.", b"says no.")
    assert [r.result for r in dkim.verify(tampered, signing_setup)] == ["fail"]
    assert Message.objects.get().state == Message.State.DELIVERED


def test_ed25519_signatures_too(gateway_smtp_tls, signing_setup, capture_server, checks_on):
    name, txt = published(genkey("example.org", "--selector", "ed", "--algorithm", "ed25519"))
    checks_on.add(name, {"TXT": txt})
    with gateway_smtp_tls.smtps() as client:
        client.login("alice", PASSWORD)
        client.sendmail("alice@example.org", ["friend@foreign.example"], MAIL)
    data = capture_server.wait_for(1)[0].data
    [result] = dkim.verify(data, signing_setup)
    assert (result.result, result.algorithm, result.selector) == ("pass", "ed25519-sha256", "ed")


def test_mail_from_a_trusted_network_is_signed(gateway_smtp, signing_setup, capture_server):
    TrustedNetwork.objects.create(network="127.0.0.0/8")
    with gateway_smtp.client() as client:
        client.sendmail("alice@example.org", ["friend@foreign.example"], MAIL)
    [result] = dkim.verify(capture_server.wait_for(1)[0].data, signing_setup)
    assert result.result == "pass"


def test_mail_from_outside_claiming_our_domain_is_not_signed(settings, gateway_smtp, signing_setup,
                                                             capture_server):
    settings.SMTP_DNS_CHECKS = "false"  # this forged sender would fail SPF and DMARC of example.org otherwise
    with gateway_smtp.client() as client:
        client.sendmail("alice@example.org", ["bob@example.org"], MAIL.replace(b"friend@foreign", b"bob@example"))
    data = capture_server.wait_for(1)[0].data
    assert b"DKIM-Signature:" not in data.split(b"\r\n\r\n")[0]
