"""No open relay, whatever the client tries: every trick of the address syntax is refused at RCPT and logged,
and mail for our domains in its harmless variants (case, a trailing dot) still gets in."""

from __future__ import annotations

import pytest
from django.conf import settings

from gateway.models import Message
from tests.support.servers import insecure_tls

pytestmark = pytest.mark.usefixtures("scanners_off")

TRICKS = {
    "percent hack": "user%foreign.example@example.org",
    "percent hack, mixed case": "User%FOREIGN.Example@EXAMPLE.org",
    "bang path": "foreign.example!user@example.org",
    "bang path, two hops": "a.example!b.example!user@example.org",
    "source route": "@example.org:user@foreign.example",
    "source route, two hops": "@example.org,@mx.example.org:user@foreign.example",
    "quoted local part with @": '"user@foreign.example"@example.org',
    "quoted local part with %": '"user%foreign.example"@example.org',
    "unquoted @ in the local part": "user@foreign.example@example.org",
    "address literal": "user@[192.0.2.1]",
    "address literal of our own IP": "user@[127.0.0.1]",
    "IPv6 literal": "user@[IPv6:::1]",
    "bare IP address": "user@127.0.0.1",
    "foreign domain with a trailing dot": "user@foreign.example.",
    "foreign domain, mixed case": "USER@Foreign.EXAMPLE",
    "our domain as a subdomain of a foreign one": "user@example.org.foreign.example",
    "a foreign subdomain of ours? no: a suffix trick": "user@evilexample.org",
    "our host name": "user@SMTP_HOSTNAME",
    "localhost": "user@localhost",
    "double trailing dot": "user@example.org..",
}


@pytest.mark.parametrize("address", TRICKS.values(), ids=TRICKS.keys())
def test_relay_trick_refused_and_logged(gateway_smtp, protected_domain, address):
    address = address.replace("SMTP_HOSTNAME", settings.SMTP_HOSTNAME)
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("spammer@outside.example")
        code, reply = client.docmd(f"RCPT TO:<{address}>")
    assert code in (550, 553, 554), (code, reply)
    assert reply[:4] in (b"5.7.", b"5.1."), reply
    message = Message.objects.get(state=Message.State.REFUSED)
    assert message.refusal_reason in ("relay_denied", "bad_recipient")
    assert message.smtp_reply.startswith(str(code))
    assert not Message.objects.exclude(state=Message.State.REFUSED).exists()


@pytest.mark.parametrize("address", ["bob@example.org", "Bob@EXAMPLE.ORG", "bob@example.org.", '"bob"@example.org'])
def test_our_domain_in_its_harmless_variants(gateway_smtp, protected_domain, address):
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("alice@sender.example")
        assert client.docmd(f"RCPT TO:<{address}>")[0] == 250


def test_tricks_refused_after_starttls_too(gateway_smtp_tls, protected_domain):
    with gateway_smtp_tls.client() as client:
        client.starttls(context=insecure_tls())
        client.ehlo()
        client.mail("spammer@outside.example")
        for address in TRICKS.values():
            address = address.replace("SMTP_HOSTNAME", settings.SMTP_HOSTNAME)
            assert client.docmd(f"RCPT TO:<{address}>")[0] in (550, 553, 554), address


def test_auth_not_offered_before_starttls_on_any_port(gateway_smtp_tls):
    for connect in (gateway_smtp_tls.client, gateway_smtp_tls.submission):
        with connect() as client:
            client.ehlo()
            assert not client.has_extn("auth")
            assert client.docmd("AUTH LOGIN")[0] in (503, 530, 538)
