"""The SMTP-time checks against the DNS stub: `checks_on` turns the DNS-based checks on for a test, with the
zones of a well-run sending site (GOOD_ZONES) served by `policy_dns`.

The checks are off in every other test (the autouse `smtp_policy_checks_off` of tests/conftest.py), which also
provides these fixtures to every test.
"""

from __future__ import annotations

import pytest

from tests.support.dnsstub import DNSStub


@pytest.fixture(scope="session")
def policy_dns():
    """A DNS stub for the SMTP policy tests (zones set per test by `checks_on`)."""
    with DNSStub() as stub:
        yield stub


# What a well-run sending site publishes: the client 127.0.0.1 is client.example.net (forward-confirmed),
# sender.example has an MX, SPF allowing 127.0.0.0/8 and DMARC p=reject.
GOOD_ZONES = {
    "sender.example": [{"MX": [10, "mx.sender.example"]}, {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}],
    "mx.sender.example": [{"A": "192.0.2.10"}],
    "_dmarc.sender.example": [{"TXT": "v=DMARC1; p=reject"}],
    "client.example.net": [{"A": "127.0.0.1"}, {"A": "127.0.0.2"}],
    "1.0.0.127.in-addr.arpa": [{"PTR": "client.example.net"}],
    "2.0.0.127.in-addr.arpa": [{"PTR": "client.example.net"}],
}


@pytest.fixture
def checks_on(settings, policy_dns):
    """The DNS-based checks on, against the stub (no cache, short timeouts); greylisting stays off unless a
    test turns it on. Returns the stub: `checks_on.set_zones({...})` / `.add(...)` change what it serves."""
    settings.SMTP_DNS_CHECKS = "true"
    settings.DNS_NAMESERVERS = [policy_dns.host]
    settings.DNS_PORT = policy_dns.port
    settings.DNS_TIMEOUT = 0.5
    settings.SMTP_DNS_CACHE_TTL = 0
    policy_dns.set_zones(GOOD_ZONES)
    return policy_dns
