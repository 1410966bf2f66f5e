"""Greylisting over real SMTP sessions: first try 451, early retry 451, retry after the delay 250 (time moved
by rewriting the triplet's timestamps, not by sleeping), then the triplet passes; exemptions; the log."""

from __future__ import annotations

import smtplib
from datetime import timedelta

import pytest
from django.utils import timezone

from gateway.models import GreylistEntry, Message, SenderListEntry, SMTPPolicy, TrustedNetwork
from gateway.policy import greylist

pytestmark = pytest.mark.usefixtures("scanners_off")

HAM = b"From: alice@sender.example\r\nTo: bob@example.org\r\nSubject: Hello\r\n\r\nHi Bob.\r\n"


@pytest.fixture
def greylisting(settings, gateway_smtp, protected_domain):
    settings.SMTP_GREYLISTING = True
    return gateway_smtp


def send(server, *, sender="alice@sender.example", to="bob@example.org", source="127.0.0.1") -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.example.net", timeout=30,
                      source_address=(source, 0)) as client:
        client.ehlo()
        client.mail(sender)
        code, text = client.rcpt(to)
        if code != 250:
            return code, text.decode()
        code, text = client.data(HAM)
        return code, text.decode()


def age_triplets(seconds: float) -> None:
    """Move the clock of every triplet back, as if its first try had been `seconds` ago."""
    for entry in GreylistEntry.objects.all():
        GreylistEntry.objects.filter(pk=entry.pk).update(first_seen=entry.first_seen - timedelta(seconds=seconds),
                                                         last_seen=entry.last_seen - timedelta(seconds=seconds))


def test_first_try_early_retry_then_accepted(greylisting):
    code, text = send(greylisting)
    assert code == 451 and text.startswith("4.7.1 <bob@example.org>: Recipient address rejected: Greylisted")
    assert "try again in 300 seconds" in text
    code, text = send(greylisting)  # at once: too early
    assert code == 451 and text.startswith("4.7.1")
    entry = GreylistEntry.objects.get()
    assert (entry.client_network, entry.sender, entry.recipient) == ("127.0.0.0/24", "alice@sender.example",
                                                                     "bob@example.org")
    assert entry.attempts == 2 and entry.passed_at is None
    age_triplets(301)
    code, text = send(greylisting)
    assert code == 250, text
    assert GreylistEntry.objects.get().passed_at is not None
    # The log: two refusals with their reason, then the message, which says it passed.
    refusals = Message.objects.filter(state="refused").order_by("id")
    assert [m.refusal_reason for m in refusals] == ["greylisted", "greylisted"]
    assert refusals[0].checks["greylist"] == {"result": "deferred", "recipients": {"bob@example.org": "new"},
                                              "seconds": refusals[0].checks["greylist"]["seconds"]}
    assert refusals[1].checks["greylist"]["recipients"] == {"bob@example.org": "early"}
    assert refusals[0].smtp_reply.startswith("451 4.7.1")
    message = Message.objects.exclude(state="refused").get()
    assert message.checks["greylist"]["result"] == "pass"
    assert message.checks["greylist"]["recipients"] == {"bob@example.org": "passed"}


def test_a_passed_triplet_passes_at_once_and_from_the_same_network(greylisting):
    assert send(greylisting)[0] == 451
    age_triplets(400)
    assert send(greylisting)[0] == 250
    assert send(greylisting)[0] == 250  # remembered by this node
    assert send(greylisting, source="127.0.0.2")[0] == 250  # another host of the sender's /24
    assert send(greylisting, to="carol@example.org")[0] == 451  # another triplet


def test_a_retry_after_the_window_starts_over(greylisting):
    assert send(greylisting)[0] == 451
    age_triplets(300 + 49 * 3600)
    assert send(greylisting)[0] == 451
    entry = GreylistEntry.objects.get()
    assert (timezone.now() - entry.first_seen).total_seconds() < 60


def test_a_triplet_unused_for_its_lifetime_is_a_stranger_again(greylisting):
    now = timezone.now()
    key = greylist.triplet_key("127.0.0.0/24", "alice@sender.example", "bob@example.org")
    GreylistEntry.objects.create(key=key, client_network="127.0.0.0/24", sender="alice@sender.example",
                                 recipient="bob@example.org", first_seen=now - timedelta(days=60),
                                 last_seen=now - timedelta(days=37), passed_at=now - timedelta(days=60))
    assert send(greylisting)[0] == 451
    GreylistEntry.objects.filter(key=key).update(last_seen=now - timedelta(days=35))
    GreylistEntry.objects.filter(key=key).update(passed_at=now - timedelta(days=40))
    assert send(greylisting)[0] == 250


def test_allow_listed_senders_and_trusted_networks_skip_it(greylisting):
    SenderListEntry.objects.create(kind="allow", scope="global", sender="@sender.example")
    assert send(greylisting)[0] == 250
    assert not GreylistEntry.objects.exists()
    TrustedNetwork.objects.create(network="127.0.0.0/8")
    assert send(greylisting, sender="other@elsewhere.example")[0] == 250
    assert not GreylistEntry.objects.exists()


def test_learning_mode_records_without_deferring(greylisting):
    policy = SMTPPolicy.load()
    policy.greylisting_action = "log"
    policy.save()
    assert send(greylisting)[0] == 250
    assert GreylistEntry.objects.count() == 1
    assert Message.objects.get().checks["greylist"]["recipients"] == {"bob@example.org": "would defer"}


def test_the_setting_switches_it_off(settings, greylisting):
    settings.SMTP_GREYLISTING = False
    assert send(greylisting)[0] == 250
    assert not GreylistEntry.objects.exists()


def test_ipv6_clients_are_grouped_by_64():
    assert greylist.client_network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert greylist.client_network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert greylist.client_network("192.0.2.77", ipv4_prefix=32) == "192.0.2.77/32"


@pytest.mark.django_db
def test_purge_forgets_what_is_stale():
    now = timezone.now()

    def entry(name, **times):
        GreylistEntry.objects.create(key=name.ljust(64, "0"), client_network="192.0.2.0/24", sender=name,
                                     recipient="bob@example.org", **times)

    entry("fresh", first_seen=now, last_seen=now)
    entry("abandoned", first_seen=now - timedelta(days=5), last_seen=now - timedelta(days=5))
    entry("passed", first_seen=now - timedelta(days=10), last_seen=now - timedelta(days=1), passed_at=now)
    entry("gone", first_seen=now - timedelta(days=90), last_seen=now - timedelta(days=40),
          passed_at=now - timedelta(days=90))
    assert greylist.purge(retry_window_hours=48, lifetime_days=36) == 2
    assert sorted(GreylistEntry.objects.values_list("sender", flat=True)) == ["fresh", "passed"]
