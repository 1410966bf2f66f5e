"""Logins from the organisation's directories against the real slapd and Dovecot of .ci/services.sh: an LDAP user
logs in with their directory password and becomes an account with the addresses and role the directory gives,
refreshed at each login, without a password of ours; an IMAP user logs in with their mailbox's password; wrong
passwords are refused and throttled like any other; nothing a directory says reaches beyond its own domain."""

from __future__ import annotations

import logging

import pytest
from django.contrib.auth import authenticate, get_user_model
from django.test import Client

from gateway.access import Role, addresses_of, domains_of, is_admin, role_of
from gateway.models import AuditEvent, Directory, Domain, UserProfile
from tests.support.directory import (
    PASSWORDS,
    fresh_ip,
    imap_url,
    ldaps_url,
    make_ldap_directory,
    require_slapd,
    route_and_domain,
)
from tests.support.people import make_user

User = get_user_model()


def web_login(username: str, password: str, *, ip: str = "192.0.2.10") -> tuple[Client, int]:
    client = Client(REMOTE_ADDR=ip)
    response = client.post("/login/", {"username": username, "password": password})
    return client, response.status_code


def logged_in_as(client: Client) -> str:
    return client.get("/account/").wsgi_request.user.get_username()


# --- LDAP ------------------------------------------------------------------------------------------------

def test_an_ldap_user_logs_in_and_gets_their_addresses_and_role_from_the_directory(ldap_directory):
    client, status = web_login("alice", PASSWORDS["alice"])
    assert status == 302  # to the dashboard
    alice = User.objects.get(username="alice@example.edu")
    assert logged_in_as(client) == "alice@example.edu"
    assert alice.mail_profile.directory == ldap_directory
    assert not alice.has_usable_password()  # the directory judges every login
    assert addresses_of(alice) == ["alice@example.edu", "a.liddell@example.edu", "postmaster-team@example.edu"]
    # In the administrators' group of a domain's directory: the most that directory may give, the domain.
    assert role_of(alice) == Role.DOMAIN_ADMIN and domains_of(alice) == ["example.edu"]
    assert not is_admin(alice) and not alice.is_superuser
    assert (alice.first_name, alice.last_name) == ("Alice", "Liddell")
    event = AuditEvent.objects.get(action="directory_account_created")
    assert event.detail["directory"] == ldap_directory.name and event.detail["role"] == Role.DOMAIN_ADMIN


def test_groups_map_to_roles_and_active_directory_addresses_are_read(ldap_directory):
    assert authenticate(username="bob@example.edu", password=PASSWORDS["bob"], client_ip="192.0.2.1") is not None
    bob = User.objects.get(username="bob@example.edu")
    assert role_of(bob) == Role.DOMAIN_ADMIN and domains_of(bob) == ["example.edu"]
    # proxyAddresses as Active Directory writes them: SMTP: the primary, smtp: an alias, X400: not mail.
    assert addresses_of(bob) == ["bob@example.edu", "robert.jones@example.edu"]
    carol = authenticate(username="carol", password=PASSWORDS["carol"], client_ip="192.0.2.1")
    assert carol is not None and role_of(carol) == Role.USER and domains_of(carol) == []
    # carol@elsewhere.example is in her entry, but not a domain this directory speaks for.
    assert addresses_of(carol) == ["carol@example.edu", "info@example.edu"]


def test_a_directory_for_every_domain_makes_administrators_of_its_administrators_group(db):
    require_slapd()
    route_and_domain("example.edu")
    make_ldap_directory(None, uri=ldaps_url())  # LDAPS this time, no domain
    alice = authenticate(username="alice", password=PASSWORDS["alice"], client_ip="192.0.2.1")
    assert alice is not None and is_admin(alice) and alice.is_superuser and alice.is_staff
    bob = authenticate(username="bob", password=PASSWORDS["bob"], client_ip="192.0.2.1")
    assert role_of(bob) == Role.DOMAIN_ADMIN and domains_of(bob) == ["example.edu"]


def test_role_and_addresses_are_refreshed_at_each_login(ldap_directory):
    alice = authenticate(username="alice", password=PASSWORDS["alice"], client_ip="192.0.2.1")
    assert role_of(alice) == Role.DOMAIN_ADMIN
    # What an administrator does in the directory (a group emptied, an alias attribute dropped), seen at the
    # next login: the same account, its role and addresses as the directory now says.
    Directory.objects.filter(pk=ldap_directory.pk).update(admin_group="", alias_attributes="")
    again = authenticate(username="alice", password=PASSWORDS["alice"], client_ip="192.0.2.1")
    assert again.pk == alice.pk
    again = User.objects.get(pk=alice.pk)
    assert role_of(again) == Role.USER and domains_of(again) == []
    assert addresses_of(again) == ["alice@example.edu"]
    assert AuditEvent.objects.filter(action="directory_account_updated").count() == 1


