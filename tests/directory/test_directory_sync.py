"""`manage.py directory sync` and `directory test` against the real slapd: what the directory holds, listed for
scripts and kept for the directory page; a configuration tested in words, including what is wrong with it."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.contrib.auth import authenticate, get_user_model
from django.core.management import CommandError, call_command

from gateway.models import Directory, DirectoryAddress
from tests.support.directory import PASSWORDS, PEOPLE, modify, private_slapd


def run(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("directory", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_sync_lists_every_address_of_the_domain(ldap_directory):
    out, err = run("sync", "--format", "json")
    rows = json.loads(out)
    assert {r["address"] for r in rows} == {
        "alice@example.edu", "a.liddell@example.edu", "postmaster-team@example.edu", "bob@example.edu",
        "robert.jones@example.edu", "carol@example.edu", "info@example.edu"}  # not carol@elsewhere.example
    info = next(r for r in rows if r["address"] == "info@example.edu")
    assert info["primary"] == "carol@example.edu" and info["dn"] == "uid=carol,ou=people,dc=example,dc=edu"
    assert "3 entries, 7 addresses (7 new, 0 gone)" in err
    assert DirectoryAddress.objects.filter(directory=ldap_directory).count() == 7
    # Again: nothing new; an attribute no longer read makes its addresses go.
    Directory.objects.filter(pk=ldap_directory.pk).update(alias_attributes="proxyAddresses")
    out, err = run("sync", ldap_directory.name, "--format", "csv")
    assert out.splitlines()[0] == "directory,address,primary,name,dn"
    assert "(0 new, 3 gone)" in err
    assert not DirectoryAddress.objects.filter(address="info@example.edu").exists()


def test_sync_disables_the_accounts_of_people_who_left(ldap_directory, tmp_path):
    with private_slapd(tmp_path / "slapd") as (url, _stop, _start):
        Directory.objects.filter(pk=ldap_directory.pk).update(uri=url)
        assert authenticate(username="carol", password=PASSWORDS["carol"], client_ip="192.0.2.5") is not None
        User = get_user_model()
        # A listing that finds nobody (here: a base the directory does not have) disables nobody.
        Directory.objects.filter(pk=ldap_directory.pk).update(user_base="ou=nobody,dc=example,dc=edu")
        with pytest.raises(CommandError):
            run("sync", "--disable-missing")
        Directory.objects.filter(pk=ldap_directory.pk).update(user_base="ou=staff,dc=example,dc=edu")
        modify(url, "dn: ou=staff,dc=example,dc=edu\nchangetype: add\nobjectClass: organizationalUnit\nou: staff\n")
        _out, err = run("sync", "--disable-missing")
        assert "0 entries" in err and User.objects.get(username="carol@example.edu").is_active
        # carol leaves: her entry is deleted in the directory; the next listing disables her account.
        Directory.objects.filter(pk=ldap_directory.pk).update(user_base=PEOPLE)
        modify(url, "dn: uid=carol,ou=people,dc=example,dc=edu\nchangetype: delete\n")
        _out, err = run("sync", "--disable-missing")
        assert "2 entries" in err and "disabled: carol@example.edu" in err
        assert not User.objects.get(username="carol@example.edu").is_active


def test_a_configuration_is_tested_in_words(ldap_directory):
    out, _ = run("test", ldap_directory.name, "--login", "bob", "--address", "robert.jones@example.edu")
    assert "ok   connected to ldap://127.0.0.1:3890 (StartTLS, the certificate verified)" in out
    assert "ok   bob: uid=bob,ou=people,dc=example,dc=edu" in out
    assert "ok   addresses: bob@example.edu, robert.jones@example.edu" in out
    assert "ok   role: Domain administrator of example.edu" in out
    assert "ok   <robert.jones@example.edu>: found, uid=bob,ou=people,dc=example,dc=edu" in out
    with pytest.raises(CommandError):
        run("test", ldap_directory.name, "--address", "nobody@example.edu")
    Directory.objects.filter(pk=ldap_directory.pk).update(bind_password="wrong")
    out = StringIO()
    with pytest.raises(CommandError):
        call_command("directory", "test", ldap_directory.name, stdout=out)
    assert "FAIL cannot reach ldap://127.0.0.1:3890 or bind as cn=mailgate" in out.getvalue()
    assert "Invalid credentials" in out.getvalue()


def test_an_imap_server_is_tested_with_a_password(imap_directory, monkeypatch):
    monkeypatch.setattr("sys.stdin", StringIO(PASSWORDS["erin@example.org"] + "\n"))
    out, _ = run("test", imap_directory.name, "--login", "erin@example.org", "--password-stdin")
    assert "ok   erin@example.org: the server takes this password" in out
