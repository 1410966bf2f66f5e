"""The SMTP-time checks with a real client (smtplib, raw sockets) against our server, DNS served by the stub:
each refusal with its exact code, and in the mail log with its reason, the check's result and its time."""

from __future__ import annotations

import io
import json
import smtplib
import socket
import time

import pytest
from django.core.management import call_command

from gateway.mailauth import dkim
from gateway.models import DNSBLZone, Message, RawMessage, SenderListEntry, SMTPPolicy, TrustedNetwork

pytestmark = pytest.mark.usefixtures("scanners_off")

HAM = (b"From: Alice <alice@sender.example>\r\nTo: bob@example.org\r\nSubject: Lunch\r\n"
       b"Message-ID: <lunch-1@sender.example>\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\n\r\n"
       b"Shall we meet at noon?\r\n")


def set_policy(**fields) -> SMTPPolicy:
    policy = SMTPPolicy.load()
    for name, value in fields.items():
        setattr(policy, name, value)
    policy.save()
    return policy


def connect(server, *, helo="client.example.net", source="127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.port, local_hostname=helo, timeout=30, source_address=(source, 0))
    client.ehlo()
    return client


def attempt(server, *, helo="client.example.net", sender="alice@sender.example", to=("bob@example.org",),
            data=HAM, source="127.0.0.1") -> dict:
    """One transaction; the replies at each step (the first refusal ends it)."""
    with connect(server, helo=helo, source=source) as client:
        out = {"mail": client.mail(sender)}
        if out["mail"][0] != 250:
            return out
        out["rcpt"] = [client.rcpt(address) for address in to]
        if not any(code == 250 for code, _ in out["rcpt"]):
            return out
        out["data"] = client.data(data)
        return out


def refused(reason: str) -> Message:
    return Message.objects.get(state=Message.State.REFUSED, refusal_reason=reason)


def accepted() -> Message:
    return Message.objects.exclude(state=Message.State.REFUSED).get()


def reply(result: tuple) -> str:
    code, text = result
    return f"{code} {text.decode()}"


# --- all well ------------------------------------------------------------------------------------------------

def test_a_well_configured_sender_passes_every_check(checks_on, gateway_smtp, protected_domain, capture_server):
    out = attempt(gateway_smtp)
    assert out["data"][0] == 250, out
    message = accepted()
    checks = message.checks
    assert checks["fcrdns"]["result"] == "pass" and checks["fcrdns"]["name"] == "client.example.net"
    assert checks["helo"]["result"] == "pass"
    assert checks["helo_impersonation"]["result"] == "pass"
    assert checks["sender_domain"]["result"] == "pass"
    assert checks["spf"]["result"] == "pass"
    assert checks["dkim"]["result"] == "none"
    assert checks["dmarc"]["result"] == "pass"
    for name in ("fcrdns", "helo", "sender_domain", "spf", "dmarc"):
        assert isinstance(checks[name]["seconds"], float), name
    assert "score" not in checks
    assert message.client_name == "client.example.net"
    # Received-SPF and one Authentication-Results with our authserv-id, added on delivery.
    delivered = capture_server.wait_for(1)[0].data
    head = delivered.split(b"\r\n\r\n", 1)[0]
    assert b"Received-SPF: pass" in head
    from django.conf import settings

    assert head.count(b"Authentication-Results:") == 1
    assert f"Authentication-Results: {settings.SMTP_HOSTNAME}; spf=pass".encode() in head
    assert b"dmarc=pass" in head
    assert delivered.endswith(HAM)
    assert bytes(RawMessage.objects.get(message=message).data) == HAM


def test_checks_are_in_maillog_json(checks_on, gateway_smtp, protected_domain):
    attempt(gateway_smtp)
    out = io.StringIO()
    call_command("maillog", "--json", stdout=out)
    record = json.loads(out.getvalue().splitlines()[-1])
    assert record["checks"]["spf"]["result"] == "pass"
    assert record["checks"]["spf"]["seconds"] >= 0


def test_dns_checks_off_say_so_and_ask_nothing(settings, checks_on, gateway_smtp, protected_domain):
    settings.SMTP_DNS_CHECKS = "false"
    checks_on.set_zones({})
    assert attempt(gateway_smtp)["data"][0] == 250
    assert accepted().checks["dns_checks"] == "off: SMTP_DNS_CHECKS=false"
    assert checks_on.queries == []


# --- connection ----------------------------------------------------------------------------------------------

def test_dnsbl_listed_client_is_refused_554(checks_on, gateway_smtp, protected_domain):
    DNSBLZone.objects.create(zone="bl.test.example", action="reject")
    checks_on.add("1.0.0.127.bl.test.example", {"A": "127.0.0.2"})
    out = attempt(gateway_smtp)
    assert reply(out["rcpt"][0]) == "554 5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test.example"
    message = refused("rbl")
    assert message.checks["dnsbl"]["result"] == "listed"
    assert message.checks["dnsbl"]["zones"] == {"bl.test.example": "listed (127.0.0.2)"}
    assert message.recipients.get().address == "bob@example.org"
    assert message.envelope_sender == "alice@sender.example"


def test_dnsbl_score_and_error_answers(checks_on, gateway_smtp, protected_domain):
    DNSBLZone.objects.create(zone="score.test.example", action="score", score=2.5)
    DNSBLZone.objects.create(zone="zen.test.example", action="reject")
    checks_on.add("1.0.0.127.score.test.example", {"A": "127.0.0.4"})
    checks_on.add("1.0.0.127.zen.test.example", {"A": "127.255.255.254"})  # "public resolver": not a listing
    assert attempt(gateway_smtp)["data"][0] == 250
    checks = accepted().checks
    assert checks["dnsbl"]["result"] == "listed"
    assert checks["dnsbl"]["score"] == 2.5 and checks["score"] == 2.5
    assert checks["dnsbl"]["zones"]["zen.test.example"] == "not listed"


def test_dnsbl_lookup_failure_defers_451(checks_on, gateway_smtp, protected_domain):
    DNSBLZone.objects.create(zone="slow.test.example", action="reject")
    checks_on.add("1.0.0.127.slow.test.example", "TIMEOUT")
    out = attempt(gateway_smtp)
    assert out["rcpt"][0][0] == 451 and out["rcpt"][0][1].startswith(b"4.4.3")
    assert refused("rbl").checks["dnsbl"]["result"] == "temperror"


def test_no_forward_confirmed_reverse_dns(checks_on, gateway_smtp, protected_domain):
    checks_on.set_zones({**{k: v for k, v in checks_on_zones().items() if "in-addr" not in k}})
    # Default action: add to the score.
    assert attempt(gateway_smtp)["data"][0] == 250
    message = accepted()
    assert message.checks["fcrdns"] == {"result": "fail", "why": "no PTR record", "seconds":
                                        message.checks["fcrdns"]["seconds"], "action": "score", "score": 1.0}
    set_policy(fcrdns_action="reject")
    out = attempt(gateway_smtp)
    assert reply(out["rcpt"][0]) == ("550 5.7.25 Client host [127.0.0.1] rejected: no forward-confirmed reverse "
                                     "DNS name")
    assert refused("reverse_dns").checks["fcrdns"]["result"] == "fail"


def test_ptr_that_does_not_resolve_back(checks_on, gateway_smtp, protected_domain):
    checks_on.set_zones({**checks_on_zones(), "1.0.0.127.in-addr.arpa": [{"PTR": "liar.example.net"}],
                         "liar.example.net": [{"A": "192.0.2.99"}]})
    set_policy(fcrdns_action="tempfail")
    out = attempt(gateway_smtp)
    assert reply(out["rcpt"][0]) == "450 4.7.25 Client host [127.0.0.1] rejected: cannot find your hostname"
    assert refused("reverse_dns").checks["fcrdns"]["why"] == "liar.example.net does not resolve back to 127.0.0.1"


def test_per_ip_connection_limit(checks_on, gateway_smtp, protected_domain):
    set_policy(max_connections_per_ip=2)
    first, second = connect(gateway_smtp), connect(gateway_smtp)
    try:
        with pytest.raises(smtplib.SMTPConnectError) as excinfo:
            connect(gateway_smtp)
        assert excinfo.value.smtp_code == 421
        assert excinfo.value.smtp_error.startswith(b"4.7.0 Too many connections from [127.0.0.1]")
    finally:
        first.quit()
        second.quit()
    message = refused("rate_limit")
    assert message.checks["rate_limit"]["connections"] == 3
    # Connections are counted down again when they close.
    time.sleep(0.2)
    assert attempt(gateway_smtp)["data"][0] == 250


def test_per_ip_message_rate(checks_on, gateway_smtp, protected_domain):
    set_policy(max_messages_per_minute=2)
    with connect(gateway_smtp) as client:
        for _ in range(2):
            assert client.mail("alice@sender.example")[0] == 250
            client.rset()
        code, text = client.mail("alice@sender.example")
    assert code == 421 and text.startswith(b"4.7.0 Too many messages from [127.0.0.1]")
    assert refused("rate_limit").checks["rate_limit"]["limit"] == 2


def test_early_talker_is_refused(settings, checks_on, gateway_smtp, protected_domain):
    settings.SMTP_GREET_DELAY = 0.5
    with socket.create_connection(("127.0.0.1", gateway_smtp.port), timeout=10) as sock:
        sock.sendall(b"EHLO bot.example.net\r\n")
        answer = sock.makefile("rb").readline()
    assert answer == b"554 5.5.1 Protocol error: you talked before my greeting\r\n"
    assert refused("early_talker").checks["early_talker"]["result"] == "fail"
    # A client that waits gets the greeting after the delay, once: this node then remembers it.
    started = time.monotonic()
    assert attempt(gateway_smtp)["data"][0] == 250
    assert time.monotonic() - started >= 0.5
    assert accepted().checks["early_talker"]["result"] == "pass"
    started = time.monotonic()
    with connect(gateway_smtp) as client:
        assert client.noop()[0] == 250
    assert time.monotonic() - started < 0.5


# --- HELO ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("helo, why", [
    ("client", "need fully-qualified hostname"),
    ("192.0.2.7", "a bare IP address (an address literal needs brackets)"),
    ("[192.0.2.7]", "address literal is not your address"),
    ("unknown.example.net", "Host not found"),
])
def test_bad_helo(checks_on, gateway_smtp, protected_domain, helo, why):
    set_policy(helo_action="reject")
    out = attempt(gateway_smtp, helo=helo)
    assert reply(out["rcpt"][0]) == f"550 5.7.1 <{helo}>: Helo command rejected: {why}"
    assert refused("helo").helo == helo


