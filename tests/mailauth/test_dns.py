"""The DNS stub (tests/support/dnsstub.py) answers like a DNS server, and gateway.mailauth.dns tells "no" from
"don't know".

Every lookup goes to the stub on 127.0.0.1: no test here touches the internet or the system resolver.
"""

from __future__ import annotations

import asyncio
import socket
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from gateway.mailauth import dns as authdns
from gateway.mailauth.dns import MXRecord, Resolver, SyncResolver, TemporaryDNSError
from tests.support.dnsstub import DNSStub

ZONES = {
    "example.com": [
        {"A": "192.0.2.10"},
        {"AAAA": "2001:db8::10"},
        {"MX": [20, "mx2.example.com"]},
        {"MX": [10, "mx1.example.com"]},
        {"TXT": ["v=spf1 ", "mx -all"]},
        {"TXT": "another record"},
    ],
    "mx1.example.com": [{"A": "192.0.2.11"}],
    "Mixed.Case.Example.com": [{"A": "192.0.2.12"}],
    "alias.example.com": [{"CNAME": "example.com"}],
    "dangling.example.com": [{"CNAME": "missing.example.com"}],
    "loop1.example.com": [{"CNAME": "loop2.example.com"}],
    "loop2.example.com": [{"CNAME": "loop1.example.com"}],
    "deep.a.b.example.net": [{"A": "192.0.2.20"}],
    "slow.example.com": [{"A": "192.0.2.30"}, "TIMEOUT"],
    "slowtxt.example.com": [{"TXT": "TIMEOUT"}, {"A": "192.0.2.31"}],
    "spf-only.example.org": [{"SPF": "v=spf1 -all"}],
    "spf-and-none.example.org": [{"SPF": "v=spf1 -all"}, {"TXT": "NONE"}],
    "big.example.com": [{"TXT": f"{i:03d}" + "x" * 240} for i in range(8)],
    "implicit.example.org": [{"A": "192.0.2.40"}],
    "v6only.example.org": [{"AAAA": "2001:db8::40"}],
    "nullmx.example.org": [{"MX": [0, "."]}, {"A": "192.0.2.41"}],
    "mxtimeout.example.org": [{"MX": "TIMEOUT"}],
    "empty.example.org": [{"TXT": "something"}],
    # Reverse zones: 192.0.2.10 has a confirmed PTR, .50 a PTR that does not resolve back, .60 none,
    # .70 one whose forward lookup times out, 2001:db8::10 a confirmed IPv6 one.
    "10.2.0.192.in-addr.arpa": [{"PTR": "example.com"}],
    "50.2.0.192.in-addr.arpa": [{"PTR": "liar.example.com"}],
    "liar.example.com": [{"A": "192.0.2.99"}],
    "70.2.0.192.in-addr.arpa": [{"PTR": "slowptr.example.com"}, {"PTR": "host70.example.com"}],
    "host70.example.com": [{"A": "192.0.2.70"}],
    "slowptr.example.com": ["TIMEOUT"],
    "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa": [{"PTR": "example.com"}],
}

TIMEOUT = 0.3


@pytest.fixture
def stub(dns_stub: DNSStub) -> DNSStub:
    dns_stub.set_zones(ZONES)
    return dns_stub


@pytest.fixture
def resolver(stub: DNSStub) -> SyncResolver:
    return SyncResolver(nameservers=[stub.host], port=stub.port, timeout=TIMEOUT)


def ask(stub: DNSStub, name: str, rdtype: str, *, tcp: bool = False, payload: int | None = None) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=payload is not None, payload=payload or 512)
    if tcp:
        return dns.query.tcp(query, stub.host, port=stub.port, timeout=2)
    return dns.query.udp(query, stub.host, port=stub.port, timeout=2)


# --- the stub itself ------------------------------------------------------------------------------------------


