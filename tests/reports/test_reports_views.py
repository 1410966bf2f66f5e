"""The dashboard and the reports pages: numbers scoped to the viewer, CSV exports, the generator command."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from gateway.models import Message, Recipient
from reports.models import DailyTop, TrafficStat
from reports.rollup import refresh
from tests.support.people import make_message


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def csv_rows(response) -> list[list[str]]:
    assert response["Content-Type"].startswith("text/csv")
    return list(csv.reader(io.StringIO(response.content.decode())))


@pytest.fixture
def mail(personas):
    make_message("news@shop.test", ["alice@example.com"], size=1000)
    make_message("news@shop.test", ["bob@example.com"], size=1000)
    make_message("x@spam.test", ["alice@example.com"], verdict="spam", spam_score=7.0, size=4000,
                 spam_rules=[{"name": "BAYES_99", "score": 3.5, "description": "Bayes 99%"}])
    make_message("v@virus.test", ["carol@example.org"], verdict="virus", virus_names=["Eicar-Test-Signature"],
                 quarantined=True, state=Message.State.QUARANTINED, spam_score=None, size=700)
    make_message("bot@botnet.test", ["nobody@example.com"], state=Message.State.REFUSED, verdict="",
                 spam_score=None, refusal_reason="unknown_user", size=0)
    make_message("bot@botnet.test", ["x@example.org"], state=Message.State.REFUSED, verdict="",
                 spam_score=None, refusal_reason="rbl", size=0)
    refresh()


@pytest.mark.django_db
def test_dashboard_totals_per_persona(personas, mail):
    admin = client_for(personas.admin).get(reverse("dashboard")).context
    assert admin["totals"]["messages"] == 4 and admin["totals"]["virus"] == 1 and admin["totals"]["refused"] == 2
    assert admin["top_senders"][0]["key"] == "news@shop.test" and admin["top_senders"][0]["count"] == 2
    assert admin["top_senders_volume"][0]["key"] == "x@spam.test"
    assert {r["key"] for r in admin["refusals"]} == {"unknown_user", "rbl"}
    assert sum(sum(s["data"]) for s in admin["charts"]["hourly"]["series"]) == 6
    assert len(admin["charts"]["daily"]["labels"]) == 30

    domain_admin = client_for(personas.domain_admin).get(reverse("dashboard")).context
    assert domain_admin["totals"]["messages"] == 3 and domain_admin["totals"]["virus"] == 0
    assert domain_admin["totals"]["refused"] == 1

    alice = client_for(personas.alice).get(reverse("dashboard")).context
    assert alice["totals"]["messages"] == 2 and alice["totals"]["spam"] == 1
    assert [m.subject for m in alice["latest"]] == ["Hello", "Hello"]


@pytest.mark.django_db
def test_total_mail_by_date_page_and_csv(personas, mail):
    client = client_for(personas.admin)
    page = client.get(reverse("report", args=["total-by-date"]))
    html = page.content.decode()
    for heading in ("Mail", "Virus", "Spam", "Content", "Volume", "Unknown users", "Can't resolve", "RBL",
                    "Total"):
        assert heading in html, heading
    rows = csv_rows(client.get(reverse("report", args=["total-by-date"]), {"format": "csv"}))
    assert rows[0][:3] == ["Date", "Mail", "Virus"]
    assert len(rows) == 1 + 30 + 1  # header, 30 days, totals
    today = rows[1]
    assert today[0] == timezone.localdate().isoformat()
    assert today[1:3] == ["4", "1"] and today[3] == "25.0"
    assert rows[-1][0] == "Total" and rows[-1][1] == "4" and rows[-1][9] == "1" and rows[-1][11] == "1"


@pytest.mark.django_db
def test_period_selection(personas, mail):
    client = client_for(personas.admin)
    old = (timezone.localdate() - timedelta(days=60)).isoformat()
    older = (timezone.localdate() - timedelta(days=62)).isoformat()
    rows = csv_rows(client.get(reverse("report", args=["total-by-date"]),
                               {"date_from": older, "date_to": old, "format": "csv"}))
    assert [r[0] for r in rows[1:-1]] == [old, (timezone.localdate() - timedelta(days=61)).isoformat(), older]
    assert rows[-1][1] == "0"


@pytest.mark.django_db
def test_top_reports_and_their_csv(personas, mail):
    client = client_for(personas.admin)
    rows = csv_rows(client.get(reverse("report", args=["top-senders"]), {"format": "csv"}))
    assert rows[0] == ["Order", "Rank", "Sender", "Messages", "Volume (bytes)"]
    assert rows[1] == ["quantity", "1", "news@shop.test", "2", "2000"]
    assert ["volume", "1", "x@spam.test", "1", "4000"] in rows
    rows = csv_rows(client.get(reverse("report", args=["top-recipient-domains"]), {"format": "csv"}))
    assert rows[1][2:4] == ["example.com", "3"]
    rows = csv_rows(client.get(reverse("report", args=["viruses"]), {"format": "csv"}))
    assert rows == [["Virus", "Messages"], ["Eicar-Test-Signature", "1"]]
    rows = csv_rows(client.get(reverse("report", args=["rules"]), {"format": "csv"}))
    assert rows[1] == ["BAYES_99", "Bayes 99%", "1", "3.5"]
    assert "BAYES_99" in client.get(reverse("report", args=["rules"])).content.decode()
    assert client.get(reverse("report", args=["no-such-report"])).status_code == 404


@pytest.mark.django_db
def test_reports_are_scoped(personas, mail):
    rows = csv_rows(client_for(personas.domain_admin).get(reverse("report", args=["viruses"]), {"format": "csv"}))
    assert rows == [["Virus", "Messages"]]  # the virus went to example.org
    rows = csv_rows(client_for(personas.bob).get(reverse("report", args=["top-senders"]), {"format": "csv"}))
    assert [r[2] for r in rows[1:] if r[0] == "quantity"] == ["news@shop.test"]
    rows = csv_rows(client_for(personas.bob).get(reverse("report", args=["total-by-date"]), {"format": "csv"}))
    assert rows[1][1] == "1"


@pytest.mark.django_db
def test_hourly_and_score_reports(personas, mail):
    client = client_for(personas.admin)
    hourly = client.get(reverse("report", args=["hourly"]))
    assert len(hourly.context["rows"]) == 24
    assert sum(r["messages"] for r in hourly.context["rows"]) == 4
    assert hourly.context["chart"]["labels"][0] == "00:00"
    rows = csv_rows(client.get(reverse("report", args=["score-distribution"]), {"format": "csv"}))
    assert rows[0] == ["Score", "Messages"]
    assert sum(int(r[1]) for r in rows[1:]) == 3  # three scored messages


@pytest.mark.django_db
def test_generate_messages_command(personas):
    out = StringIO()
    call_command("generate_messages", count=3000, days=5, seed=7, batch=1000, stdout=out)
    assert "Inserted 3000 messages" in out.getvalue()
    assert Message.objects.count() == 3000
    assert Recipient.objects.count() >= 3000
    verdicts = set(Message.objects.values_list("verdict", flat=True))
    assert {"clean", "spam", "high_spam", "virus", "blocked_attachment", ""} <= verdicts
    assert Message.objects.filter(state="refused", refusal_reason="unknown_user").exists()
    assert Message.objects.filter(received_at__lt=timezone.now() - timedelta(days=4)).exists()
    assert not Message.objects.filter(received_at__gt=timezone.now()).exists()
    # The roll-ups were rebuilt: they account for every message.
    rolled = sum(TrafficStat.objects.filter(scope="*").values_list("messages", flat=True))
    refused = sum(TrafficStat.objects.filter(scope="*").values_list("refused", flat=True))
    assert rolled + refused == 3000
    assert DailyTop.objects.filter(kind="rule", key="BAYES_99").exists()
