"""The people and the mail of the quarantine, list and administration tests.

Personas: `admin` (administrator), `dana` (domain administrator of example.org), and two users,
`alice@example.org` (with the alias ali@example.org) and `bob@example.net`. `quarantined()` makes a
quarantined message as the pipeline leaves one: Message, Recipients held, and the raw bytes.

Test modules import the factories and make their own `people` fixture (a fixture imported from another
module would shadow its own name, which linters rightly dislike):

    @pytest.fixture
    def people(db) -> People:
        return make_people()
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.utils import timezone

from gateway.models import Domain, Message, RawMessage, Recipient, Route, UserProfile, Verdict

PASSWORD = "Quarantine-persona-2026!"

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_RULES = [{"name": "GTUBE", "score": 1000.0, "description": "Generic Test for Unsolicited Bulk Email"}]


@dataclass
class People:
    admin: object
    dana: object
    alice: object
    bob: object
    org: Domain
    net: Domain
    route: Route


@functools.cache
def password_hash() -> str:
    # Hashing is slow on purpose; the personas share one hash of the one password.
    return make_password(PASSWORD)


def make_user(username: str, *, role: str, email: str = "", aliases: str = "", domains=(), superuser=False):
    user = get_user_model().objects.create(username=username, email=email, password=password_hash())
    if superuser:
        user.is_staff = user.is_superuser = True
        user.save()
    profile = UserProfile.objects.create(user=user, role=role, addresses=aliases)
    profile.domains.set(domains)
    return user


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