def test_stub_answers_udp_and_tcp_authoritatively(stub: DNSStub) -> None:
    for tcp in (False, True):
        response = ask(stub, "example.com", "A", tcp=tcp)
        assert response.rcode() == dns.rcode.NOERROR
        assert response.flags & dns.flags.AA
        assert [r.address for r in response.answer[0]] == ["192.0.2.10"]


def test_stub_names_are_case_insensitive(stub: DNSStub) -> None:
    assert ask(stub, "mixed.case.EXAMPLE.COM", "A").answer[0][0].address == "192.0.2.12"


def test_stub_nxdomain_versus_nodata(stub: DNSStub) -> None:
    assert ask(stub, "nowhere.example.com", "A").rcode() == dns.rcode.NXDOMAIN
    nodata = ask(stub, "mx1.example.com", "TXT")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    # An empty non-terminal exists (RFC 8020): NODATA, not NXDOMAIN.
    ent = ask(stub, "a.b.example.net", "A")
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer


def test_stub_txt_keeps_character_strings(stub: DNSStub) -> None:
    rdatas = {tuple(r.strings) for r in ask(stub, "example.com", "TXT").answer[0]}
    assert rdatas == {(b"v=spf1 ", b"mx -all"), (b"another record",)}


def test_stub_follows_cnames_and_reports_loops(stub: DNSStub) -> None:
    response = ask(stub, "alias.example.com", "A")
    assert [rrset.rdtype for rrset in response.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert ask(stub, "dangling.example.com", "A").rcode() == dns.rcode.NXDOMAIN
    assert ask(stub, "loop1.example.com", "A").rcode() == dns.rcode.SERVFAIL


def test_stub_timeout_marker_never_answers(stub: DNSStub) -> None:
    # A record listed before the marker is served; other types at that name get no answer at all.
    assert ask(stub, "slow.example.com", "A").answer
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(dns.message.make_query("slow.example.com", "TXT"), stub.host, port=stub.port, timeout=0.3)
    with pytest.raises(dns.exception.Timeout):
        dns.query.tcp(dns.message.make_query("slow.example.com", "MX"), stub.host, port=stub.port, timeout=0.3)
    # A per-type TIMEOUT value: only that type hangs.
    assert ask(stub, "slowtxt.example.com", "A").answer
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(dns.message.make_query("slowtxt.example.com", "TXT"), stub.host, port=stub.port, timeout=0.3)


def test_stub_truncates_big_udp_answers_and_serves_them_over_tcp(stub: DNSStub) -> None:
    small = ask(stub, "big.example.com", "TXT")
    assert small.flags & dns.flags.TC and not small.answer
    assert len(ask(stub, "big.example.com", "TXT", payload=4096).answer[0]) == 8
    assert len(ask(stub, "big.example.com", "TXT", tcp=True).answer[0]) == 8


def test_stub_spf_to_txt_copy_rule(dns_stub: DNSStub) -> None:
    zones = {k: v for k, v in ZONES.items() if k.endswith("example.org")}
    dns_stub.set_zones(zones)
    assert not ask(dns_stub, "spf-only.example.org", "TXT").answer
    dns_stub.set_zones(zones, copy_spf_to_txt=True)
    assert ask(dns_stub, "spf-only.example.org", "TXT").answer[0][0].strings == (b"v=spf1 -all",)
    assert ask(dns_stub, "spf-only.example.org", "SPF").answer[0][0].strings == (b"v=spf1 -all",)
    # An explicit TXT entry, even "NONE", turns the copy off.
    assert not ask(dns_stub, "spf-and-none.example.org", "TXT").answer


def test_stub_set_zones_replaces_and_records_queries(dns_stub: DNSStub) -> None:
    dns_stub.set_zones({"one.test": [{"A": "192.0.2.1"}]})
    assert ask(dns_stub, "one.test", "A").answer
    dns_stub.set_zones({"two.test": [{"A": "192.0.2.2"}]})
    assert ask(dns_stub, "one.test", "A").rcode() == dns.rcode.NXDOMAIN
    assert dns_stub.queries == [("one.test", "A")]
    dns_stub.add("two.test", {"TXT": "added"})
    assert ask(dns_stub, "two.test", "TXT").answer and ask(dns_stub, "two.test", "A").answer


def test_stub_as_context_manager_frees_its_port() -> None:
    with DNSStub({"x.test": [{"A": "192.0.2.1"}]}) as stub:
        port = stub.port
        assert ask(stub, "x.test", "A").answer
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


# --- gateway.mailauth.dns -----------------------------------------------------------------------------------------


def test_lookups_of_each_type(resolver: SyncResolver) -> None:
    assert sorted(resolver.lookup_txt("example.com")) == ["another record", "v=spf1 mx -all"]
    assert resolver.lookup_a("example.com") == ["192.0.2.10"]
    assert resolver.lookup_aaaa("example.com") == ["2001:db8::10"]
    assert resolver.lookup_addresses("example.com") == ["192.0.2.10", "2001:db8::10"]
    assert resolver.lookup_mx("example.com") == [MXRecord(10, "mx1.example.com"), MXRecord(20, "mx2.example.com")]
    assert resolver.lookup_ptr("192.0.2.10") == ["example.com"]
    assert resolver.lookup_a("alias.example.com") == ["192.0.2.10"]
    assert resolver.lookup_a("MIXED.case.example.com") == ["192.0.2.12"]


def test_no_records_is_a_definite_no(resolver: SyncResolver) -> None:
    assert resolver.lookup_a("nowhere.example.com") == []
    assert resolver.lookup("nowhere.example.com", "A").nxdomain
    assert resolver.lookup_txt("mx1.example.com") == []
    assert not resolver.lookup("mx1.example.com", "TXT").nxdomain
    assert resolver.lookup_ptr("192.0.2.60") == []
    # A name that cannot exist in DNS (a 64-octet label) is a "no" without asking.
    assert resolver.lookup_a("a" * 64 + ".example.com") == []


def test_timeout_is_temporary(resolver: SyncResolver) -> None:
    started = time.monotonic()
    with pytest.raises(TemporaryDNSError) as caught:
        resolver.lookup_txt("slow.example.com")
    assert caught.value.reason == "timeout" and caught.value.rdtype == "TXT"
    # The configured timeout bounds the lookup (one server: lifetime == timeout).
    assert time.monotonic() - started < TIMEOUT + 1


def test_servfail_is_temporary(resolver: SyncResolver) -> None:
    with pytest.raises(TemporaryDNSError):
        resolver.lookup_a("loop1.example.com")


def test_unreachable_server_is_temporary() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never read: queries go unanswered
        with pytest.raises(TemporaryDNSError):
            SyncResolver(["127.0.0.1"], port, TIMEOUT).lookup_a("example.com")


def test_big_answer_arrives_whole(resolver: SyncResolver) -> None:
    # ~2 KB of TXT: more than EDNS's 1232 bytes, so the resolver must retry over TCP after the TC bit.
    assert len(resolver.lookup_txt("big.example.com")) == 8


def test_fcrdns(resolver: SyncResolver) -> None:
    assert resolver.fcrdns("192.0.2.10") == "example.com"
    assert resolver.fcrdns("2001:db8::10") == "example.com"
    assert resolver.fcrdns("::ffff:192.0.2.10") == "example.com"
    assert resolver.fcrdns("192.0.2.50") is None  # PTR does not resolve back
    assert resolver.fcrdns("192.0.2.60") is None  # no PTR
    # 192.0.2.70: one PTR name confirms although the other times out.
    assert resolver.fcrdns("192.0.2.70") == "host70.example.com"
    with pytest.raises(ValueError):
        resolver.fcrdns("not-an-ip")


def test_fcrdns_temporary_failure(stub: DNSStub, resolver: SyncResolver) -> None:
    stub.add("80.2.0.192.in-addr.arpa", {"PTR": "slowptr.example.com"})
    with pytest.raises(TemporaryDNSError):
        resolver.fcrdns("192.0.2.80")
    stub.add("90.2.0.192.in-addr.arpa", "TIMEOUT")
    with pytest.raises(TemporaryDNSError):
        resolver.fcrdns("192.0.2.90")


def test_domain_resolves(resolver: SyncResolver) -> None:
    assert resolver.domain_resolves("example.com")  # MX
    assert resolver.domain_resolves("implicit.example.org")  # implicit MX: A
    assert resolver.domain_resolves("v6only.example.org")  # implicit MX: AAAA
    assert not resolver.domain_resolves("nullmx.example.org")  # RFC 7505: accepts no mail
    assert not resolver.domain_resolves("empty.example.org")  # exists, but neither MX nor address
    assert not resolver.domain_resolves("nowhere.example.com")
    assert not resolver.domain_resolves("example")  # NXDOMAIN at the stub, no search domain appended
    with pytest.raises(TemporaryDNSError):
        resolver.domain_resolves("mxtimeout.example.org")


def test_async_resolver_gives_the_same_answers(stub: DNSStub) -> None:
    resolver = Resolver(nameservers=[stub.host], port=stub.port, timeout=TIMEOUT)

    async def run() -> None:
        assert sorted(await resolver.lookup_txt("example.com")) == sorted(resolver.sync().lookup_txt("example.com"))
        assert await resolver.lookup_mx("example.com") == [
            MXRecord(10, "mx1.example.com"), MXRecord(20, "mx2.example.com")]
        assert await resolver.lookup_addresses("example.com") == ["192.0.2.10", "2001:db8::10"]
        assert await resolver.lookup_ptr("192.0.2.10") == ["example.com"]
        assert await resolver.fcrdns("192.0.2.10") == "example.com"
        assert await resolver.fcrdns("192.0.2.50") is None
        assert await resolver.domain_resolves("implicit.example.org")
        assert not await resolver.domain_resolves("nowhere.example.com")
        assert await resolver.lookup_a("nowhere.example.com") == []
        assert len(await resolver.lookup_txt("big.example.com")) == 8
        with pytest.raises(TemporaryDNSError):
            await resolver.lookup_txt("slow.example.com")
        with pytest.raises(TemporaryDNSError):
            await resolver.domain_resolves("mxtimeout.example.org")

    asyncio.run(run())


def test_async_lookups_run_concurrently(stub: DNSStub) -> None:
    # Ten lookups that each time out take about one timeout together, not ten: the event loop is not blocked.
    resolver = Resolver(nameservers=[stub.host], port=stub.port, timeout=TIMEOUT)

    async def run() -> list:
        return await asyncio.gather(*(resolver.lookup_txt("slow.example.com") for _ in range(10)),
                                    return_exceptions=True)

    started = time.monotonic()
    results = asyncio.run(run())
    assert all(isinstance(r, TemporaryDNSError) for r in results)
    assert time.monotonic() - started < TIMEOUT * 5


def test_settings_choose_the_nameserver(stub: DNSStub, settings) -> None:
    settings.DNS_NAMESERVERS = [stub.host]
    settings.DNS_PORT = stub.port
    settings.DNS_TIMEOUT = TIMEOUT
    assert authdns.get_sync_resolver().nameservers == (stub.host,)
    assert authdns.get_sync_resolver().lookup_a("example.com") == ["192.0.2.10"]
    assert asyncio.run(authdns.lookup_mx("example.com"))[0] == MXRecord(10, "mx1.example.com")
    assert asyncio.run(authdns.domain_resolves("implicit.example.org"))
    assert asyncio.run(authdns.fcrdns("192.0.2.10")) == "example.com"
    assert ("example.com", "MX") in stub.queries


def test_configured_nameservers_never_read_resolv_conf(stub: DNSStub) -> None:
    resolver = SyncResolver(nameservers=[stub.host], port=stub.port, timeout=TIMEOUT)
    # configure=False: no search list, no other servers than ours.
    assert resolver._resolver.nameservers == [stub.host]
    assert resolver._resolver.search == []
    assert resolver._resolver.port == stub.port
