"""A user's numbers kept per address (AddressStat), and a user's mail paged newest first from their indexes.

The rows must say what the user's own log says, and the merged, index-ordered parts must list exactly
`visible_to(user)` in its order, each message once, whichever way one pages and whatever the filters.
"""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from gateway.models import Message, Recipient
from reports import stats
from reports.filters import log_page
from reports.models import AddressStat, DailyTop
from reports.rollup import refresh
from reports.scope import Viewer, viewer_for
from tests.reports.test_reports_rollup import RULES
from tests.support.people import make_message, make_user

KINDS = ("sender", "sender_domain", "recipient", "recipient_domain", "virus", "rule", "refusal", "score")


def from_their_log(user) -> Viewer:
    """The same user, answered from their own messages (as every user was before AddressStat)."""
    return Viewer(user, viewer_for(user).role, None)


@pytest.fixture
def bobs_mail(personas):
    for days_ago in (0, 1, 4):
        ago = timedelta(days=days_ago, minutes=7)
        make_message("news@shop.test", ["bob@example.com", "alice@example.com"], ago=ago, size=1200)
        make_message("x@spam.test", ["bob@example.com"], ago=ago, verdict="spam", spam_score=7.2,
                     spam_rules=RULES, size=3000, quarantined=True, state=Message.State.QUARANTINED)
        make_message("z@virus.test", ["bob@example.com", "carol@example.org"], ago=ago, verdict="virus",
                     virus_names=["Eicar-Test-Signature"], quarantined=True, state=Message.State.QUARANTINED,
                     spam_score=None, size=700)
        make_message("bob@example.com", ["partner@elsewhere.test"], ago=ago, direction="outbound", size=1500,
                     spam_score=1.1)
        make_message("bot@botnet.test", ["bob@example.com"], ago=ago, state=Message.State.REFUSED, verdict="",
                     spam_score=None, refusal_reason="rbl", size=0)
        make_message("y@spam.test", ["carol@example.org"], ago=ago, verdict="spam", spam_score=9.0)
    refresh()


@pytest.mark.django_db
def test_a_users_numbers_from_the_address_rows_are_those_of_their_own_log(personas, bobs_mail):
    rolled, raw = viewer_for(personas.bob), from_their_log(personas.bob)
    assert rolled.uses_address_rollups and rolled.addresses == ("bob@example.com",)
    period = stats.Period.last_days(7)
    assert stats.traffic_by_day(rolled, period) == stats.traffic_by_day(raw, period)
    assert stats.totals(stats.traffic_by_day(rolled, period))["messages"] == 12
    assert stats.today_totals(rolled) == stats.today_totals(raw)
    assert stats.traffic_by_hour(rolled) == stats.traffic_by_hour(raw)
    assert stats.traffic_by_hour_of_day(rolled, period) == stats.traffic_by_hour_of_day(raw, period)
    assert stats.score_distribution(rolled, period) == stats.score_distribution(raw, period)
    for kind in KINDS:
        for order in ("count", "volume"):
            assert stats.top(rolled, kind, period, order=order, limit=0) == \
                stats.top(raw, kind, period, order=order, limit=0), (kind, order)
    # Only the score rows are kept per address; the other kinds are read from the user's own messages.
    kept = set(DailyTop.objects.filter(scope="bob@example.com").values_list("kind", flat=True))
    assert kept == {"score"}


@pytest.mark.django_db
def test_the_address_rows_are_what_the_dashboard_and_total_by_date_show(personas, bobs_mail):
    client = Client()
    client.force_login(personas.bob)
    page = client.get("/")
    assert page.status_code == 200
    assert page.context["totals"] == stats.today_totals(from_their_log(personas.bob))
    assert [m.pk for m in page.context["latest"]] == list(
        Message.objects.visible_to(personas.bob).order_by("-received_at", "-id").values_list("pk", flat=True)[:10])
    report = client.get("/reports/total-by-date/")
    raw_rows, raw_total = stats.total_mail_by_date(from_their_log(personas.bob), report.context["period"])
    assert report.context["rows"] == raw_rows and report.context["total"] == raw_total


@pytest.mark.django_db
def test_attempts_for_an_unknown_user_leave_no_address_row(personas):
    make_message("bot@botnet.test", ["nobody@example.com"], state=Message.State.REFUSED, verdict="",
                 spam_score=None, refusal_reason="unknown_user", size=0)
    make_message("bot@botnet.test", ["bob@example.com"], state=Message.State.REFUSED, verdict="",
                 spam_score=None, refusal_reason="rbl", size=0)
    refresh()
    assert list(AddressStat.objects.values_list("address", "refused")) == [("bob@example.com", 1)]


@pytest.mark.django_db
def test_an_address_outside_the_protected_domains_means_numbers_from_the_log(personas):
    user = make_user("eve", email="eve@example.com", aliases="eve@elsewhere.test")
    assert not viewer_for(user).uses_address_rollups
    assert viewer_for(personas.alice).addresses == ("alice@example.com", "sales@example.com")


@pytest.mark.django_db
def test_the_window_of_visible_to_is_the_same_rule(personas, bobs_mail):
    now = timezone.now()
    window = (now - timedelta(days=2), now)
    for user in (personas.admin, personas.domain_admin, personas.alice, personas.bob):
        windowed = set(Message.objects.visible_to(user, received=window).values_list("pk", flat=True))
        filtered = set(Message.objects.visible_to(user).filter(received_at__gte=window[0], received_at__lt=window[1])
                       .values_list("pk", flat=True))
        assert windowed == filtered and windowed, user