def test_helo_default_scores_and_a_matching_literal_passes(checks_on, gateway_smtp, protected_domain):
    assert attempt(gateway_smtp, helo="unknown.example.net")["data"][0] == 250
    assert accepted().checks["helo"]["score"] == 1.0
    Message.objects.all().delete()
    assert attempt(gateway_smtp, helo="[127.0.0.1]")["data"][0] == 250
    assert accepted().checks["helo"]["result"] == "pass"


@pytest.mark.parametrize("helo", ["example.org", "OURS", "[127.0.0.1]"])
def test_helo_claiming_to_be_us(settings, checks_on, gateway_smtp, protected_domain, helo):
    settings.SMTP_HOSTNAME = "mx.gateway.example"
    helo = "mx.gateway.example" if helo == "OURS" else helo
    # From 127.0.0.2, "localhost" and our address 127.0.0.1 are not the client's own names.
    out = attempt(gateway_smtp, helo=helo, source="127.0.0.2")
    assert reply(out["rcpt"][0]) == f"550 5.7.1 <{helo}>: Helo command rejected: You are not me"
    assert refused("helo").checks["helo_impersonation"]["result"] == "fail"


# --- MAIL FROM -----------------------------------------------------------------------------------------------

def test_sender_domain_must_resolve(checks_on, gateway_smtp, protected_domain):
    out = attempt(gateway_smtp, sender="someone@nowhere.example")
    assert reply(out["rcpt"][0]) == "550 5.1.8 <someone@nowhere.example>: Sender address rejected: Domain not found"
    assert refused("cant_resolve").checks["sender_domain"] == {
        "result": "fail", "domain": "nowhere.example", "action": "reject",
        "seconds": refused("cant_resolve").checks["sender_domain"]["seconds"],
        "reply": "550 5.1.8 <someone@nowhere.example>: Sender address rejected: Domain not found"}
    Message.objects.all().delete()
    set_policy(sender_domain_action="tempfail")
    out = attempt(gateway_smtp, sender="someone@nowhere.example")
    assert reply(out["rcpt"][0]) == "450 4.1.8 <someone@nowhere.example>: Sender address rejected: Domain not found"


