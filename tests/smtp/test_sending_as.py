"""A login sends only as the addresses it owns: the envelope sender is checked at MAIL, every address of the
header From and Sender after DATA (553 5.7.1, logged as `sender_not_owned`); an unreadable From is refused;
the null sender is for notifications only. A domain administrator sends as their domains, an administrator as
anyone; trusted networks relay as before. Real submission (smtplib over STARTTLS and implicit TLS, AUTH)
against our server, the capture server as the internet."""

from __future__ import annotations

import smtplib

import pytest

from gateway.models import Domain, MailFlowSettings, Message, Route, TrustedNetwork
from tests.support.people import PASSWORD, make_user
from tests.support.servers import insecure_tls

pytestmark = pytest.mark.usefixtures("scanners_off")

FRIEND = "friend@foreign.example"


def mail(header_from: str = "Alice <alice@a.test>", *, extra: str = "", body: str = "Hello.") -> bytes:
    return (f"From: {header_from}\r\nTo: {FRIEND}\r\nSubject: Hello\r\n{extra}"
            f"Message-ID: <m1@a.test>\r\n\r\n{body}\r\n").encode()


@pytest.fixture
def tenants(transactional_db, capture_server):
    """Two tenants, a.test and b.test, both ours; alice (user of a.test, aliases sales@, ali.ce@, josé@), dana
    (domain administrator of a.test), bob (user of b.test), root (administrator); the internet is the capture
    server."""
    route = Route.objects.create(name="mailstore", host="127.0.0.1", port=capture_server.port)
    a = Domain.objects.create(name="a.test", route=route)
    b = Domain.objects.create(name="b.test", route=route)
    config = MailFlowSettings.load()
    config.outbound_relay = capture_server.address
    config.save()
    make_user("alice", email="alice@a.test", aliases="sales@a.test\nAli.Ce@A.test\njosé@a.test")
    make_user("dana", role="domain_admin", email="dana@a.test", domains=[a])
    make_user("bob", email="bob@b.test")
    make_user("root", role="admin", email="root@a.test", superuser=True)
    return a, b


def submit(server, login: str, sender: str, data: bytes, *, implicit_tls: bool = False) -> dict:
    """One authenticated transaction; the replies at each step (the first refusal ends it)."""
    client = server.smtps() if implicit_tls else server.submission()
    with client:
        if not implicit_tls:
            client.starttls(context=insecure_tls())
        client.ehlo()
        client.login(login, PASSWORD)
        out = {"mail": client.mail(sender)}
        if out["mail"][0] != 250:
            return out
        out["rcpt"] = client.rcpt(FRIEND)
        out["data"] = client.data(data)
        return out


def reply(result: tuple) -> str:
    code, text = result
    return f"{code} {text.decode()}"


def refusal() -> Message:
    return Message.objects.get(state=Message.State.REFUSED, refusal_reason="sender_not_owned")


# --- the envelope sender, at MAIL --------------------------------------------------------------------------

def test_a_user_cannot_send_as_another_tenant(gateway_smtp_tls, tenants, capture_server):
    out = submit(gateway_smtp_tls, "alice", "ceo@b.test", mail("CEO <ceo@b.test>"))
    assert reply(out["mail"]) == "553 5.7.1 <ceo@b.test>: Sender address rejected: not owned by user alice"
    message = refusal()
    assert message.envelope_sender == "ceo@b.test" and message.authenticated_as == "alice"
    assert message.smtp_reply == "553 5.7.1 <ceo@b.test>: Sender address rejected: not owned by user alice"
    assert message.checks["sender_ownership"]["where"] == "MAIL FROM"
    assert message.checks["sender_ownership"]["user"] == "alice"
    assert not Message.objects.exclude(state=Message.State.REFUSED).exists()
    assert capture_server.messages == []


def test_the_same_session_may_go_on_with_an_address_it_owns(gateway_smtp_tls, tenants, capture_server):
    with gateway_smtp_tls.smtps() as client:
        client.login("alice", PASSWORD)
        assert client.mail("ceo@b.test")[0] == 553
        assert client.mail("alice@a.test")[0] == 250
        assert client.rcpt(FRIEND)[0] == 250
        assert client.data(mail())[0] == 250
    assert capture_server.wait_for(1)[0].sender == "alice@a.test"


@pytest.mark.parametrize("sender", ["alice@a.test", "ALICE@A.TEST", "sales@a.test", "ali.ce@a.test",
                                    '"alice"@a.test', "alice@a.test."])
