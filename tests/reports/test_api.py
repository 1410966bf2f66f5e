"""The read-only JSON API: session or token, the pages' scoping, filters and cursors, daily stats."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from reports.models import ApiToken
from reports.rollup import refresh
from tests.support.people import make_message


def token_client(user) -> tuple[Client, str]:
    _, key = ApiToken.create_for(user, "test")
    return Client(HTTP_AUTHORIZATION=f"Token {key}"), key


@pytest.fixture
def mail(personas):
    return {
        "alice": make_message("a@friend.test", ["alice@example.com"], subject="For Alice", spam_score=1.0),
        "bob": make_message("b@friend.test", ["bob@example.com"], subject="For Bob", verdict="spam", spam_score=8.0),
        "org": make_message("c@friend.test", ["carol@example.org"], subject="For Carol"),
    }


@pytest.mark.django_db
def test_anonymous_and_bad_tokens_get_401(mail):
    assert Client().get(reverse("api_messages")).status_code == 401
    response = Client(HTTP_AUTHORIZATION="Token not-a-token").get(reverse("api_messages"))
    assert response.status_code == 401
    assert response.json() == {"error": "invalid token"}
    assert Client(HTTP_AUTHORIZATION="Basic abc").get(reverse("api_stats")).status_code == 401


@pytest.mark.django_db
def test_token_scoping_matches_the_pages(personas, mail):
    alice, _ = token_client(personas.alice)
    subjects = [m["subject"] for m in alice.get(reverse("api_messages")).json()["results"]]
    assert subjects == ["For Alice"]
    assert alice.get(reverse("api_message", args=[mail["alice"].queue_id])).status_code == 200
    missing = alice.get(reverse("api_message", args=[mail["bob"].queue_id]))
    assert missing.status_code == 404 and missing.json() == {"error": "no such message"}

    domain_admin, _ = token_client(personas.domain_admin)
    subjects = {m["subject"] for m in domain_admin.get(reverse("api_messages")).json()["results"]}
    assert subjects == {"For Alice", "For Bob"}
    assert domain_admin.get(reverse("api_message", args=[mail["org"].queue_id])).status_code == 404

    admin, _ = token_client(personas.admin)
    assert len(admin.get(reverse("api_messages")).json()["results"]) == 3


@pytest.mark.django_db
def test_session_auth_works_too(personas, mail):
    client = Client()
    client.force_login(personas.bob)
    data = client.get(reverse("api_messages"), {"limit": 10}).json()
    assert [m["subject"] for m in data["results"]] == ["For Bob"]
    assert data["results"][0]["recipients"] == ["bob@example.com"]
    assert data["results"][0]["url"].endswith(reverse("message_detail", args=[mail["bob"].queue_id]))


@pytest.mark.django_db
def test_filters_and_cursor_paging(personas):
    for i in range(25):
        make_message(subject=f"n{i:02d}", ago=timedelta(minutes=i + 1), verdict="spam" if i % 2 else "clean")
    admin, _ = token_client(personas.admin)
    data = admin.get(reverse("api_messages"), {"verdict": "spam", "limit": 5}).json()
    seen = [m["subject"] for m in data["results"]]
    while data["next"]:
        data = admin.get(data["next"]).json()
        seen += [m["subject"] for m in data["results"]]
    assert seen == [f"n{i:02d}" for i in range(25) if i % 2]
    assert admin.get(reverse("api_messages"), {"verdict": "nonsense"}).status_code == 400
    assert admin.get(reverse("api_messages"), {"limit": "x"}).status_code == 400


@pytest.mark.django_db
def test_one_message_in_detail(personas):
    message = make_message(spam_rules=[{"name": "BAYES_99", "score": 3.5, "description": "Bayes 99%"}],
                           checks={"spf": {"result": "pass"}}, verdict="spam", spam_score=6.0)
    message.recipients.update(policy="domain example.com (spam 7, high spam 15)")
    admin, _ = token_client(personas.admin)
    data = admin.get(reverse("api_message", args=[message.queue_id])).json()
    assert data["spam_rules"][0]["name"] == "BAYES_99"
    assert data["checks"] == {"spf": {"result": "pass"}}
    assert data["recipients"][0]["status"] == "delivered" and data["recipients"][0]["reply_code"] == 250
    assert data["recipients"][0]["policy"] == "domain example.com (spam 7, high spam 15)"


@pytest.mark.django_db
def test_daily_stats_scoped(personas, mail):
    refresh()
    admin, _ = token_client(personas.admin)
    data = admin.get(reverse("api_stats"), {"date_from": "2020-01-01", "date_to": "2020-01-03"}).json()
    assert data["scope"] == "all" and [d["date"] for d in data["days"]] == ["2020-01-01", "2020-01-02",
                                                                            "2020-01-03"]
    today = admin.get(reverse("api_stats")).json()["days"][-1]
    assert today["messages"] == 3 and today["spam"] == 1
    domain_admin, _ = token_client(personas.domain_admin)
    data = domain_admin.get(reverse("api_stats")).json()
    assert data["scope"] == ["example.com"] and data["days"][-1]["messages"] == 2
    alice, _ = token_client(personas.alice)
    data = alice.get(reverse("api_stats")).json()
    assert data["scope"] == "own" and data["days"][-1]["messages"] == 1
    assert len(data["days"]) == 30
    assert admin.get(reverse("api_stats"), {"date_from": "yesterday"}).status_code == 400


@pytest.mark.django_db
def test_a_key_never_starts_like_a_command_line_option(personas, monkeypatch):
    """`api_token revoke <prefix>` takes the key's first characters: one starting with '-' would be an option."""
    from django.contrib.auth.models import User

    keys = iter(["-starts-with-a-dash-" + "x" * 23, "Abc" + "y" * 40])
    monkeypatch.setattr("reports.models.secrets.token_urlsafe", lambda n: next(keys))
    token, key = ApiToken.create_for(User.objects.get(username="alice"))
    assert key.startswith("Abc") and token.prefix == key[:8]
    call_command("api_token", "revoke", token.prefix, stdout=StringIO())
    assert not ApiToken.objects.exists()


def test_api_token_command(personas):
    out = StringIO()
    call_command("api_token", "create", "alice", "--name", "monitoring", stdout=out)
    key = out.getvalue().strip()
    assert len(key) > 30
    token = ApiToken.objects.get()
    assert token.key_hash != key and key.startswith(token.prefix)  # only the hash is stored
    response = Client(HTTP_AUTHORIZATION=f"Token {key}").get(reverse("api_messages"))
    assert response.status_code == 200
    token.refresh_from_db()
    assert token.last_used_at is not None
    listing = StringIO()
    call_command("api_token", "list", stdout=listing)
    assert "alice" in listing.getvalue() and key not in listing.getvalue()
    call_command("api_token", "revoke", token.prefix, stdout=StringIO())
    assert Client(HTTP_AUTHORIZATION=f"Token {key}").get(reverse("api_messages")).status_code == 401


@pytest.mark.django_db
def test_inactive_users_tokens_stop_working(personas):
    client, _ = token_client(personas.bob)
    personas.bob.is_active = False
    personas.bob.save()
    assert client.get(reverse("api_messages")).status_code == 401