def test_null_mx_sender_domain(checks_on, gateway_smtp, protected_domain):
    checks_on.add("nullmx.example", {"MX": [0, "."]})
    out = attempt(gateway_smtp, sender="someone@nullmx.example")
    assert out["rcpt"][0][0] == 550 and out["rcpt"][0][1].startswith(b"5.1.8")


def test_sender_domain_dns_failure_is_451(checks_on, gateway_smtp, protected_domain):
    checks_on.add("slow.example", "TIMEOUT")
    out = attempt(gateway_smtp, sender="someone@slow.example")
    assert reply(out["rcpt"][0]).startswith("451 4.4.3 <someone@slow.example>: Sender address rejected: DNS lookup")
    assert refused("cant_resolve").checks["sender_domain"]["result"] == "temperror"


def test_ip_literal_and_unqualified_senders(checks_on, gateway_smtp, protected_domain):
    with connect(gateway_smtp) as client:
        assert reply(client.docmd("MAIL FROM:<user@192.0.2.6>")).startswith("553 5.1.8")
        assert reply(client.docmd("MAIL FROM:<tom@example>")).startswith("550 5.1.8")
    assert Message.objects.filter(refusal_reason="bad_sender").count() == 2


def spf_zones(record: str) -> dict:
    zones = checks_on_zones()
    zones["sender.example"] = [{"MX": [10, "mx.sender.example"]}, {"TXT": record}]
    return zones