def test_a_user_sends_as_their_address_and_aliases(gateway_smtp_tls, tenants, capture_server, sender):
    out = submit(gateway_smtp_tls, "alice", sender, mail(), implicit_tls=True)
    assert out["data"][0] == 250, out
    message = Message.objects.get()
    assert message.checks["sender_ownership"] == {"result": "pass", "user": "alice",
                                                  "seconds": message.checks["sender_ownership"]["seconds"]}


@pytest.mark.parametrize("sender", ["alice@b.test", "alice@a.test.b.test", "alice+tag@a.test", "dana@a.test",
                                    "someone@foreign.example"])
def test_a_user_owns_nothing_else(gateway_smtp_tls, tenants, sender):
    out = submit(gateway_smtp_tls, "alice", sender, mail())
    assert out["mail"][0] == 553 and out["mail"][1].startswith(b"5.7.1 <"), out
    assert refusal().envelope_sender == sender


def test_a_login_by_email_address_is_the_same_login(gateway_smtp_tls, tenants):
    out = submit(gateway_smtp_tls, "alice@a.test", "bob@b.test", mail("bob@b.test"))
    assert reply(out["mail"]) == "553 5.7.1 <bob@b.test>: Sender address rejected: not owned by user alice"


def test_a_domain_administrator_sends_as_any_address_of_their_domains(gateway_smtp_tls, tenants, capture_server):
    out = submit(gateway_smtp_tls, "dana", "ceo@a.test", mail("CEO <ceo@a.test>"))
    assert out["data"][0] == 250, out
    out = submit(gateway_smtp_tls, "dana", "ceo@b.test", mail("CEO <ceo@b.test>"))
    assert reply(out["mail"]) == "553 5.7.1 <ceo@b.test>: Sender address rejected: not owned by user dana"
    out = submit(gateway_smtp_tls, "dana", "dana@a.test", mail("CEO <ceo@b.test>"))
    assert reply(out["data"]) == "553 5.7.1 <ceo@b.test>: From header address rejected: not owned by user dana"


def test_an_administrator_may_send_as_anyone(gateway_smtp_tls, tenants, capture_server):
    data = mail("CEO <ceo@b.test>", extra="Sender: x@foreign.example\r\n")
    out = submit(gateway_smtp_tls, "root", "ceo@b.test", data)
    assert out["data"][0] == 250, out
    assert capture_server.wait_for(1)[0].sender == "ceo@b.test"


def test_an_inactive_or_deleted_login_owns_nothing(gateway_smtp_tls, tenants):
    from django.contrib.auth import get_user_model

    with gateway_smtp_tls.smtps() as client:
        client.login("bob", PASSWORD)
        get_user_model().objects.filter(username="bob").update(is_active=False)  # after AUTH, before MAIL
        assert client.mail("bob@b.test")[0] == 553


# --- the header From and Sender, after DATA ------------------------------------------------------------------

def test_a_header_from_not_owned_is_refused_after_data(gateway_smtp_tls, tenants, capture_server):
    out = submit(gateway_smtp_tls, "alice", "alice@a.test", mail("CEO <ceo@b.test>"))
    assert reply(out["data"]) == "553 5.7.1 <ceo@b.test>: From header address rejected: not owned by user alice"
    message = refusal()
    assert message.header_from == "CEO <ceo@b.test>"
    assert list(message.recipients.values_list("address", flat=True)) == [FRIEND]
    assert message.checks["sender_ownership"]["where"] == "From"
    assert message.checks["sender_ownership"]["address"] == "ceo@b.test"
    assert not Message.objects.exclude(state=Message.State.REFUSED).exists()
    assert capture_server.messages == []


OWNED_FROMS = {
    "display name": "Alice Example <alice@a.test>",
    "RFC 2047 display name": "=?utf-8?q?Al=C3=AFce?= <alice@a.test>",
    "upper case": "ALICE@A.TEST",
    "alias": "Sales <sales@a.test>",
    "two owned addresses": "alice@a.test, Sales <sales@a.test>",
    "a group of owned addresses": "Us: alice@a.test, sales@a.test;",
    "comments": "alice@a.test (Alice (at work))",
    "obsolete phrase": "Alice Q. Example <alice@a.test>",
    "obsolete route": "Alice <@relay.a.test:alice@a.test>",
    "quoted local part": '"alice"@a.test',
    "folded": "Alice\r\n <alice@a.test>",
    "a UTF-8 local part (RFC 6532)": "José <josé@a.test>",
}


