"""The recipient check "ldap" against the real slapd: an address the directory holds (its mail, an alias, an
Active Directory proxy address) is taken, an unknown one refused with 550 5.1.1, the answers are kept and used
on the next try, and while the directory is down the SMTP server answers 451 4.4.3 (or accepts, when the
directory says so) instead of refusing mail for people who exist."""

from __future__ import annotations

import smtplib

import pytest

from gateway.directory import ldap as directory_ldap
from gateway.models import Directory, DirectoryLookup, Domain, Message, Route
from tests.support.directory import make_ldap_directory, private_slapd, require_slapd

HAM = (b"From: Sender <someone@sender.example>\r\nTo: people@example.edu\r\nSubject: Hello\r\n"
       b"Message-ID: <dir-1@sender.example>\r\n\r\nHello.\r\n")

pytestmark = pytest.mark.usefixtures("scanners_off")


@pytest.fixture
def edu(transactional_db, capture_server) -> Domain:
    require_slapd()
    route = Route.objects.create(name="edu-store", host="127.0.0.1", port=capture_server.port)
    return Domain.objects.create(name="example.edu", route=route, recipient_check=Domain.RecipientCheck.LDAP)


@pytest.fixture
def searches(monkeypatch) -> list[str]:
    """The addresses the SMTP server really looked up in a directory (the real search, counted)."""
    asked: list[str] = []
    real = directory_ldap.find_address

    def counted(conn, directory, address):
        asked.append(address)
        return real(conn, directory, address)

    monkeypatch.setattr(directory_ldap, "find_address", counted)
    return asked


def rcpts(server, addresses) -> list[tuple[int, str]]:
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.example.net", timeout=30) as client:
        client.ehlo()
        assert client.mail("someone@sender.example")[0] == 250
        return [(code, text.decode()) for code, text in (client.rcpt(address) for address in addresses)]


def test_the_directory_says_who_exists(gateway_smtp, edu, searches, capture_server):
    make_ldap_directory(edu)
    known = ["alice@example.edu", "A.Liddell@example.edu", "robert.jones@example.edu", "info@example.edu"]
    answers = rcpts(gateway_smtp, [*known, "nobody@example.edu", "postmaster@example.edu"])
    assert [code for code, _ in answers[:4]] == [250] * 4
    assert answers[4] == (550, "5.1.1 <nobody@example.edu>: Recipient address rejected: User unknown")
    assert answers[5][0] == 250  # postmaster is always taken (RFC 5321 §4.5.1), without asking
    assert "postmaster@example.edu" not in searches
    refusal = Message.objects.get(state=Message.State.REFUSED, refusal_reason="unknown_user")
    assert refusal.recipients.get().address == "nobody@example.edu"
    assert refusal.checks["directory"]["recipients"]["nobody@example.edu"] == "not in ldap example.edu"
    assert refusal.checks["directory"]["result"] == "fail"
    assert DirectoryLookup.objects.get(address="nobody@example.edu").exists is False
    assert DirectoryLookup.objects.get(address="a.liddell@example.edu").exists is True


def test_the_second_try_is_answered_from_the_cache(gateway_smtp, edu, searches):
    make_ldap_directory(edu)
    assert [code for code, _ in rcpts(gateway_smtp, ["carol@example.edu", "nobody@example.edu"])] == [250, 550]
    assert searches == ["carol@example.edu", "nobody@example.edu"]
    assert [code for code, _ in rcpts(gateway_smtp, ["carol@example.edu", "nobody@example.edu"])] == [250, 550]
    assert searches == ["carol@example.edu", "nobody@example.edu"]  # nothing asked again
    remembered = Message.objects.filter(state=Message.State.REFUSED).order_by("id").last()
    assert remembered.checks["directory"]["recipients"]["nobody@example.edu"] == \
        "not in ldap example.edu (remembered)"


def test_another_smtp_node_uses_the_shared_cache(gateway_smtp, edu, searches):
    make_ldap_directory(edu)
    rcpts(gateway_smtp, ["bob@example.edu"])
    from tests.support.servers import GatewayServer

    other = GatewayServer().start()  # a second node: its own memory, the same database
    try:
        assert rcpts(other, ["bob@example.edu"])[0][0] == 250
    finally:
        other.stop()
    assert searches == ["bob@example.edu"]


def test_while_the_directory_is_down_recipients_are_deferred(gateway_smtp, edu, tmp_path, searches):
    with private_slapd(tmp_path / "slapd") as (url, stop, start):
        directory = make_ldap_directory(edu, uri=url)
        assert rcpts(gateway_smtp, ["carol@example.edu"])[0][0] == 250
        stop()
        code, text = rcpts(gateway_smtp, ["alice@example.edu"])[0]
        assert (code, text) == (451, "4.4.3 <alice@example.edu>: Recipient address rejected: the directory "
                                     "cannot be asked, try again later")
        deferred = Message.objects.filter(state=Message.State.REFUSED).order_by("id").last()
        assert deferred.checks["directory"]["recipients"]["alice@example.edu"].startswith("unreachable: ")
        assert not DirectoryLookup.objects.filter(address="alice@example.edu").exists()  # not kept
        # What was found before the directory went away is still known.
        assert rcpts(gateway_smtp, ["carol@example.edu"])[0][0] == 250
        # The administrator's choice: accept unchecked while the directory cannot be asked.
        Directory.objects.filter(pk=directory.pk).update(unreachable=Directory.Unreachable.ACCEPT)
        from tests.support.servers import GatewayServer

        other = GatewayServer().start()  # a node that reads the changed directory at once
        try:
            assert rcpts(other, ["alice@example.edu"])[0][0] == 250
            start()
            assert rcpts(other, ["nobody@example.edu"])[0][0] == 550  # back: asked again, and refused
        finally:
            other.stop()


def test_a_domain_without_a_directory_defers_rather_than_accepts(gateway_smtp, edu):
    assert rcpts(gateway_smtp, ["alice@example.edu"])[0][0] == 451


def test_an_address_is_never_a_filter(gateway_smtp, edu, searches):
    make_ldap_directory(edu)
    # RFC 5321 allows a quoted local part with LDAP filter characters; it is searched for as text.
    answers = rcpts(gateway_smtp, ['"*"@example.edu', '"al*"@example.edu'])
    assert [code for code, _ in answers] == [550, 550]