def test_spf_fail_is_refused(checks_on, gateway_smtp, protected_domain):
    checks_on.set_zones(spf_zones("v=spf1 ip4:192.0.2.0/24 -all"))
    out = attempt(gateway_smtp)
    assert reply(out["rcpt"][0]) == ("550 5.7.23 SPF check failed: sender.example does not designate 127.0.0.1 as "
                                     "permitted sender")
    message = refused("spf")
    assert message.checks["spf"]["result"] == "fail" and message.checks["spf"]["domain"] == "sender.example"


def test_spf_softfail_with_dmarc_reject_is_refused_by_dmarc(checks_on, gateway_smtp, protected_domain):
    checks_on.set_zones(spf_zones("v=spf1 ip4:192.0.2.0/24 ~all"))
    out = attempt(gateway_smtp)
    # SPF softfail only scores; but SPF did not pass and nothing is signed, so p=reject of sender.example applies.
    assert reply(out["data"]) == "550 5.7.1 Email rejected per DMARC policy for sender.example"
    message = refused("dmarc")
    assert message.checks["spf"]["result"] == "softfail" and message.checks["spf"]["score"] == 2.0
    assert message.checks["dmarc"]["result"] == "fail"


def test_helo_localhost_from_elsewhere_is_impersonation():
    from gateway.policy.checks import helo_impersonation
    from gateway.policy.config import defaults

    config = defaults()
    assert helo_impersonation("localhost", "192.0.2.1", "198.51.100.1", set(), config).reply == \
        "550 5.7.1 <localhost>: Helo command rejected: You are not me"
    assert helo_impersonation("localhost", "127.0.0.1", "127.0.0.1", set(), config).passed
    assert helo_impersonation("[198.51.100.1]", "192.0.2.1", "198.51.100.1", set(), config).reply
    assert helo_impersonation("mx.example.org", "192.0.2.1", None, {"example.org"}, config).passed