@pytest.mark.parametrize("header_from", OWNED_FROMS.values(), ids=OWNED_FROMS.keys())
def test_owned_from_fields_in_their_many_forms_pass(gateway_smtp_tls, tenants, header_from):
    out = submit(gateway_smtp_tls, "alice", "alice@a.test", mail(header_from))
    assert out["data"][0] == 250, out


NOT_OWNED_FROMS = {
    "an encoded display name": "=?utf-8?q?Alice?= <ceo@b.test>",
    "our address as display name": '"alice@a.test" <ceo@b.test>',
    "one of two": "alice@a.test, ceo@b.test",
    "in a group": "Board: alice@a.test, ceo@b.test;",
    "a domain literal": "alice@[127.0.0.1]",
    "a subdomain": "alice@mail.a.test",
}


@pytest.mark.parametrize("header_from", NOT_OWNED_FROMS.values(), ids=NOT_OWNED_FROMS.keys())
def test_every_address_of_the_from_must_be_owned(gateway_smtp_tls, tenants, header_from):
    out = submit(gateway_smtp_tls, "alice", "alice@a.test", mail(header_from))
    assert out["data"][0] == 553 and out["data"][1].startswith(b"5.7.1 <"), out
    assert refusal().checks["sender_ownership"]["result"] == "fail"


UNREADABLE = {
    "no From": (b"From: Alice <alice@a.test>\r\n", b""),
    "two From fields": (b"From: Alice <alice@a.test>\r\n", b"From: Alice <alice@a.test>\r\nFrom: ceo@b.test\r\n"),
    "a From after a line that is not a field": (b"From: Alice <alice@a.test>\r\n",
                                                b"From: Alice <alice@a.test>\r\nnot a field\r\nFrom: ceo@b.test\r\n"),
    "From with a space before the colon": (b"From: Alice <alice@a.test>\r\n",
                                           b"From: Alice <alice@a.test>\r\nFrom : ceo@b.test\r\n"),
    "two addresses run together": (b"From: Alice <alice@a.test>\r\n", b"From: alice@a.test<ceo@b.test>\r\n"),
    "an encoded word as address": (b"From: Alice <alice@a.test>\r\n", b"From: =?utf-8?q?ceo=40b.test?=\r\n"),
    "an unterminated comment": (b"From: Alice <alice@a.test>\r\n", b"From: alice@a.test (Alice\r\n"),
    "an empty group": (b"From: Alice <alice@a.test>\r\n", b"From: undisclosed-recipients:;\r\n"),
    "no domain": (b"From: Alice <alice@a.test>\r\n", b"From: alice\r\n"),
    "two Sender fields": (b"From: Alice <alice@a.test>\r\n",
                          b"From: Alice <alice@a.test>\r\nSender: alice@a.test\r\nSender: sales@a.test\r\n"),
}


