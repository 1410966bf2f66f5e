"""DMARC (RFC 7489): a table of cases with the policy records served by the DNS stub, and the
Authentication-Results header (RFC 8601)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from gateway.mailauth import dmarc
from gateway.mailauth.dkim import DKIMSignatureResult
from gateway.mailauth.dns import SyncResolver
from gateway.mailauth.spf import SPFResult
from tests.support.dnsstub import DNSStub

ZONES = {
    "_dmarc.example.com": [{"TXT": "v=DMARC1; p=reject; sp=quarantine; rua=mailto:dmarc@example.com"}],
    "_dmarc.strict.example": [{"TXT": "v=DMARC1; p=reject; adkim=s; aspf=s"}],
    "_dmarc.quarantine.example": [{"TXT": "v=DMARC1; p=quarantine"}],
    "_dmarc.monitor.example": [{"TXT": "v=DMARC1; p=none; rua=mailto:reports@monitor.example"}],
    "_dmarc.own.example.com": [{"TXT": "v=DMARC1; p=none"}],  # a subdomain with its own record
    "_dmarc.sample.example": [{"TXT": "v=DMARC1; p=reject; pct=25"}],
    "_dmarc.shop.co.uk": [{"TXT": ["v=DMARC1; ", "p=reject"]}],  # org domain under a two-label public suffix
    "_dmarc.broken.example": [{"TXT": "v=DMARC1; p=bogus"}],
    "_dmarc.lenient.example": [{"TXT": "v=DMARC1; p=bogus; rua=mailto:agg@lenient.example"}],
    "_dmarc.twice.example": [{"TXT": "v=DMARC1; p=reject"}, {"TXT": "v=DMARC1; p=none"}],
    "_dmarc.other-txt.example": [{"TXT": "google-site-verification=abc"}, {"TXT": "v=DMARC1; p=quarantine"}],
    "_dmarc.noversion.example": [{"TXT": "p=reject; v=DMARC1"}],
    "_dmarc.slow.example": ["TIMEOUT"],
    "nodmarc.example": [{"A": "192.0.2.1"}],
}


def spf(result: str, domain: str) -> SPFResult:
    return SPFResult(result=result, explanation="", received_spf="", duration=0.0, domain=domain,
                     identity="mailfrom", sender=f"bounce@{domain}", helo="mail.example.net")


def dkim(result: str, domain: str) -> DKIMSignatureResult:
    return DKIMSignatureResult(result=result, domain=domain, selector="s1", algorithm="rsa-sha256",
                               reason="" if result == "pass" else "signature did not verify",
                               identity=f"@{domain}", header_b="abcdEFGH", key_bits=2048)


@dataclass
class Case:
    id: str
    from_domain: str
    spf: SPFResult | None
    dkim: list[DKIMSignatureResult]
    result: str
    policy: str
    spf_aligned: bool = False
    dkim_aligned: bool = False
    sample: float = 0.0


P, F = "pass", "fail"
CASES = [
    # Alignment, relaxed (the default): same organisational domain is enough.
    Case("spf-aligned-relaxed", "example.com", spf(P, "bounces.example.com"), [], "pass", "none", spf_aligned=True),
    Case("dkim-aligned-relaxed", "example.com", None, [dkim(P, "mail.example.com")], "pass", "none",
         dkim_aligned=True),
    Case("both-aligned", "example.com", spf(P, "example.com"), [dkim(P, "example.com")], "pass", "none",
         spf_aligned=True, dkim_aligned=True),
    Case("unaligned-spf-and-dkim", "example.com", spf(P, "mailer.example.net"), [dkim(P, "esp.example.net")],
         "fail", "reject"),
    Case("aligned-but-failing", "example.com", spf(F, "example.com"), [dkim(F, "example.com")], "fail", "reject"),
    Case("spf-softfail-does-not-count", "example.com", spf("softfail", "example.com"), [], "fail", "reject"),
    Case("one-good-signature-of-two", "example.com", None, [dkim(F, "example.com"), dkim(P, "example.com")],
         "pass", "none", dkim_aligned=True),
    Case("no-authentication-at-all", "example.com", None, [], "fail", "reject"),
    # Strict alignment: only the exact From domain.
    Case("spf-strict-subdomain", "strict.example", spf(P, "bounce.strict.example"), [], "fail", "reject"),
    Case("spf-strict-exact", "strict.example", spf(P, "STRICT.example."), [], "pass", "none", spf_aligned=True),
    Case("dkim-strict-subdomain", "strict.example", None, [dkim(P, "mail.strict.example")], "fail", "reject"),
    Case("dkim-strict-exact", "strict.example", None, [dkim(P, "strict.example")], "pass", "none",
         dkim_aligned=True),
    # Policies.
    Case("quarantine", "quarantine.example", spf(F, "quarantine.example"), [], "fail", "quarantine"),
    Case("monitor-only", "monitor.example", None, [], "fail", "none"),
    # Subdomains: the organisational domain's record, with sp= when present, else p=.
    Case("subdomain-uses-sp", "news.example.com", None, [dkim(P, "other.example.net")], "fail", "quarantine"),
    Case("subdomain-aligned-relaxed", "news.example.com", spf(P, "example.com"), [], "pass", "none",
         spf_aligned=True),
    Case("subdomain-without-sp-uses-p", "deep.sub.quarantine.example", None, [], "fail", "quarantine"),
    Case("subdomain-own-record-uses-its-p", "own.example.com", None, [], "fail", "none"),
    # Organisational domain under a multi-label public suffix (PSL: co.uk).
    Case("org-fallback-psl", "mail.shop.co.uk", None, [dkim(P, "shop.co.uk")], "pass", "none", dkim_aligned=True),
    Case("psl-boundary-not-aligned", "shop.co.uk", spf(P, "other.co.uk"), [], "fail", "reject"),
    Case("org-fallback-psl-fail", "mail.shop.co.uk", None, [], "fail", "reject"),
    # pct=25: a message outside the sample gets the next milder policy.
    Case("pct-inside-sample", "sample.example", None, [], "fail", "reject", sample=0.10),
    Case("pct-outside-sample", "sample.example", None, [], "fail", "quarantine", sample=0.90),
    # No policy, or none usable.
    Case("missing-record", "nodmarc.example", spf(P, "elsewhere.example"), [], "none", "none"),
    Case("missing-record-and-domain", "nowhere.example", None, [], "none", "none"),
    Case("two-records", "twice.example", None, [], "none", "none"),
    Case("version-not-first", "noversion.example", None, [], "none", "none"),
    Case("other-txt-ignored", "other-txt.example", None, [], "fail", "quarantine"),
    Case("broken-policy", "broken.example", None, [], "permerror", "none"),
    Case("broken-policy-with-rua-reads-as-none", "lenient.example", None, [], "fail", "none"),
    Case("dns-timeout", "slow.example", spf(P, "slow.example"), [], "temperror", "none"),
]


@pytest.fixture
def resolver(dns_stub: DNSStub) -> SyncResolver:
    dns_stub.set_zones(ZONES)
    return SyncResolver(nameservers=[dns_stub.host], port=dns_stub.port, timeout=0.3)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_dmarc_table(case: Case, resolver: SyncResolver) -> None:
    outcome = dmarc.evaluate(case.from_domain, spf=case.spf, dkim=case.dkim, resolver=resolver,
                             sample=lambda: case.sample)
    assert (outcome.result, outcome.policy) == (case.result, case.policy), outcome.reason
    assert (outcome.spf_aligned, outcome.dkim_aligned) == (case.spf_aligned, case.dkim_aligned)


def test_details_of_a_fallback(resolver: SyncResolver) -> None:
    outcome = dmarc.evaluate("news.example.com", resolver=resolver)
    assert outcome.policy_domain == "example.com" and outcome.requested_policy == "quarantine"
    assert outcome.record.p == "reject" and outcome.record.rua == ("mailto:dmarc@example.com",)
    sampled = dmarc.evaluate("sample.example", resolver=resolver, sample=lambda: 0.99)
    assert sampled.sampled_out and sampled.requested_policy == "reject"
    passed = dmarc.evaluate("example.com", dkim=[dkim(P, "Mail.Example.com")], resolver=resolver)
    assert passed.dkim_domain == "mail.example.com"


def test_async_evaluate(resolver: SyncResolver) -> None:
    outcome = asyncio.run(dmarc.evaluate_async("example.com", spf=spf(P, "example.com"), resolver=resolver))
    assert outcome.result == "pass"


@pytest.mark.parametrize(
    ("txt", "expected"),
    [
        ("v=DMARC1; p=reject", {"p": "reject", "sp": None, "adkim": "r", "aspf": "r", "pct": 100}),
        ("v=DMARC1;p=quarantine;sp=none;adkim=s;aspf=s;pct=50;rua=mailto:a@x.example,mailto:b@y.example!10m",
         {"p": "quarantine", "sp": "none", "adkim": "s", "aspf": "s", "pct": 50,
          "rua": ("mailto:a@x.example", "mailto:b@y.example!10m")}),
        ("v=DMARC1; p=REJECT; pct=500; adkim=x; unknown=tag", {"p": "reject", "pct": 100, "adkim": "r"}),
        ("v=DMARC1; p=none; rua=mailto:r@example.com; ri=3600; fo=1", {"p": "none", "ri": 3600, "fo": "1"}),
    ],
)
def test_parse_record(txt: str, expected: dict) -> None:
    record = dmarc.parse_record(txt)
    for name, value in expected.items():
        assert getattr(record, name) == value


@pytest.mark.parametrize("txt", ["v=DMARC1", "v=DMARC1; p=bogus", "p=reject", "v=DMARC2; p=reject",
                                 "v=DMARC1; p=reject; sp=never", "v=DMARC1; p"])
def test_parse_record_errors(txt: str) -> None:
    with pytest.raises(dmarc.DMARCRecordError):
        dmarc.parse_record(txt)


@pytest.mark.parametrize(
    ("domain", "org"),
    [("example.com", "example.com"), ("a.b.Example.COM.", "example.com"), ("mail.shop.co.uk", "shop.co.uk"),
     ("co.uk", "co.uk"), ("user.github.io", "user.github.io"), ("x.y.example", "y.example")],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert dmarc.organizational_domain(domain) == org


def test_from_domains() -> None:
    assert dmarc.from_domains(b"From: Alice <alice@Example.COM>\r\nTo: b@x.example\r\n\r\nbody") == ["example.com"]
    assert dmarc.from_domains(b'From: "Test, User" <test@example.com>\r\n\r\n') == ["example.com"]
    two = b"From: Bad User <spoof@example.org>,Test User <test@example.com>\r\n\r\n"
    assert dmarc.from_domains(two) == ["example.org", "example.com"]
    assert dmarc.from_domains(b"Subject: no from\r\n\r\n") == []


def test_authentication_results(resolver: SyncResolver) -> None:
    spf_result = spf(P, "example.com")
    signatures = [dkim(P, "example.com"), dkim(F, "example.net")]
    outcome = dmarc.evaluate("example.com", spf=spf_result, dkim=signatures, resolver=resolver)
    value = dmarc.authentication_results("mx.gateway.test", spf=spf_result, dkim=signatures, dmarc=outcome)
    assert value == (
        "mx.gateway.test; spf=pass smtp.mailfrom=bounce@example.com;\r\n"
        "\tdkim=pass (2048-bit key) header.d=example.com header.i=@example.com header.s=s1 header.a=rsa-sha256"
        " header.b=abcdEFGH;\r\n"
        '\tdkim=fail reason="signature did not verify" header.d=example.net header.i=@example.net header.s=s1'
        " header.a=rsa-sha256 header.b=abcdEFGH;\r\n"
        "\tdmarc=pass (p=reject sp=quarantine dis=none) header.from=example.com"
    )
    assert dmarc.authentication_results("mx.gateway.test") == "mx.gateway.test; none"
    helo = SPFResult(result="none", explanation="", received_spf="", duration=0.0, domain="mail.example.net",
                     identity="helo", sender="postmaster@mail.example.net", helo="mail.example.net")
    missing = dmarc.evaluate("nodmarc.example", resolver=resolver)
    value = dmarc.authentication_results("mx.gateway.test", spf=helo, dmarc=missing)
    assert value == ("mx.gateway.test; spf=none smtp.helo=mail.example.net;\r\n"
                     "\tdmarc=none (no DMARC record) header.from=nodmarc.example")
    # header.b values with "/" or "=" must be quoted (RFC 2045 tspecials).
    odd = DKIMSignatureResult("pass", "example.com", "s1", "rsa-sha256", "", "@example.com", "ab/d=FGH")
    assert 'header.b="ab/d=FGH"' in dmarc.authentication_results("x", dkim=[odd])


def test_strip_authentication_results() -> None:
    message = (
        b"Authentication-Results: mx.gateway.test; dkim=pass header.d=forged.example\r\n"
        b"Received: from a by b\r\n"
        b"Authentication-Results: (comment) MX.Gateway.Test;\r\n\tspf=pass smtp.mailfrom=forged.example\r\n"
        b"Authentication-Results: lists.example.org; dkim=pass header.d=example.org\r\n"
        b"Authentication-Results: mx.gateway.test.evil.example; none\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"Authentication-Results: mx.gateway.test; in the body, untouched\r\n"
    )
    stripped = dmarc.strip_authentication_results(message, "mx.gateway.test")
    assert stripped == (
        b"Received: from a by b\r\n"
        b"Authentication-Results: lists.example.org; dkim=pass header.d=example.org\r\n"
        b"Authentication-Results: mx.gateway.test.evil.example; none\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"Authentication-Results: mx.gateway.test; in the body, untouched\r\n"
    )
    lf = message.replace(b"\r\n", b"\n")
    assert dmarc.strip_authentication_results(lf, "mx.gateway.test") == stripped.replace(b"\r\n", b"\n")