def test_a_wrong_directory_password_is_refused_and_throttled(ldap_directory, settings):
    settings.LOGIN_THROTTLE_PAIR_FAILURES = 3
    for _ in range(3):
        _client, status = web_login("bob", "not-bobs-password")
        assert status == 200  # the form again, with its error
    assert not User.objects.filter(username="bob@example.edu").exists()
    client = Client(REMOTE_ADDR="192.0.2.10")
    response = client.post("/login/", {"username": "bob", "password": PASSWORDS["bob"]})
    assert response.status_code == 200
    assert "Too many failed logins" in response.content.decode()
    # From elsewhere the right password still works: the lock is of this username from that address.
    _client, status = web_login("bob", PASSWORDS["bob"], ip="198.51.100.7")
    assert status == 302


def test_an_empty_password_is_never_an_anonymous_bind(ldap_directory):
    assert authenticate(username="alice", password="", client_ip="192.0.2.1") is None
    assert authenticate(username="alice", password=" ", client_ip="192.0.2.1") is None


def test_a_local_account_of_the_same_name_is_never_logged_in_by_the_directory(ldap_directory, caplog):
    local = make_user("alice@example.edu", email="alice@example.edu", password="the-local-password-1")
    caplog.set_level(logging.WARNING, logger="gateway.directory.login")
    # The directory takes alice's password, but the account of that name is a local one: refused.
    assert authenticate(username="alice", password=PASSWORDS["alice"], client_ip="192.0.2.1") is None
    assert "is not that directory's" in caplog.text
    local.refresh_from_db()
    assert local.mail_profile.directory is None and local.check_password("the-local-password-1")
    # A local username is only ever checked against its own password.
    make_user("carol", email="carol@example.edu", password="the-local-password-2")
    assert authenticate(username="carol", password=PASSWORDS["carol"], client_ip="192.0.2.1") is None
    assert authenticate(username="carol", password="the-local-password-2", client_ip="192.0.2.1") is not None


def test_another_directorys_account_is_not_taken_over(ldap_directory):
    other = Directory.objects.create(name="other", kind=Directory.Kind.IMAP, domain=ldap_directory.domain,
                                     uri=imap_url(), position=5)
    user = User.objects.create(username="bob@example.edu")
    UserProfile.objects.create(user=user, directory=other)
    # bob's account belongs to the IMAP directory: only it is asked (and has no such mailbox).
    assert authenticate(username="bob", password=PASSWORDS["bob"], client_ip="192.0.2.1") is None
    assert authenticate(username="bob@example.edu", password=PASSWORDS["bob"], client_ip="192.0.2.1") is None
    assert UserProfile.objects.get(user=user).directory == other


def test_a_certificate_that_does_not_verify_is_no_login(ldap_directory, caplog):
    # Without the test CA the server's certificate does not verify against the system's CAs: no login, and
    # the log says the directory could not be reached (not "wrong password").
    Directory.objects.filter(pk=ldap_directory.pk).update(ca_certificate="")
    caplog.set_level(logging.WARNING, logger="gateway.directory.login")
    assert authenticate(username="alice", password=PASSWORDS["alice"], client_ip="192.0.2.1") is None
    assert "cannot be reached" in caplog.text


def test_a_disabled_account_stays_disabled(ldap_directory):
    alice = authenticate(username="alice", password=PASSWORDS["alice"], client_ip="192.0.2.1")
    User.objects.filter(pk=alice.pk).update(is_active=False)
    assert authenticate(username="alice", password=PASSWORDS["alice"], client_ip="192.0.2.1") is None
    assert not User.objects.get(pk=alice.pk).is_active


# --- IMAP ------------------------------------------------------------------------------------------------

def test_an_imap_user_logs_in_with_their_mailbox_password(imap_directory):
    ip = fresh_ip()
    client, status = web_login("dave@example.org", PASSWORDS["dave@example.org"], ip=ip)
    assert status == 302
    assert logged_in_as(client) == "dave@example.org"
    dave = User.objects.get(username="dave@example.org")
    assert dave.mail_profile.directory == imap_directory and not dave.has_usable_password()
    assert role_of(dave) == Role.USER and addresses_of(dave) == ["dave@example.org"]
    _client, status = web_login("dave@example.org", "not-daves-password", ip=ip)
    assert status == 200


def test_imap_over_starttls_verifies_the_certificate(imap_directory):
    Directory.objects.filter(pk=imap_directory.pk).update(uri=imap_url())  # imap:// + STARTTLS
    assert authenticate(username="erin@example.org", password=PASSWORDS["erin@example.org"],
                        client_ip=fresh_ip()) is not None
    Directory.objects.filter(pk=imap_directory.pk).update(ca_certificate="")
    User.objects.filter(username="erin@example.org").delete()
    assert authenticate(username="erin@example.org", password=PASSWORDS["erin@example.org"],
                        client_ip=fresh_ip()) is None