def test_spf_softfail_with_dmarc_none_is_delivered_with_received_spf(checks_on, gateway_smtp, protected_domain,
                                                                     capture_server):
    zones = spf_zones("v=spf1 ip4:192.0.2.0/24 ~all")
    zones["_dmarc.sender.example"] = [{"TXT": "v=DMARC1; p=none"}]
    checks_on.set_zones(zones)
    assert attempt(gateway_smtp)["data"][0] == 250
    head = capture_server.wait_for(1)[0].data.split(b"\r\n\r\n")[0]
    assert b"Received-SPF: softfail" in head
    assert b"spf=softfail smtp.mailfrom=alice@sender.example" in head
    assert accepted().checks["score"] == 2.0


def test_spf_temperror_defers(checks_on, gateway_smtp, protected_domain):
    zones = checks_on_zones()
    zones["sender.example"] = [{"MX": [10, "mx.sender.example"]}, {"TXT": "TIMEOUT"}]
    checks_on.set_zones(zones)
    out = attempt(gateway_smtp)
    assert out["rcpt"][0][0] == 451 and out["rcpt"][0][1].startswith(b"4.4.3 SPF check of sender.example")
    assert refused("spf").checks["spf"]["result"] == "temperror"


# --- DATA: DKIM and DMARC ------------------------------------------------------------------------------------

def forged(from_domain: str) -> bytes:
    return HAM.replace(b"From: Alice <alice@sender.example>", f"From: CEO <ceo@{from_domain}>".encode())


def test_dmarc_reject_is_honoured(checks_on, gateway_smtp, protected_domain):
    checks_on.add("_dmarc.bank.example", {"TXT": "v=DMARC1; p=reject"})
    out = attempt(gateway_smtp, data=forged("bank.example"))
    assert reply(out["data"]) == "550 5.7.1 Email rejected per DMARC policy for bank.example"
    message = refused("dmarc")
    assert message.checks["dmarc"]["result"] == "fail" and message.checks["dmarc"]["policy"] == "reject"
    assert message.header_from == "CEO <ceo@bank.example>"
    assert message.recipients.get().address == "bob@example.org"
    assert not Message.objects.exclude(state="refused").exists()


def test_dmarc_quarantine_scores_the_message_into_spam(checks_on, gateway_smtp, protected_domain, capture_server):
    checks_on.add("_dmarc.bank.example", {"TXT": "v=DMARC1; p=quarantine"})
    assert attempt(gateway_smtp, data=forged("bank.example"))["data"][0] == 250
    message = accepted()
    assert message.checks["dmarc"]["score"] == 5.0 and message.checks["score"] == 5.0
    # The scan counts it like a rule: spam, delivered tagged by default.
    assert message.verdict == "spam" and message.spam_score == 5.0
    assert any(r["name"] == "MAILGATE_SMTP_CHECKS" for r in message.spam_rules)
    assert b"Subject: [SPAM] Lunch" in capture_server.wait_for(1)[0].data


def test_dmarc_temperror_defers(checks_on, gateway_smtp, protected_domain):
    checks_on.add("_dmarc.bank.example", "TIMEOUT")
    out = attempt(gateway_smtp, data=forged("bank.example"))
    assert out["data"][0] == 451 and out["data"][1].startswith(b"4.4.3 DMARC policy of bank.example")


