"""The roll-ups: they agree with the raw log, in every scope, by SQL and by Python, and stay fresh."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from gateway.models import Message
from reports import stats
from reports.models import ALL_SCOPE, AddressStat, DailyTop, RollupState, RuleDescription, TrafficStat
from reports.rollup import rebuild_days, refresh
from reports.scope import Viewer, viewer_for
from reports.tasks import rollup
from tests.support.people import make_message

RULES = [{"name": "BAYES_99", "score": 3.5, "description": "Bayes spam probability is 99 to 100%"},
         {"name": "URIBL_BLACK", "score": 1.7, "description": "Contains an URL listed in the URIBL blacklist"}]


@pytest.fixture
def traffic(personas):
    """A few days of mixed mail for example.com and example.org, and refusals."""
    m = []
    for days_ago in (0, 1, 3):
        ago = timedelta(days=days_ago, minutes=5)
        m.append(make_message("news@shop.test", ["alice@example.com", "bob@example.com"], ago=ago, size=1000))
        m.append(make_message("x@spam.test", ["alice@example.com"], ago=ago, verdict="spam", spam_score=7.2,
                              spam_rules=RULES, size=3000))
        m.append(make_message("y@spam.test", ["carol@example.org"], ago=ago, verdict="high_spam", spam_score=31.0,
                              spam_rules=RULES[:1], quarantined=True, state=Message.State.QUARANTINED,
                              size=5000))
        m.append(make_message("z@virus.test", ["bob@example.com", "carol@example.org"], ago=ago, verdict="virus",
                              virus_names=["Eicar-Test-Signature", "Eicar-Test-Signature"], quarantined=True,
                              state=Message.State.QUARANTINED, spam_score=None, size=700))
        m.append(make_message("w@files.test", ["dave@example.org"], ago=ago, verdict="blocked_attachment",
                              spam_score=-2.4, quarantined=True, state=Message.State.QUARANTINED, size=90_000))
        m.append(make_message("alice@example.com", ["partner@elsewhere.test"], ago=ago, direction="outbound",
                              size=1500, spam_score=1.1))
        for reason in ("unknown_user", "unknown_user", "rbl", "cant_resolve", "relay_denied", "greylisted"):
            m.append(make_message("bot@botnet.test", ["nobody@example.com"], ago=ago, state=Message.State.REFUSED,
                                  verdict="", spam_score=None, refusal_reason=reason, size=0))
    make_message("pending@slow.test", ["alice@example.com"], state=Message.State.RECEIVED, verdict="",
                 spam_score=None)
    return m


def raw_viewer(user) -> Viewer:
    """The same person, answered from the raw log (as a user is)."""
    return Viewer(user, viewer_for(user).role, None)


def snapshot() -> tuple[list, list, list]:
    traffic = sorted(TrafficStat.objects.values_list("hour", "scope", "direction", *TrafficStat.COUNTERS))
    rows = DailyTop.objects.values_list("day", "scope", "kind", "key", "count", "volume", "score_sum")
    tops = sorted((*row[:6], round(row[6], 6)) for row in rows)
    addresses = sorted(AddressStat.objects.values_list("day", "address", "direction", *TrafficStat.COUNTERS))
    return traffic, tops, addresses


@pytest.mark.django_db
def test_rollups_agree_with_the_raw_log_in_every_scope(personas, traffic):
    assert refresh() >= 3
    period = stats.Period.last_days(7)
    for user in (personas.admin, personas.domain_admin):
        rolled, raw = viewer_for(user), raw_viewer(user)
        assert rolled.uses_rollups
        assert stats.traffic_by_day(rolled, period) == stats.traffic_by_day(raw, period), user
        assert stats.traffic_by_hour(rolled) == stats.traffic_by_hour(raw)
        assert stats.traffic_by_hour_of_day(rolled, period) == stats.traffic_by_hour_of_day(raw, period)
        for kind in ("sender", "sender_domain", "recipient", "recipient_domain", "virus", "rule", "refusal",
                     "score"):
            for order in ("count", "volume"):
                assert stats.top(rolled, kind, period, order=order, limit=0) == \
                    stats.top(raw, kind, period, order=order, limit=0), (user, kind, order)
        assert stats.score_distribution(rolled, period) == stats.score_distribution(raw, period)


@pytest.mark.django_db
def test_total_mail_by_date_counts_as_mailwatch(personas, traffic):
    refresh()
    rows, total = stats.total_mail_by_date(viewer_for(personas.admin), stats.Period.last_days(4))
    assert [r["day"] for r in rows] == sorted((r["day"] for r in rows), reverse=True)  # newest first
    today = rows[0]
    assert today["mail"] == 7  # six accepted + the one waiting for its scan; refusals are not mail
    assert today["virus"] == 1 and today["spam_total"] == 2 and today["content"] == 1
    assert today["virus_pct"] == round(100 / 7, 1)
    assert today["refused_unknown_user"] == 2 and today["refused_rbl"] == 1 and today["refused_cant_resolve"] == 1
    assert today["volume"] == 1000 + 3000 + 5000 + 700 + 90_000 + 1500 + 2048
    assert rows[2]["mail"] == 0  # two days ago: nothing, but the day is shown
    assert total["mail"] == 7 + 6 + 6 and total["refused_unknown_user"] == 6

    # The domain administrator of example.com sees the mail to or from it only.
    rows, total = stats.total_mail_by_date(viewer_for(personas.domain_admin), stats.Period.last_days(4))
    assert rows[0]["mail"] == 5  # news, spam, virus (bob), alice's outbound, pending
    assert rows[0]["refused"] == 6  # refused attempts for nobody@example.com


@pytest.mark.django_db
def test_rule_descriptions_and_averages(personas, traffic):
    refresh()
    rules = stats.top(viewer_for(personas.admin), "rule", stats.Period.last_days(7))
    assert [(r["key"], r["count"]) for r in rules] == [("BAYES_99", 6), ("URIBL_BLACK", 3)]
    assert rules[0]["description"] == RULES[0]["description"]
    assert rules[0]["avg_score"] == 3.5
    assert RuleDescription.objects.get(name="URIBL_BLACK").score == 1.7


@pytest.mark.django_db
def test_sql_and_python_roll_ups_are_identical(personas, traffic):
    from tests.support.services import require_postgres

    require_postgres()  # the SQL roll-up is PostgreSQL's
    days = sorted({timezone.localtime(m.received_at).date() for m in Message.objects.all()})
    rebuild_days(days, method="sql")
    by_sql = snapshot()
    rebuild_days(days, method="python")
    by_python = snapshot()
    assert by_sql[0] and by_sql[1] and by_sql[2]
    assert by_sql == by_python


@pytest.mark.django_db
def test_refresh_recomputes_only_what_changed(personas, monkeypatch):
    # Without the safety overlap (which re-reads the last minutes on purpose), "nothing new" means nothing.
    monkeypatch.setattr("reports.rollup.OVERLAP", timedelta(0))
    old = make_message(ago=timedelta(days=10), verdict="", state=Message.State.SCANNING, spam_score=None)
    make_message()
    assert refresh() == 2
    assert refresh() == 0  # nothing new: nothing recomputed
    state = RollupState.load()
    assert state.last_message_id == Message.objects.latest("id").id

    # A new message today: today only.
    make_message(verdict="spam", spam_score=8.0)
    assert refresh() == 1
    today = stats.today_totals(viewer_for(personas.admin))
    assert today["messages"] == 2 and today["spam"] == 1

    # The scan of the old message finishes now: its day (ten days ago) is recomputed.
    old_day = stats.Period(timezone.localdate() - timedelta(days=10), timezone.localdate() - timedelta(days=10))
    assert stats.totals(stats.traffic_by_day(viewer_for(personas.admin), old_day))["virus"] == 0
    Message.objects.filter(pk=old.pk).update(verdict="virus", state=Message.State.QUARANTINED, quarantined=True,
                                             scanned_at=timezone.now())
    assert rollup() == 1  # the Celery task
    assert stats.totals(stats.traffic_by_day(viewer_for(personas.admin), old_day))["virus"] == 1


@pytest.mark.django_db
def test_rows_are_per_scope(personas, traffic):
    refresh()
    scopes = set(TrafficStat.objects.values_list("scope", flat=True))
    assert scopes == {ALL_SCOPE, "example.com", "example.org"}
    # Outside senders' domains get no scope of their own: only protected domains do.
    assert not TrafficStat.objects.filter(scope="spam.test").exists()


@pytest.mark.django_db
def test_changed_since_sees_a_claim_a_scan_or_a_completion_alone(personas):
    from reports.rollup import changed_since

    now = timezone.now()
    long_ago = now - timedelta(days=3)
    claimed = make_message(ago=timedelta(days=3), state=Message.State.SCANNING)
    scanned = make_message(ago=timedelta(days=3))
    completed = make_message(ago=timedelta(days=3))
    untouched = make_message(ago=timedelta(days=3))
    Message.objects.update(claimed_at=None, scanned_at=None, completed_at=None)
    Message.objects.filter(pk=claimed.pk).update(claimed_at=now)
    Message.objects.filter(pk=scanned.pk).update(claimed_at=long_ago, scanned_at=now)
    Message.objects.filter(pk=completed.pk).update(scanned_at=long_ago, completed_at=now)
    Message.objects.filter(pk=untouched.pk).update(claimed_at=long_ago, scanned_at=long_ago, completed_at=long_ago)
    found = set(Message.objects.filter(changed_since(now - timedelta(minutes=1))).values_list("pk", flat=True))
    assert found == {claimed.pk, scanned.pk, completed.pk}


@pytest.mark.django_db
def test_on_postgresql_the_log_tables_keep_one_index_per_question():
    """reports 0003: "changed since" is one expression index, and the recipient's address and domain are
    served by the (address, received_at, message_id) (reports 0005) and (domain, message_id) indexes alone;
    the envelope sender by (envelope_sender, received_at, id)."""
    from django.db import connection

    from reports.rollup import changed_since
    from tests.support.services import require_postgres

    require_postgres()
    with connection.cursor() as cursor:
        cursor.execute("SELECT tablename, indexdef FROM pg_indexes WHERE tablename IN "
                       "('gateway_message', 'gateway_recipient')")
        definitions = {(table, definition.split(" USING btree ")[-1]) for table, definition in cursor.fetchall()}
        for column in ("claimed_at", "scanned_at", "completed_at"):
            assert ("gateway_message", f"({column})") not in definitions
        assert ("gateway_message", "(GREATEST(claimed_at, scanned_at, completed_at))") in definitions
        for column in ("address", "domain"):
            assert ("gateway_recipient", f"({column})") not in definitions
        assert ("gateway_recipient", "(address, received_at, message_id)") in definitions
        assert ("gateway_recipient", "(domain, message_id)") in definitions
        assert ("gateway_message", "(envelope_sender)") not in definitions
        assert ("gateway_message", "(envelope_sender, received_at, id)") in definitions
        # The roll-up's question is the index's expression: the planner can use it.
        sql, params = Message.objects.filter(changed_since(timezone.now())).values("id").query.sql_with_params()
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row for (row,) in cursor.fetchall())
        assert "reports_message_changed_at" in plan, plan
        for probe, index in (("address", "reports_recipient_address_time"),
                             ("domain", "reports_recipient_domain_message")):
            cursor.execute(f"EXPLAIN SELECT id FROM gateway_recipient WHERE {probe} = %s", ["x@example.org"])
            plan = "\n".join(row for (row,) in cursor.fetchall())
            assert index in plan, plan