@pytest.mark.parametrize("old, new", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_a_from_that_cannot_be_read_for_sure_is_refused(gateway_smtp_tls, tenants, old, new):
    out = submit(gateway_smtp_tls, "alice", "alice@a.test", mail().replace(old, new))
    assert out["data"][0] == 553 and out["data"][1].startswith(b"5.7.1 "), out
    assert refusal().smtp_reply.startswith("553 5.7.1 ")


def test_the_sender_field_must_be_owned_too(gateway_smtp_tls, tenants):
    out = submit(gateway_smtp_tls, "alice", "alice@a.test", mail(extra="Sender: Secretary <ceo@b.test>\r\n"))
    assert reply(out["data"]) == "553 5.7.1 <ceo@b.test>: Sender header address rejected: not owned by user alice"
    assert refusal().checks["sender_ownership"]["where"] == "Sender"
    out = submit(gateway_smtp_tls, "alice", "alice@a.test", mail(extra="Sender: sales@a.test\r\n"))
    assert out["data"][0] == 250


# --- the null sender ---------------------------------------------------------------------------------------

REPORT = ("Content-Type: multipart/report; report-type=disposition-notification;\r\n boundary=\"b1\"\r\n"
          "MIME-Version: 1.0\r\n")
REPORT_BODY = ("--b1\r\nContent-Type: text/plain\r\n\r\nYour message was read.\r\n--b1\r\n"
               "Content-Type: message/disposition-notification\r\n\r\n"
               "Final-Recipient: rfc822; alice@a.test\r\nDisposition: manual-action/MDN-sent-manually; displayed\r\n"
               "--b1--")


def test_the_null_sender_is_refused_for_ordinary_mail(gateway_smtp_tls, tenants, capture_server):
    out = submit(gateway_smtp_tls, "alice", "", mail())
    assert out["mail"][0] == 250  # whether it is a notification is known after DATA
    assert reply(out["data"]) == ("553 5.7.1 <>: Sender address rejected: the null sender is for delivery reports "
                                  "and automatic replies (RFC 5321 4.5.5), and this message is neither")
    message = refusal()
    assert message.envelope_sender == "" and message.checks["sender_ownership"]["address"] == "<>"
    assert capture_server.messages == []


@pytest.mark.parametrize("extra, body, why", [
    (REPORT, REPORT_BODY, "multipart/report"),
    ("Auto-Submitted: auto-replied\r\n", "I am away until Monday.", "Auto-Submitted: auto-replied"),
    ("Auto-Submitted: auto-generated (vacation)\r\n", "I am away.", "Auto-Submitted: auto-generated"),
])
def test_the_null_sender_for_reports_and_automatic_replies(gateway_smtp_tls, tenants, capture_server, extra, body,
                                                           why):
    out = submit(gateway_smtp_tls, "alice", "", mail(extra=extra, body=body))
    assert out["data"][0] == 250, out
    assert Message.objects.get().checks["sender_ownership"]["null_sender"] == why
    assert capture_server.wait_for(1)[0].sender in ("", "<>")  # the null sender, as aiosmtpd shows it


def test_auto_submitted_no_is_not_a_notification(gateway_smtp_tls, tenants):
    out = submit(gateway_smtp_tls, "alice", "", mail(extra="Auto-Submitted: no\r\n"))
    assert out["data"][0] == 553


def test_a_notification_still_needs_an_owned_from(gateway_smtp_tls, tenants):
    out = submit(gateway_smtp_tls, "alice", "", mail("MAILER-DAEMON@b.test", extra=REPORT, body=REPORT_BODY))
    assert reply(out["data"]) == ("553 5.7.1 <MAILER-DAEMON@b.test>: From header address rejected: not owned by "
                                  "user alice")


# --- who is not held to it ---------------------------------------------------------------------------------

def test_trusted_networks_relay_as_configured(gateway_smtp_tls, tenants, capture_server):
    TrustedNetwork.objects.create(network="127.0.0.0/8")
    with gateway_smtp_tls.client() as client:
        client.sendmail("ceo@b.test", [FRIEND], mail("CEO <ceo@b.test>"))
    delivered = capture_server.wait_for(1)[0]
    assert delivered.sender == "ceo@b.test"
    message = Message.objects.get()
    assert message.checks["trusted"] is True and "sender_ownership" not in message.checks


def test_mail_from_outside_to_us_is_not_held_to_a_login(gateway_smtp_tls, tenants, capture_server):
    with gateway_smtp_tls.client() as client:
        client.sendmail("someone@foreign.example", ["alice@a.test"], mail("Someone <someone@foreign.example>"))
    assert capture_server.wait_for(1)[0].recipients == ["alice@a.test"]
    assert "sender_ownership" not in Message.objects.get().checks


def test_refused_submissions_keep_the_client_in_a_clean_state(gateway_smtp_tls, tenants, capture_server):
    with gateway_smtp_tls.smtps() as client:
        client.login("alice", PASSWORD)
        with pytest.raises(smtplib.SMTPDataError) as excinfo:
            client.sendmail("alice@a.test", [FRIEND], mail("ceo@b.test"))
        assert excinfo.value.smtp_code == 553
        client.sendmail("alice@a.test", [FRIEND], mail())
    assert len(capture_server.wait_for(1)) == 1
    assert Message.objects.filter(state=Message.State.REFUSED).count() == 1


def test_when_the_logins_addresses_cannot_be_read_the_client_tries_later(gateway_smtp_tls, tenants, monkeypatch):
    from django.db import OperationalError

    from gateway.policy import senders

    def database_down(username: str):
        raise OperationalError("the database went away")

    monkeypatch.setattr(senders, "load_rights", database_down)
    out = submit(gateway_smtp_tls, "alice", "alice@a.test", mail())
    assert reply(out["mail"]) == "451 4.3.0 Temporary local problem, please try again later"
    assert refusal().envelope_sender == "alice@a.test"