def test_dkim_signed_mail_passes_dkim_and_aligned_dmarc(checks_on, gateway_smtp, protected_domain,
                                                        capture_server):
    private, txt = dkim.generate_key("ed25519")
    signed = dkim.sign(forged("bank.example"), "bank.example", "s1", private, "ed25519-sha256") + \
        forged("bank.example")
    checks_on.add("_dmarc.bank.example", {"TXT": "v=DMARC1; p=reject"})
    checks_on.add("s1._domainkey.bank.example", {"TXT": txt})
    assert attempt(gateway_smtp, data=signed)["data"][0] == 250
    checks = accepted().checks
    assert checks["dkim"]["result"] == "pass" and checks["dkim"]["signatures"][0]["d"] == "bank.example"
    assert checks["dmarc"]["result"] == "pass"
    head = capture_server.wait_for(1)[0].data.split(b"\r\n\r\n")[0]
    assert b"dkim=pass" in head and b"header.d=bank.example" in head


def test_a_broken_signature_is_only_logged(checks_on, gateway_smtp, protected_domain):
    private, txt = dkim.generate_key("ed25519")
    signed = dkim.sign(HAM, "sender.example", "s1", private, "ed25519-sha256") + HAM.replace(b"noon", b"nine")
    checks_on.add("s1._domainkey.sender.example", {"TXT": txt})
    assert attempt(gateway_smtp, data=signed)["data"][0] == 250
    checks = accepted().checks
    assert checks["dkim"]["result"] == "fail" and checks["dkim"]["action"] == "log"
    assert checks["dmarc"]["result"] == "pass"  # SPF is aligned


def test_forged_authentication_results_are_removed_on_delivery(settings, checks_on, gateway_smtp,
                                                               protected_domain, capture_server):
    forged_header = f"Authentication-Results: {settings.SMTP_HOSTNAME}; spf=pass smtp.mailfrom=x@y.example\r\n"
    theirs = "Authentication-Results: mx.elsewhere.example; spf=pass smtp.mailfrom=x@y.example\r\n"
    data = forged_header.encode() + theirs.encode() + HAM
    assert attempt(gateway_smtp, data=data)["data"][0] == 250
    delivered = capture_server.wait_for(1)[0].data
    head = delivered.split(b"\r\n\r\n")[0]
    assert forged_header.encode() not in delivered
    assert theirs.encode() in delivered
    assert head.count(f"Authentication-Results: {settings.SMTP_HOSTNAME};".encode()) == 1
    assert bytes(RawMessage.objects.get().data) == data  # the stored original stays the original


# --- RCPT: lists, exemptions, call-ahead ---------------------------------------------------------------------

def test_block_list_refused_at_smtp_when_configured(checks_on, gateway_smtp, protected_domain):
    SenderListEntry.objects.create(kind="block", scope="global", sender="@sender.example")
    set_policy(blocked_sender_action="reject")
    out = attempt(gateway_smtp)
    assert reply(out["rcpt"][0]) == "554 5.7.1 <alice@sender.example>: Sender address rejected: Access denied"
    assert refused("blocked_sender").checks["blocked_sender"]["entry"] == "global @sender.example"


def test_block_list_left_to_the_scan_by_default(checks_on, gateway_smtp, protected_domain):
    SenderListEntry.objects.create(kind="block", scope="global", sender="@sender.example")
    assert attempt(gateway_smtp)["data"][0] == 250
    message = accepted()
    assert message.checks["blocked_sender"]["action"] == "log"
    assert message.verdict == "blocked_sender" and message.state == Message.State.QUARANTINED


def test_trusted_networks_skip_the_checks(checks_on, gateway_smtp, protected_domain):
    TrustedNetwork.objects.create(network="127.0.0.0/8")
    DNSBLZone.objects.create(zone="bl.test.example", action="reject")
    checks_on.add("1.0.0.127.bl.test.example", {"A": "127.0.0.2"})
    assert attempt(gateway_smtp, sender="someone@nowhere.example")["data"][0] == 250
    checks = accepted().checks
    assert checks["trusted"] is True and "sender_domain" not in checks and "spf" not in checks


def test_postmaster_is_reachable_from_a_listed_client(checks_on, gateway_smtp, protected_domain):
    DNSBLZone.objects.create(zone="bl.test.example", action="reject")
    checks_on.add("1.0.0.127.bl.test.example", {"A": "127.0.0.2"})
    out = attempt(gateway_smtp, to=("bob@example.org", "postmaster@example.org"))
    assert out["rcpt"][0][0] == 554
    assert out["rcpt"][1][0] == 250 and out["data"][0] == 250


