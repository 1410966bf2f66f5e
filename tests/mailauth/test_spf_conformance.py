"""The OpenSPF RFC 7208 test suite, every test, against `gateway.mailauth.spf.check_spf`.

The suite (``../shared/corpus/auth/spf/rfc7208-tests.yml``, 16 scenarios, 203 tests) gives each scenario its fake
DNS as ``zonedata``; the DNS stub serves it on 127.0.0.1, with the suite's rule that SPF-type records are also
served as TXT when a name has no TXT entry. A test passes when our result is one of the expected results and,
where the suite gives one, the explanation matches (the suite's default explanation is the string "DEFAULT").

Tests that cannot pass are listed in XFAIL with the reason (strict: one that starts passing fails the run, so
the list stays true); docs/conformance.md keeps the figures.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import spf as pyspf
import yaml

from gateway.mailauth import spf as authspf
from gateway.mailauth.dns import SyncResolver
from gateway.mailauth.spf import check_spf, check_spf_async
from tests.support.dnsstub import DNSStub

SUITE = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "auth" / "spf" / "rfc7208-tests.yml"
SUITE_SIZE = 203
REQUIRED_PASSES = 195

# Suite tests our check cannot pass, with the reason. Empty since PTR validation skips names whose forward
# lookup fails (RFC 7208 §5.5, see gateway/auth/spf.py); docs/conformance.md records the history.
XFAIL: dict[str, str] = {}

# A TIMEOUT in the zone data costs one resolver timeout; keep it short so the whole suite runs in seconds.
DNS_TIMEOUT = 0.25
RECEIVER = "mx.receiver.test"


def load_suite() -> list[tuple[str, dict, dict]]:
    """(test name, test, scenario zonedata) for every test of every scenario (YAML document)."""
    cases = []
    with SUITE.open("rb") as handle:
        for scenario in yaml.safe_load_all(handle):
            for name, test in scenario["tests"].items():
                cases.append((name, test, scenario.get("zonedata") or {}))
    return cases


CASES = load_suite()


def case_params() -> list:
    params = []
    for name, test, zonedata in CASES:
        marks = [pytest.mark.xfail(reason=XFAIL[name], strict=True)] if name in XFAIL else []
        params.append(pytest.param(test, zonedata, id=name, marks=marks))
    return params


@pytest.fixture
def resolver(dns_stub: DNSStub) -> SyncResolver:
    return SyncResolver(nameservers=[dns_stub.host], port=dns_stub.port, timeout=DNS_TIMEOUT)


@pytest.mark.parametrize(("test", "zonedata"), case_params())
def test_rfc7208_suite(test: dict, zonedata: dict, dns_stub: DNSStub, resolver: SyncResolver) -> None:
    dns_stub.set_zones(zonedata, copy_spf_to_txt=True)
    expected = test["result"] if isinstance(test["result"], list) else [test["result"]]
    outcome = check_spf(
        test["host"], test["mailfrom"], test["helo"], resolver,
        receiver=RECEIVER, strict=test.get("strict", True), default_explanation="DEFAULT",
    )
    assert outcome.result in expected, f"{test.get('description', '').strip()} (spec {test['spec']})"
    if "explanation" in test:
        assert outcome.explanation == test["explanation"]
    # Every answer came from the stub: pyspf asked our resolver, not the system's.
    assert dns_stub.queries or outcome.result == "none"


def test_suite_is_complete_and_xfails_are_few() -> None:
    names = [name for name, _, _ in CASES]
    assert len(names) == SUITE_SIZE and len(set(names)) == SUITE_SIZE
    assert set(XFAIL) <= set(names)
    assert SUITE_SIZE - len(XFAIL) >= REQUIRED_PASSES


ZONES = {
    "example.com": [{"TXT": "v=spf1 ip4:192.0.2.0/24 ~all exp=why.example.com"}],
    "why.example.com": [{"TXT": "%{i} (is) not one of %{d}'s\\ servers"}],
    "bad.example.com": [{"TXT": "v=spf1 moo -all"}],
    "helo.example.com": [{"TXT": "v=spf1 a -all"}, {"A": "198.51.100.7"}],
    "slow.example.com": ["TIMEOUT"],
}


@pytest.fixture
def zones(dns_stub: DNSStub) -> DNSStub:
    dns_stub.set_zones(ZONES)
    return dns_stub


def test_received_spf_header_pass(zones: DNSStub, resolver: SyncResolver) -> None:
    outcome = check_spf("192.0.2.5", "alice@example.com", "mail.example.com", resolver, receiver=RECEIVER)
    assert outcome.result == "pass" and outcome.domain == "example.com" and outcome.identity == "mailfrom"
    assert outcome.header == (
        "Received-SPF: pass (mx.receiver.test: domain of example.com designates 192.0.2.5 as permitted sender) "
        'client-ip=192.0.2.5; envelope-from="alice@example.com"; helo=mail.example.com; '
        'receiver=mx.receiver.test; mechanism="ip4:192.0.2.0/24"; identity=mailfrom'
    )
    assert 0 <= outcome.duration < 5


def test_received_spf_header_softfail_and_permerror(zones: DNSStub, resolver: SyncResolver) -> None:
    soft = check_spf("203.0.113.9", "alice@example.com", "mail.example.com", resolver, receiver=RECEIVER)
    assert soft.result == "softfail"
    assert soft.received_spf.startswith("softfail (mx.receiver.test: transitioning domain of example.com ")
    assert "mechanism=~all" in soft.received_spf
    perm = check_spf("203.0.113.9", "bob@bad.example.com", "mail.example.com", resolver, receiver=RECEIVER)
    assert perm.result == "permerror" and "problem=moo" in perm.received_spf
    # Header comments must be balanced and ASCII whatever the sender's DNS says.
    assert perm.received_spf.count("(") == perm.received_spf.count(")") == 1


def test_null_sender_checks_helo_identity(zones: DNSStub, resolver: SyncResolver) -> None:
    outcome = check_spf("198.51.100.7", "", "helo.example.com", resolver, receiver=RECEIVER)
    assert outcome.result == "pass" and outcome.identity == "helo"
    assert "envelope-from" not in outcome.received_spf and outcome.received_spf.endswith("identity=helo")


def test_dns_timeout_is_temperror_within_the_timeout(zones: DNSStub, resolver: SyncResolver) -> None:
    outcome = check_spf("192.0.2.5", "carol@slow.example.com", "mail.example.com", resolver, receiver=RECEIVER)
    assert outcome.result == "temperror" and outcome.smtp_code == 451
    assert outcome.received_spf.startswith("temperror (")
    assert outcome.duration < DNS_TIMEOUT * 4


def test_overall_timeout_bounds_the_evaluation(zones: DNSStub, dns_stub: DNSStub) -> None:
    slow = SyncResolver(nameservers=[dns_stub.host], port=dns_stub.port, timeout=5)
    outcome = check_spf("192.0.2.5", "carol@slow.example.com", "mail.example.com", slow, timeout=0.5)
    assert outcome.result == "temperror" and outcome.duration < 2


def test_async_check_and_settings_resolver(zones: DNSStub, dns_stub: DNSStub, settings) -> None:
    settings.DNS_NAMESERVERS = [dns_stub.host]
    settings.DNS_PORT = dns_stub.port
    settings.DNS_TIMEOUT = DNS_TIMEOUT
    settings.SMTP_HOSTNAME = "gw.settings.test"
    outcome = asyncio.run(check_spf_async("192.0.2.5", "alice@example.com", "mail.example.com"))
    assert outcome.result == "pass" and "(gw.settings.test: " in outcome.received_spf
    assert ("example.com", "TXT") in dns_stub.queries


def test_pyspf_dns_goes_through_our_resolver(zones: DNSStub, dns_stub: DNSStub, settings) -> None:
    # Even a direct pyspf call (outside check_spf) resolves through gateway.mailauth.dns and the configured server.
    assert pyspf.DNSLookup is authspf._dns_lookup
    settings.DNS_NAMESERVERS = [dns_stub.host]
    settings.DNS_PORT = dns_stub.port
    settings.DNS_TIMEOUT = DNS_TIMEOUT
    assert pyspf.query(i="192.0.2.5", s="alice@example.com", h="mail.example.com").check()[0] == "pass"
    assert ("example.com", "TXT") in dns_stub.queries


def test_invalid_client_ip_is_a_programming_error(zones: DNSStub, resolver: SyncResolver) -> None:
    with pytest.raises(ValueError):
        check_spf("not-an-ip", "alice@example.com", "mail.example.com", resolver)