def test_an_imap_server_only_logs_in_its_own_domain(imap_directory):
    # dave's mailbox is at example.org's server; a login as an address of another domain never reaches it.
    Domain.objects.create(name="example.net", route=imap_directory.domain.route)
    assert authenticate(username="dave@example.net", password=PASSWORDS["dave@example.org"],
                        client_ip="192.0.2.1") is None
    assert authenticate(username="dave", password=PASSWORDS["dave@example.org"], client_ip="192.0.2.1") is None


@pytest.mark.parametrize("uri", ["ldap://127.0.0.1:3890 ldaps://127.0.0.1:6360", "http://dc1.example.edu",
                                 "ldap://", "ldap://dc1.example.edu/dc=x"])
def test_a_directory_uri_is_checked(db, uri):
    from django.core.exceptions import ValidationError

    from gateway.models import validate_directory_uri

    with pytest.raises(ValidationError):
        validate_directory_uri(uri)


def test_an_address_that_is_another_accounts_is_never_given(ldap_directory, caplog):
    # a.liddell@ is a local account's alias; bob@ a local account's e-mail address.
    make_user("ceo", email="ceo@example.edu", aliases="a.liddell@example.edu", password="the-local-password-3")
    make_user("bobby", email="bob@example.edu", password="the-local-password-4")
    caplog.set_level(logging.WARNING, logger="gateway.directory.login")
    alice = authenticate(username="alice", password=PASSWORDS["alice"], client_ip="192.0.2.1")
    assert addresses_of(alice) == ["alice@example.edu", "postmaster-team@example.edu"]
    assert "a.liddell@example.edu is left out of alice@example.edu: another account's" in caplog.text
    # bob's own address is bobby's: no second account with it, and bobby keeps his SMTP AUTH by address.
    assert authenticate(username="bob", password=PASSWORDS["bob"], client_ip="192.0.2.1") is None
    assert "that address is another account's" in caplog.text
    assert not User.objects.filter(username="bob@example.edu").exists()


@pytest.mark.parametrize("value", ["ceo@victim.example\nx@example.edu", "ceo@victim.example\u2028x@example.edu",
                                   "ceo@victim.example x@example.edu", "a@b@example.edu", "x@example.edu\u200b",
                                   "@example.edu", "x@.example.edu"])
def test_a_directory_value_is_one_address_or_nothing(db, value):
    from gateway.directory.ldap import addresses_of_entry

    directory = Directory(name="d", mail_attribute="mail", alias_attributes="mailAlternateAddress proxyAddresses")
    attrs = {"mail": [b"carol@example.edu"], "mailAlternateAddress": [value.encode()],
             "proxyAddresses": [b"smtp:" + value.encode()]}
    assert addresses_of_entry(directory, attrs) == ["carol@example.edu"]


def test_names_longer_than_a_name_may_be_are_cut(ldap_directory, monkeypatch):
    from gateway.directory import ldap as directory_ldap

    real = directory_ldap.first_value
    monkeypatch.setattr(directory_ldap, "first_value", lambda attrs, name: "N" * 400 if name == "sn"
                        else real(attrs, name))
    carol = authenticate(username="carol", password=PASSWORDS["carol"], client_ip="192.0.2.1")
    assert carol is not None and len(User.objects.get(pk=carol.pk).last_name) == 150


def test_an_open_session_follows_the_directory(ldap_directory, settings, tmp_path):
    from tests.support.directory import modify, private_slapd

    settings.DIRECTORY_RECHECK_SECONDS = 0  # every request searches again
    with private_slapd(tmp_path / "slapd") as (url, stop, start):
        Directory.objects.filter(pk=ldap_directory.pk).update(uri=url)
        client, status = web_login("bob", PASSWORDS["bob"], ip="192.0.2.30")
        assert status == 302 and client.get("/manage/users/").status_code == 200  # a domain administrator
        # Out of the domain administrators' group, in the directory: the open session loses the role.
        modify(url, "dn: cn=mail-domain-admins,ou=groups,dc=example,dc=edu\nchangetype: modify\n"
                    "replace: member\nmember: uid=carol,ou=people,dc=example,dc=edu\n")
        client.get("/account/")
        assert client.get("/manage/users/").status_code == 403
        assert role_of(User.objects.get(username="bob@example.edu")) == Role.USER
        # The directory down: nothing changes, nobody is logged out.
        stop()
        assert logged_in_as(client) == "bob@example.edu"
        start()  # a fresh copy of the test directory: bob is a domain administrator again
        client.get("/account/")
        assert client.get("/manage/users/").status_code == 200
        # Gone from the directory: the session ends.
        modify(url, "dn: uid=bob,ou=people,dc=example,dc=edu\nchangetype: delete\n")
        response = client.get("/account/")
        assert response.status_code == 302 and "/login/" in response["Location"]