@pytest.fixture
def alices_mail(personas):
    """Mail from and to both of alice's addresses, to both at once and from one to the other, with ties of
    received_at: the parts overlap, and the id must break the ties."""
    made = []
    for i in range(130):
        kind = i % 5
        sender, recipients = {
            0: ("news@shop.test", ["alice@example.com"]),
            1: ("x@spam.test", ["sales@example.com"]),
            2: ("y@shop.test", ["alice@example.com", "sales@example.com"]),
            3: ("alice@example.com", ["sales@example.com", "partner@elsewhere.test"]),
            4: ("sales@example.com", ["partner@elsewhere.test"]),
        }[kind]
        made.append(make_message(sender, recipients, ago=timedelta(minutes=(i // 3) * 10),
                                 verdict="spam" if i % 2 else "clean", subject=f"Number {i:03d}"))
    make_message("other@shop.test", ["bob@example.com"])  # not alice's
    tie = made[10].received_at
    ids = [m.pk for m in made[10:40]]
    Message.objects.filter(pk__in=ids).update(received_at=tie)
    Recipient.objects.filter(message_id__in=ids).update(received_at=tie)
    return made


def pages(user, data: dict, sort: str = "-received", limit: int = 17):
    """Every page of the log from the first, following the older cursor, then back along the newer one."""
    forward, cursor = [], None
    while True:
        page = log_page(user, data, sort, after=cursor, limit=limit)
        forward.append([m.pk for m in page.items])
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    backward, cursor = [], page.prev_cursor
    while cursor:
        page = log_page(user, data, sort, before=cursor, limit=limit)
        backward.append([m.pk for m in page.items])
        cursor = page.prev_cursor
    return forward, backward


@pytest.mark.django_db
@pytest.mark.parametrize("sort", ["-received", "received"])
def test_a_users_log_pages_through_every_message_once_in_order(personas, alices_mail, sort):
    order = ("-received_at", "-id") if sort == "-received" else ("received_at", "id")
    for data in ({}, {"verdict": "spam"}, {"date_from": timezone.localdate() - timedelta(days=0)},
                 {"sender": "alice@example.com"}):
        expected = list(Message.objects.visible_to(personas.alice)
                        .filter(pk__in=[m.pk for m in log_everything(personas.alice, data)])
                        .order_by(*order).values_list("pk", flat=True))
        forward, backward = pages(personas.alice, data, sort)
        assert [pk for page in forward for pk in page] == expected, data
        # Back from the last page: the same pages, newest side last.
        assert backward == forward[-2::-1], data
    assert len(expected) > 0


def log_everything(user, data):
    from reports.filters import apply_filters

    return apply_filters(Message.objects.visible_to(user), data)


@pytest.mark.django_db
def test_the_users_quarantine_and_where_pages_list_their_mail_newest_first(personas, alices_mail):
    Message.objects.filter(pk__in=[m.pk for m in alices_mail]).update(state=Message.State.QUARANTINED,
                                                                      quarantined=True)
    Recipient.objects.filter(message__in=alices_mail).update(status=Recipient.Status.QUARANTINED)
    client = Client()
    client.force_login(personas.alice)
    seen, query = [], {}
    while True:
        response = client.get("/quarantine/", query)
        seen += [m.pk for m in response.context["rows"]]
        if not response.context["older"]:
            break
        query = {"after": response.context["older"]}
    from quarantine.selection import quarantine_of

    assert seen == list(quarantine_of(personas.alice).order_by("-received_at", "-pk").values_list("pk", flat=True))
    where = client.get("/where/", {"sender": "", "recipient": "example.com"})
    found = [m.pk for m, _ in where.context["results"]]
    # Every one of hers that matches, newest first, as the one query over visible_to would list them; not
    # those only from her to outside (no recipient at example.com).
    from django.db.models import Exists, OuterRef

    expected = list(Message.objects.visible_to(personas.alice)
                    .filter(Exists(Recipient.objects.filter(message=OuterRef("pk"), address__icontains="example.com")))
                    .order_by("-received_at", "-id").values_list("pk", flat=True)[:100])
    assert len(expected) > 50 and found == expected


@pytest.mark.django_db
def test_recipients_carry_their_messages_received_at(personas):
    message = make_message("news@shop.test", ["alice@example.com", "bob@example.com"])
    assert set(message.recipients.values_list("received_at", flat=True)) == {message.received_at}
    # The migration fills in the rows written before the column was there.
    Recipient.objects.update(received_at=None)
    from importlib import import_module

    import_module("gateway.migrations.0011_recipient_received_at").fill(None, SimpleNamespace(connection=connection))
    assert set(message.recipients.values_list("received_at", flat=True)) == {message.received_at}


@pytest.mark.django_db
def test_where_reads_an_administrators_window_slice_by_slice_and_misses_nothing(personas):
    """The newest first across slices of the window: one match a minute old, others hours and a day back,
    mail that does not match in between, and one just outside the window."""
    hours = [0.02, 0.6, 3, 7, 20, 40]
    for h in hours:
        make_message(f"friend{int(h * 100)}@match.test", ["bob@example.com"], ago=timedelta(hours=h))
        make_message("other@elsewhere.test", ["bob@example.com"], ago=timedelta(hours=h, minutes=1))
    make_message("late@match.test", ["bob@example.com"], ago=timedelta(hours=49))
    client = Client()
    client.force_login(personas.admin)
    found = [m.envelope_sender for m, _ in client.get("/where/", {"sender": "match.test"}).context["results"]]
    assert found == [f"friend{int(h * 100)}@match.test" for h in hours]
