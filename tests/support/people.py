"""The people and the mail of the web UI's tests: two sets of personas, and messages as the gateway logs them.

`People` (the quarantine, list and administration tests): `admin` (administrator), `dana` (domain
administrator of example.org), and two users, `alice@example.org` (with the alias ali@example.org) and
`bob@example.net`; their password is PASSWORD. Test modules make their own `people` fixture from the factory:

    @pytest.fixture
    def people(db) -> People:
        return make_people()

`personas` (a fixture, provided by tests/conftest.py; the reports, the pages and the login tests): an admin,
a domain administrator of example.com, and two users (alice@ and bob@example.com); example.org is a second
protected domain nobody but the admin sees. Their password is PERSONAS_PASSWORD.

- `make_user(...)`: one user with its profile (role, aliases, domains).
- `quarantined(...)` / `virus(...)`: a quarantined message as the pipeline leaves one: Message, Recipients
  held, and the raw bytes.
- `make_message(...)`: a logged Message with its Recipients (and RawMessage when `raw=` is given).
- `logged_in(client, user)`: the Django test client, logged in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.utils import timezone

from gateway.models import Domain, Message, RawMessage, Recipient, Route, UserProfile, Verdict

PASSWORD = "Quarantine-persona-2026!"  # the People's
PERSONAS_PASSWORD = "correct-horse-battery-staple-42"  # the personas'

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_RULES = [{"name": "GTUBE", "score": 1000.0, "description": "Generic Test for Unsolicited Bulk Email"}]


@functools.cache
def password_hash(password: str = PASSWORD) -> str:
    # Hashing is slow on purpose; the personas share one hash of their password.
    return make_password(password)


def make_user(username: str, *, role: str = "user", email: str = "", aliases: str = "", domains=(),
              superuser=False, password: str = PASSWORD):
    user = get_user_model().objects.create(username=username, email=email, password=password_hash(password))
    if superuser:
        user.is_staff = user.is_superuser = True
        user.save()
    profile = UserProfile.objects.create(user=user, role=role, addresses=aliases)
    profile.domains.set(domains)
    return user


# --- People: the quarantine, list and administration tests -----------------------------------------------

@dataclass
class People:
    admin: object
    dana: object
    alice: object
    bob: object
    org: Domain
    net: Domain
    route: Route


def make_people(route_port: int = 2) -> People:
    route = Route.objects.create(name="mailstore", host="127.0.0.1", port=route_port)
    org = Domain.objects.create(name="example.org", route=route)
    net = Domain.objects.create(name="example.net", route=route)
    return People(
        admin=make_user("admin", role="admin", email="postmaster@example.org"),
        dana=make_user("dana", role="domain_admin", email="dana@example.org", domains=[org]),
        alice=make_user("alice", role="user", email="alice@example.org", aliases="ali@example.org"),
        bob=make_user("bob", role="user", email="bob@example.net"),
        org=org, net=net, route=route,
    )


def quarantined(to: list[str] | str, *, sender: str = "spammer@spam.example", subject: str = "Cheap pills",
                verdict: str = Verdict.HIGH_SPAM, score: float | None = 1000.0, rules=None, viruses=(),
                age: timedelta = timedelta(0), body: str = GTUBE, client_ip: str = "198.51.100.7") -> Message:
    """A message held in the quarantine, as the scan pipeline leaves it."""
    recipients = [to] if isinstance(to, str) else list(to)
    raw = (f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{timezone.now().timestamp()}@spam.example>\r\n\r\n{body}\r\n").encode()
    message = Message.objects.create(
        received_at=timezone.now() - age, state=Message.State.QUARANTINED, quarantined=True,
        envelope_sender=sender, header_from=sender, subject=subject, size=len(raw), client_ip=client_ip,
        verdict=verdict, action="quarantine", spam_score=score, spam_threshold=5.0,
        spam_rules=GTUBE_RULES if rules is None and verdict in (Verdict.SPAM, Verdict.HIGH_SPAM) else (rules or []),
        virus_names=list(viruses))
    for address in recipients:
        Recipient.objects.create(message=message, address=address, status=Recipient.Status.QUARANTINED,
                                 verdict=verdict, action="quarantine")
    RawMessage.objects.create(message=message, data=raw)
    return message


def virus(to: list[str] | str, **kwargs) -> Message:
    return quarantined(to, verdict=Verdict.VIRUS, score=None, viruses=["Eicar-Test-Signature"],
                       subject=kwargs.pop("subject", "Invoice attached"), **kwargs)


def logged_in(client, user):
    client.force_login(user)
    return client


# --- personas: the reports, the pages, the login and the browser tests -------------------------------------

@dataclass
class Personas:
    admin: object
    domain_admin: object
    alice: object
    bob: object
    example_com: object
    example_org: object


@pytest.fixture
def personas(db) -> Personas:
    route = Route.objects.create(name="mailstore", host="127.0.0.1", port=2526)
    example_com = Domain.objects.create(name="example.com", route=route)
    example_org = Domain.objects.create(name="example.org", route=route)
    return Personas(
        admin=make_user("admin", role="admin", email="postmaster@example.com", password=PERSONAS_PASSWORD),
        domain_admin=make_user("dadmin", role="domain_admin", email="it@example.com", domains=[example_com],
                               password=PERSONAS_PASSWORD),
        alice=make_user("alice", email="alice@example.com", aliases="sales@example.com", password=PERSONAS_PASSWORD),
        bob=make_user("bob", email="bob@example.com", password=PERSONAS_PASSWORD),
        example_com=example_com,
        example_org=example_org,
    )


def make_message(sender: str = "someone@sender.test", recipients=("alice@example.com",), *, raw: bytes | None = None,
                 ago: timedelta | None = None, **fields):
    """A message as the gateway logs it; defaults: clean, delivered, received a minute ago."""
    defaults = {
        "received_at": timezone.now() - (ago if ago is not None else timedelta(minutes=1)),
        "state": Message.State.DELIVERED, "verdict": "clean", "action": "deliver", "size": len(raw or b"") or 2048,
        "client_ip": "192.0.2.10", "client_name": "mail.sender.test", "helo": "mail.sender.test",
        "subject": "Hello", "header_from": sender, "spam_score": 0.5, "spam_threshold": 5.0,
    }
    defaults.update(fields)
    message = Message.objects.create(envelope_sender=sender, **defaults)
    for address in recipients:
        status = {"delivered": "delivered", "quarantined": "quarantined", "refused": "refused"}.get(
            message.state, "pending")
        Recipient.objects.create(message=message, address=address, status=status, verdict=message.verdict,
                                 reply_code=250 if status == "delivered" else None,
                                 reply_text="2.0.0 Ok: queued as 4XyZ" if status == "delivered" else "")
    if raw is not None:
        RawMessage.objects.create(message=message, data=raw)
    return message
