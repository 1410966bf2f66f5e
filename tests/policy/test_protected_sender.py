"""Mail from outside that claims one of our domains (envelope sender or header From) without a passing SPF or
an aligned passing DKIM signature for it: the check "protected_sender", scored by default, refused when set to,
recorded in Message.checks like the others. A real client (smtplib) against our server, DNS served by the stub."""

from __future__ import annotations

import io
import json
import smtplib

import pytest
from django.core.management import call_command

from gateway.mailauth import dkim
from gateway.models import Message, SMTPPolicy, TrustedNetwork
from tests.support.people import PASSWORD, make_user
from tests.support.servers import insecure_tls

pytestmark = pytest.mark.usefixtures("scanners_off")


def letter(header_from: str = "CEO <ceo@example.org>") -> bytes:
    return (f"From: {header_from}\r\nTo: bob@example.org\r\nSubject: Urgent wire transfer\r\n"
            f"Message-ID: <wire-1@example.org>\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\n\r\n"
            f"Please pay the attached invoice today.\r\n").encode()


def set_policy(**fields) -> None:
    policy = SMTPPolicy.load()
    for name, value in fields.items():
        setattr(policy, name, value)
    policy.save()


def attempt(server, *, sender: str = "alice@sender.example", data: bytes | None = None,
            to: tuple[str, ...] = ("bob@example.org",)) -> dict:
    """One transaction from 127.0.0.1 (client.example.net); the replies at each step."""
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.example.net", timeout=30) as client:
        client.ehlo()
        out = {"mail": client.mail(sender)}
        out["rcpt"] = [client.rcpt(address) for address in to]
        if any(code == 250 for code, _ in out["rcpt"]):
            out["data"] = client.data(letter() if data is None else data)
        return out


def reply(result: tuple) -> str:
    code, text = result
    return f"{code} {text.decode()}"


def accepted() -> Message:
    return Message.objects.exclude(state=Message.State.REFUSED).get()


@pytest.fixture
def ours(checks_on, protected_domain):
    """example.org is ours and publishes an MX (no SPF record, no DMARC record)."""
    checks_on.add("example.org", {"MX": [10, "mx.sender.example"]})
    return checks_on


def signed(data: bytes, domain: str, stub, *, publish: bool = True) -> bytes:
    private, txt = dkim.generate_key("ed25519")
    if publish:
        stub.add(f"s1._domainkey.{domain}", {"TXT": txt})
    return dkim.sign(data, domain, "s1", private, "ed25519-sha256") + data


# --- the finding, and what each action does --------------------------------------------------------------

def test_our_domain_in_the_from_of_mail_from_outside_is_scored_by_default(ours, gateway_smtp):
    out = attempt(gateway_smtp)
    assert out["data"][0] == 250, out
    checks = accepted().checks
    assert checks["protected_sender"] == {
        "result": "fail", "domains": ["example.org"], "unauthenticated": ["example.org"], "action": "score",
        "score": 3.0, "seconds": checks["protected_sender"]["seconds"]}
    assert checks["spf"]["result"] == "pass"  # for sender.example: not our domain's
    assert checks["score"] == 3.0


def test_refused_550_when_set_to_reject(ours, gateway_smtp):
    set_policy(protected_sender_action="reject")
    out = attempt(gateway_smtp)
    assert reply(out["data"]) == ("550 5.7.1 <example.org>: Sender address rejected: our domain, not authenticated "
                                  "by SPF or DKIM from [127.0.0.1]")
    message = Message.objects.get(state=Message.State.REFUSED, refusal_reason="protected_sender")
    assert message.header_from == "CEO <ceo@example.org>"
    assert message.envelope_sender == "alice@sender.example"
    assert list(message.recipients.values_list("address", flat=True)) == ["bob@example.org"]
    assert message.checks["protected_sender"]["reply"] == message.smtp_reply
    assert not Message.objects.exclude(state=Message.State.REFUSED).exists()


def test_deferred_450_when_set_to_tempfail(ours, gateway_smtp):
    set_policy(protected_sender_action="tempfail")
    out = attempt(gateway_smtp)
    assert reply(out["data"]).startswith("450 4.7.1 <example.org>: Sender address rejected: our domain")


def test_log_records_without_points(ours, gateway_smtp):
    set_policy(protected_sender_action="log")
    assert attempt(gateway_smtp)["data"][0] == 250
    checks = accepted().checks
    assert checks["protected_sender"]["result"] == "fail" and checks["protected_sender"]["action"] == "log"
    assert "score" not in checks


def test_our_domain_as_envelope_sender_without_spf(ours, gateway_smtp):
    set_policy(protected_sender_action="reject")
    out = attempt(gateway_smtp, sender="ceo@example.org", data=letter("Someone <someone@elsewhere.example>"))
    assert out["data"][0] == 550 and b"<example.org>" in out["data"][1]
    assert Message.objects.get(refusal_reason="protected_sender").checks["spf"]["result"] == "none"


# --- what backs a claim ------------------------------------------------------------------------------------