def test_callahead_asks_the_route_and_remembers(checks_on, gateway_smtp, protected_domain, capture_server):
    from gateway.models import RecipientVerification

    protected_domain.recipient_check = "callahead"
    protected_domain.save()
    capture_server.handler.rcpt_script["nobody@example.org"] = ["550 5.1.1 no such user here"]
    out = attempt(gateway_smtp, to=("nobody@example.org", "bob@example.org"))
    assert reply(out["rcpt"][0]) == "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown"
    assert out["rcpt"][1][0] == 250 and out["data"][0] == 250
    assert refused("unknown_user").recipients.get().address == "nobody@example.org"
    assert RecipientVerification.objects.get(address="nobody@example.org").exists is False
    assert RecipientVerification.objects.get(address="bob@example.org").exists is True
    # Remembered: the route's server would say yes now (its script is used up), we still say no.
    out = attempt(gateway_smtp, to=("nobody@example.org",))
    assert out["rcpt"][0][0] == 550
    accepted_message = Message.objects.exclude(state="refused").get()
    assert accepted_message.checks["callahead"]["recipients"] == {"bob@example.org": "exists"}


def test_callahead_to_a_dead_route_defers(checks_on, gateway_smtp, protected_domain):
    from tests.support.servers import free_port

    route = protected_domain.route
    route.port = free_port()
    route.save()
    protected_domain.recipient_check = "callahead"
    protected_domain.save()
    out = attempt(gateway_smtp)
    assert out["rcpt"][0][0] == 451 and out["rcpt"][0][1].startswith(b"4.4.3 <bob@example.org>")
    set_policy(callahead_unreachable_action="log")
    assert attempt(gateway_smtp)["rcpt"][0][0] == 250


def checks_on_zones() -> dict:
    from tests.support.policy import GOOD_ZONES

    return {name: list(records) for name, records in GOOD_ZONES.items()}


# --- the cache of a busy MX ----------------------------------------------------------------------------------

def test_answers_are_kept_for_the_cache_ttl(settings, checks_on, gateway_smtp, protected_domain, capture_server):
    settings.SMTP_DNS_CACHE_TTL = 60
    assert attempt(gateway_smtp)["data"][0] == 250
    asked = len(checks_on.queries)
    assert asked > 0
    assert attempt(gateway_smtp)["data"][0] == 250
    assert len(checks_on.queries) == asked  # the second message asked DNS nothing
    first, second = Message.objects.exclude(state="refused").order_by("id")
    for name in ("fcrdns", "helo", "sender_domain", "spf"):
        assert second.checks[name]["result"] == first.checks[name]["result"] == "pass", name
        assert second.checks[name].get("cached") is True, name
    assert second.checks["dmarc"]["result"] == "pass"
    heads = [m.data.split(b"\r\n\r\n")[0] for m in capture_server.wait_for(2)]
    assert all(b"dmarc=pass" in head and b"Received-SPF: pass" in head for head in heads)


def test_a_cached_listing_still_refuses(settings, checks_on, gateway_smtp, protected_domain):
    settings.SMTP_DNS_CACHE_TTL = 60
    DNSBLZone.objects.create(zone="bl.test.example", action="reject")
    checks_on.add("1.0.0.127.bl.test.example", {"A": "127.0.0.2"})
    assert attempt(gateway_smtp)["rcpt"][0][0] == 554
    assert attempt(gateway_smtp)["rcpt"][0][0] == 554
    second = Message.objects.filter(refusal_reason="rbl").order_by("id").last()
    assert second.checks["dnsbl"]["cached"] is True
    # A change of the policy is a new question: the zone's action now only scores.
    DNSBLZone.objects.filter(zone="bl.test.example").update(action="score")
    assert attempt(gateway_smtp)["data"][0] == 250
