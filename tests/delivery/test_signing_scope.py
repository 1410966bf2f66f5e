"""DKIM signing speaks only for the domains a login may send as: a user's own domains (their address and
aliases), a domain administrator's domains, any of ours for an administrator; a trusted network's mail for
our domains; nobody else's. The SMTP server already refuses a From the login does not own; signing does not
rely on that alone, so these tests hand the delivery's signing step messages as they would be stored."""

from __future__ import annotations

import re

import pytest

from gateway.delivery.signing import sign_outgoing
from gateway.mailauth import dkim
from gateway.models import DKIMKey, Domain, Message, Route, UserProfile
from tests.support.people import make_user


@pytest.fixture
def tenants(db):
    """a.test and b.test are ours, each with a key; alice is a user of a.test, carol of a.test with an alias in
    b.test, dana the domain administrator of b.test, root an administrator."""
    route = Route.objects.create(name="mailstore", host="127.0.0.1", port=2)
    domains = {}
    for name in ("a.test", "b.test"):
        domains[name] = Domain.objects.create(name=name, route=route)
        private, txt = dkim.generate_key("ed25519")
        DKIMKey.objects.create(domain=domains[name], selector="s1", algorithm=DKIMKey.Algorithm.ED25519,
                               private_key=private, public_txt=txt)
    make_user("alice", email="alice@a.test")
    make_user("carol", email="carol@a.test", aliases="carol@b.test")
    make_user("dana", role="domain_admin", email="dana@b.test", domains=[domains["b.test"]])
    make_user("root", role="admin", email="root@a.test", superuser=True)
    return domains


def message(header_from: str, *, envelope: str | None = None, login: str = "", **checks) -> tuple[Message, bytes]:
    data = (f"From: {header_from}\r\nTo: friend@foreign.example\r\nSubject: Hello\r\n"
            f"Message-ID: <m1@a.test>\r\n\r\nHello.\r\n").encode()
    sender = envelope if envelope is not None else header_from.rpartition("<")[2].rstrip(">")
    stored = Message(queue_id="TEST1", envelope_sender=sender, authenticated_as=login,
                     checks={**({"relay": "authenticated"} if login else {}), **checks})
    return stored, data


def signed_for(data: bytes) -> str | None:
    """The d= of the DKIM-Signature in front of the message, or None."""
    if not data.startswith(b"DKIM-Signature:"):
        return None
    return re.search(rb"\bd=([^;\s]+)", data.split(b"\r\n\r\n", 1)[0]).group(1).decode()


def sign(header_from: str, **options) -> str | None:
    return signed_for(sign_outgoing(*message(header_from, **options)))


def test_a_users_mail_is_never_signed_for_another_tenant(tenants):
    assert sign("CEO <ceo@b.test>", login="alice") is None
    # An owned envelope sender: signed for alice's domain, not for the From's.
    assert sign("CEO <ceo@b.test>", envelope="alice@a.test", login="alice") == "a.test"


def test_a_users_mail_is_signed_for_their_own_domains(tenants):
    assert sign("Alice <alice@a.test>", login="alice") == "a.test"
    assert sign("Alice <ALICE@A.TEST>", login="alice") == "a.test"
    assert sign("Carol <carol@b.test>", login="carol") == "b.test"  # her alias's domain
    assert sign("Carol <carol@a.test>", login="carol") == "a.test"


def test_a_domain_administrator_signs_for_their_domains(tenants):
    assert sign("Sales <sales@b.test>", login="dana") == "b.test"
    assert sign("CEO <ceo@a.test>", login="dana") is None


def test_an_administrator_signs_for_any_of_our_domains(tenants):
    assert sign("CEO <ceo@b.test>", login="root") == "b.test"
    assert sign("CEO <ceo@a.test>", login="root") == "a.test"
    assert sign("Someone <someone@foreign.example>", login="root") is None  # no key: not ours


def test_a_login_that_is_gone_or_inactive_signs_nothing(tenants):
    from django.contrib.auth import get_user_model

    assert sign("x <x@a.test>", login="mallory") is None
    get_user_model().objects.filter(username="alice").update(is_active=False)
    assert sign("Alice <alice@a.test>", login="alice") is None


def test_trusted_networks_are_signed_for_our_domains_only(tenants):
    assert sign("CEO <ceo@b.test>", trusted=True) == "b.test"
    assert sign("Printer <printer@a.test>", trusted=True, relay="trusted network") == "a.test"
    assert sign("Someone <someone@foreign.example>", trusted=True) is None


def test_mail_from_outside_is_never_signed(tenants):
    assert sign("CEO <ceo@b.test>") is None


def test_one_query_per_message_once_the_login_is_known(tenants, django_assert_num_queries):
    assert sign("Alice <alice@a.test>", login="alice") == "a.test"
    with django_assert_num_queries(1):  # the key; the login's domains are remembered
        assert sign("Alice <alice@a.test>", login="alice") == "a.test"
    # A change of the profile in this process is seen at once.
    profile = UserProfile.objects.get(user__username="alice")
    profile.addresses = "alice@b.test"
    profile.save()
    assert sign("Alice <alice@b.test>", login="alice") == "b.test"
    # So is a change of a domain administrator's domains.
    UserProfile.objects.get(user__username="dana").domains.add(tenants["a.test"])
    assert sign("CEO <ceo@a.test>", login="dana") == "a.test"
