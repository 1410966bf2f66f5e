"""Unscannable mail is counted like the other verdicts (issue 15): in the roll-ups (SQL and Python alike), the
users' live numbers, the dashboard's tiles and charts, and the reports."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from gateway.models import Message, Verdict
from reports import stats
from reports.models import ALL_SCOPE, TrafficStat
from reports.rollup import rebuild_days, refresh
from reports.scope import Viewer, viewer_for
from tests.support.people import make_message


@pytest.fixture
def mail(personas):
    for _ in range(3):
        make_message("odd@files.test", ["alice@example.com"], verdict=Verdict.UNSCANNABLE, action="quarantine",
                     quarantined=True, state=Message.State.QUARANTINED, spam_score=None)
    make_message("news@shop.test", ["alice@example.com"])
    make_message("v@virus.test", ["alice@example.com"], verdict=Verdict.VIRUS, quarantined=True,
                 state=Message.State.QUARANTINED, spam_score=None)


def counted() -> dict[str, int]:
    rows = TrafficStat.objects.filter(scope=ALL_SCOPE)
    return {name: sum(getattr(row, name) for row in rows) for name in ("messages", "unscannable", "virus", "clean")}


@pytest.mark.django_db
def test_the_roll_up_counts_unscannable_mail(mail):
    refresh()
    assert counted() == {"messages": 5, "unscannable": 3, "virus": 1, "clean": 1}


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["sql", "python"])
def test_both_roll_ups_count_it(mail, method):
    if method == "sql":
        from tests.support.services import require_postgres

        require_postgres()
    rebuild_days([timezone.localdate()], method=method)
    assert counted()["unscannable"] == 3


@pytest.mark.django_db
def test_a_users_live_numbers_count_it_as_the_roll_up_does(personas, mail):
    refresh()
    period = stats.Period.last_days(1)
    rolled = stats.traffic_by_day(viewer_for(personas.admin), period)
    live = stats.traffic_by_day(Viewer(personas.admin, viewer_for(personas.admin).role, None), period)
    assert rolled == live and sum(row["unscannable"] for row in live) == 3


@pytest.mark.django_db
def test_the_dashboard_and_the_reports_show_it(personas, mail):
    refresh()
    client = Client()
    client.force_login(personas.admin)
    dashboard = client.get(reverse("dashboard"))
    assert dashboard.context["totals"]["unscannable"] == 3
    assert b'<span class="tile-label">Unscannable</span><span class="tile-value">3</span>' in dashboard.content
    for report in ("total-by-date", "hourly"):
        page = client.get(reverse("report", args=[report]))
        assert page.status_code == 200 and b"Unscannable" in page.content, report