def test_spf_pass_for_our_domain_backs_it(ours, gateway_smtp):
    set_policy(protected_sender_action="reject")
    ours.add("example.org", {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"})
    assert attempt(gateway_smtp, sender="billing@example.org")["data"][0] == 250
    checks = accepted().checks
    assert checks["spf"]["result"] == "pass"
    assert checks["protected_sender"]["result"] == "pass" and checks["protected_sender"]["domains"] == ["example.org"]


def test_an_aligned_dkim_signature_backs_the_from(ours, gateway_smtp):
    set_policy(protected_sender_action="reject")
    assert attempt(gateway_smtp, data=signed(letter(), "example.org", ours))["data"][0] == 250
    assert accepted().checks["protected_sender"]["result"] == "pass"


def test_a_signature_of_a_subdomain_is_aligned_relaxed(ours, gateway_smtp):
    set_policy(protected_sender_action="reject")
    assert attempt(gateway_smtp, data=signed(letter(), "news.example.org", ours))["data"][0] == 250
    assert accepted().checks["protected_sender"]["result"] == "pass"


def test_the_dkim_check_being_off_does_not_skip_the_signatures(ours, gateway_smtp):
    set_policy(protected_sender_action="reject", dkim_action="off", dmarc_reject_action="off",
               dmarc_quarantine_action="off")
    assert attempt(gateway_smtp, data=signed(letter(), "example.org", ours))["data"][0] == 250


def test_someone_elses_signature_or_a_broken_one_does_not(ours, gateway_smtp):
    set_policy(protected_sender_action="reject")
    out = attempt(gateway_smtp, data=signed(letter(), "sender.example", ours))
    assert out["data"][0] == 550
    Message.objects.all().delete()
    tampered = signed(letter(), "example.org", ours).replace(b"today", b"now")
    out = attempt(gateway_smtp, data=tampered)
    assert out["data"][0] == 550
    assert Message.objects.get(refusal_reason="protected_sender").checks["dkim"]["result"] == "fail"


def test_a_key_that_cannot_be_looked_up_defers(ours, gateway_smtp):
    set_policy(protected_sender_action="reject")
    data = signed(letter(), "example.org", ours, publish=False)
    ours.add("s1._domainkey.example.org", "TIMEOUT")
    out = attempt(gateway_smtp, data=data)
    assert reply(out["data"]).startswith("451 4.4.3 <example.org>: Sender address not verified")
    assert Message.objects.get(refusal_reason="protected_sender").checks["protected_sender"]["result"] == "temperror"


# --- who and what is not checked ---------------------------------------------------------------------------

def test_mail_that_claims_no_domain_of_ours_has_no_entry(ours, gateway_smtp):
    assert attempt(gateway_smtp, data=letter("Alice <alice@sender.example>"))["data"][0] == 250
    assert "protected_sender" not in accepted().checks


def test_off_means_not_checked(ours, gateway_smtp):
    set_policy(protected_sender_action="off")
    assert attempt(gateway_smtp)["data"][0] == 250
    assert "protected_sender" not in accepted().checks


def test_without_the_dns_checks_it_does_not_run(settings, ours, gateway_smtp):
    set_policy(protected_sender_action="reject")
    settings.SMTP_DNS_CHECKS = "false"  # no SPF, no DKIM: it would find every claim unbacked
    assert attempt(gateway_smtp)["data"][0] == 250
    checks = accepted().checks
    assert "protected_sender" not in checks and checks["dns_checks"] == "off: SMTP_DNS_CHECKS=false"


def test_trusted_networks_are_not_checked(ours, gateway_smtp):
    set_policy(protected_sender_action="reject")
    TrustedNetwork.objects.create(network="127.0.0.0/8")
    assert attempt(gateway_smtp, sender="printer@example.org")["data"][0] == 250
    assert "protected_sender" not in accepted().checks


def test_authenticated_mail_is_held_to_its_login_instead(ours, gateway_smtp_tls):
    set_policy(protected_sender_action="reject")
    make_user("ceo", email="ceo@example.org")
    with gateway_smtp_tls.submission() as client:
        client.starttls(context=insecure_tls())
        client.ehlo()
        client.login("ceo", PASSWORD)
        client.sendmail("ceo@example.org", ["bob@example.org"], letter())
    checks = accepted().checks
    assert "protected_sender" not in checks and checks["sender_ownership"]["result"] == "pass"


def test_postmaster_is_no_exception_after_data(ours, gateway_smtp):
    # Like DMARC, the check judges the message after DATA, for all its recipients.
    set_policy(protected_sender_action="reject")
    out = attempt(gateway_smtp, to=("postmaster@example.org",))
    assert out["rcpt"][0][0] == 250 and out["data"][0] == 550


# --- configuration ---------------------------------------------------------------------------------------

def test_smtppolicy_shows_and_sets_the_check(db):
    out = io.StringIO()
    call_command("smtppolicy", "show", stdout=out)
    policy = json.loads(out.getvalue())["policy"]
    assert policy["protected_sender_action"] == "score" and policy["protected_sender_score"] == 3.0
    call_command("smtppolicy", "set", "protected_sender_action=reject", "protected_sender_score=4.5",
                 stdout=io.StringIO())
    stored = SMTPPolicy.load()
    assert (stored.protected_sender_action, stored.protected_sender_score) == ("reject", 4.5)
