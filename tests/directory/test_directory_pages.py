"""The directories page and what a directory account looks like on the other pages: an administrator adds a
directory, tests it against the real slapd and lists it; the bind password is never shown again; nobody else
reaches the page; a directory account has no password of ours to change or set."""

from __future__ import annotations

import pytest
from django.contrib.auth import authenticate
from django.test import Client

from gateway.models import AuditEvent, Directory, DirectoryAddress
from tests.support.directory import (
    ADMINS,
    DOMAIN_ADMINS,
    PASSWORDS,
    PEOPLE,
    SERVICE_DN,
    SERVICE_PASSWORD,
    ca_pem,
    ldap_url,
    require_slapd,
)
from tests.support.people import logged_in


@pytest.fixture
def admin_client(personas) -> Client:
    return logged_in(Client(), personas.admin)


def form_data(**changes) -> dict:
    data = {"name": "campus", "kind": "ldap", "domain": "", "active": "on", "position": "0", "uri": ldap_url(),
            "ca_certificate": ca_pem(), "timeout": "3", "bind_dn": SERVICE_DN, "bind_password": SERVICE_PASSWORD,
            "user_base": PEOPLE, "user_filter": "(|(uid=%(user)s)(mail=%(user)s))", "mail_attribute": "mail",
            "alias_attributes": "mailAlternateAddress proxyAddresses", "group_type": "groupOfNames",
            "group_base": "", "admin_group": ADMINS, "domain_admin_group": DOMAIN_ADMINS,
            "recipient_filter": "(|(mail=%(address)s)(mailAlternateAddress=%(address)s))",
            "positive_minutes": "60", "negative_minutes": "10", "unreachable": "tempfail"}
    data.update(changes)
    return data


def test_an_administrator_adds_tests_and_lists_a_directory(admin_client, personas):
    require_slapd()
    assert admin_client.get("/manage/directories/").status_code == 200
    response = admin_client.post("/manage/directories/new", form_data(domain=str(personas.example_com.pk)))
    directory = Directory.objects.get(name="campus")
    assert response.status_code == 302 and response["Location"] == f"/manage/directories/{directory.pk}/"
    page = admin_client.get(f"/manage/directories/{directory.pk}/").content.decode()
    assert SERVICE_PASSWORD not in page  # never shown again
    # Saved again with the password left empty: the saved one stays.
    admin_client.post(f"/manage/directories/{directory.pk}/", form_data(domain=str(personas.example_com.pk),
                                                                        bind_password="", timeout="4"))
    directory.refresh_from_db()
    assert directory.bind_password == SERVICE_PASSWORD and directory.timeout == 4
    changes = AuditEvent.objects.filter(action="directory_update").get().detail["changes"]
    assert changes == {"timeout": ["3", "4"]}  # the password was not changed, so not said to be
    # Another server: the saved password is not sent there unless typed again.
    response = admin_client.post(f"/manage/directories/{directory.pk}/", form_data(
        domain=str(personas.example_com.pk), bind_password="", uri="ldaps://elsewhere.example"))
    assert response.status_code == 400 and "Enter the password again" in response.content.decode()
    # The test says what works, step by step.
    page = admin_client.post(f"/manage/directories/{directory.pk}/test",
                             {"login": "alice", "address": "info@example.edu"}).content.decode()
    assert "connected to ldap://127.0.0.1:3890 (StartTLS, the certificate verified)" in page
    assert "uid=alice,ou=people,dc=example,dc=edu" in page
    # This directory is example.com's: alice's example.edu addresses are not its to give, and the page says so.
    assert "none in the domains this directory speaks for" in page
    # Listing: example.com has nobody in this directory.
    admin_client.post(f"/manage/directories/{directory.pk}/sync")
    assert not DirectoryAddress.objects.filter(directory=directory).exists()
    Directory.objects.filter(pk=directory.pk).update(domain=None)
    from gateway.models import Domain

    Domain.objects.create(name="example.edu", route=personas.example_com.route)
    response = admin_client.post(f"/manage/directories/{directory.pk}/sync", follow=True)
    assert "3 entries, 7 addresses (7 new, 0 gone)" in response.content.decode()
    page = admin_client.get(f"/manage/directories/{directory.pk}/?q=liddell").content.decode()
    assert "a.liddell@example.edu" in page and "bob@example.edu" not in page


def test_a_broken_form_says_what_is_wrong(admin_client):
    response = admin_client.post("/manage/directories/new", form_data(
        uri="ldap://dc1.example.edu ldaps://dc2.example.edu", user_filter="(uid=alice)", user_base=""))
    assert response.status_code == 400
    page = response.content.decode()
    assert "every server the same way" in page and "must contain %(user)s" in page
    assert "where are people searched?" in page
    response = admin_client.post("/manage/directories/new", form_data(
        ca_certificate="-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----",
        user_filter="(&(uid=%(user)s)(cn=100%))"))
    page = response.content.decode()
    assert "this is not a certificate that can be read" in page and "write %% for a percent sign" in page
    response = admin_client.post("/manage/directories/new", form_data(kind="imap", uri="imaps://mail.example.edu"))
    assert "choose it" in response.content.decode()  # an IMAP server belongs to one domain
    assert not Directory.objects.exists()


def test_only_administrators_reach_the_directories(personas):
    for user in (personas.domain_admin, personas.alice):
        client = logged_in(Client(), user)
        assert client.get("/manage/directories/").status_code == 403
        assert client.post("/manage/directories/new", form_data()).status_code == 403
    assert not Directory.objects.exists()


def test_a_directory_account_has_no_password_of_ours(ldap_directory, personas):
    user = authenticate(username="carol", password=PASSWORDS["carol"], client_ip="192.0.2.1")
    client = logged_in(Client(), user)
    page = client.get("/account/").content.decode()
    assert "password of your organisation" in page and 'name="new_password1"' not in page
    response = client.post("/account/password", {"old_password": "x", "new_password1": "Aa1!aaaaaaaa",
                                                 "new_password2": "Aa1!aaaaaaaa"})
    assert response.status_code == 403
    # The administrator's page: only "active" may change; the rest is the directory's.
    admin = logged_in(Client(), personas.admin)
    page = admin.get(f"/manage/users/{user.pk}/").content.decode()
    assert 'name="password1"' not in page and "Logs in with the directory" in page
    admin.post(f"/manage/users/{user.pk}/", {"username": "evil", "email": "ceo@example.edu", "role": "admin",
                                            "addresses": "ceo@example.edu", "is_active": "on",
                                            "password1": "Aa1!aaaaaaaa", "password2": "Aa1!aaaaaaaa"})
    user.refresh_from_db()
    assert user.username == "carol@example.edu" and user.email == "carol@example.edu"
    assert not user.has_usable_password() and not user.is_superuser
