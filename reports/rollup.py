"""Roll-ups of the mail log: recompute the rows of the days that changed since the last run.

A day is recomputed whole (its rows deleted and rebuilt from the log in one transaction), which keeps the
code simple and the counts exact whatever happened to the day's messages (new ones, a scan that finished, a
release). What "changed" means, without an updated-at column on Message:
  - a message id above the last run's highest id (new messages),
  - received, claimed, scanned or completed since the last run (minus an overlap, so that a transaction that
    committed late, or a clock a little behind, is not missed); on PostgreSQL the last three as one
    GREATEST(…), the expression of one index.
Each of these is an index look-up, so a run with nothing new costs a few milliseconds.

Messages removed by the retention purge are not subtracted: the counters of a day outlive its log rows,
as a report of last year's traffic should.

PostgreSQL gets the work done in SQL (INSERT … SELECT over the day's rows); other databases (SQLite for
`make run`) get the same result from Python. tests/reports/test_reports_rollup.py checks that both agree.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

from django.db import connection, transaction
from django.db.models import Max, Q
from django.db.models.functions import Greatest, TruncDate
from django.db.models.lookups import GreaterThanOrEqual
from django.utils import timezone

from gateway.models import Domain, Message, Recipient

from .models import ALL_SCOPE, AddressStat, DailyTop, RollupState, RuleDescription, TrafficStat

log = logging.getLogger(__name__)

# Changes are looked for since the last run minus this, so a slow transaction is not missed.
OVERLAP = timedelta(minutes=5)
# pg_try_advisory_xact_lock key: two overlapping runs (a slow one and the next beat) do not both work.
ADVISORY_LOCK = 0x4D47_5250  # "MGRP"
SCORE_MIN, SCORE_MAX = -5, 50
REFUSED = Message.State.REFUSED
VERDICTS = ("clean", "spam", "high_spam", "virus", "blocked_attachment", "blocked_sender", "unscannable")
REFUSAL_COLUMNS = {"unknown_user": "refused_unknown_user", "cant_resolve": "refused_cant_resolve",
                   "rbl": "refused_rbl", "relay_denied": "refused_relay_denied"}


def score_bucket(score: float) -> int:
    return max(SCORE_MIN, min(SCORE_MAX, math.floor(score)))


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """Start and end (exclusive) of a local day, as aware datetimes (DST-safe)."""
    tz = timezone.get_current_timezone()
    start = timezone.make_aware(datetime.combine(day, datetime.min.time()), tz)
    end = timezone.make_aware(datetime.combine(day + timedelta(days=1), datetime.min.time()), tz)
    return start, end


def refresh(*, force_all: bool = False) -> int:
    """Bring the roll-ups up to date; return the number of days recomputed.

    Cheap when nothing changed: a handful of index look-ups.
    """
    started = time.monotonic()
    now = timezone.now()
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [ADVISORY_LOCK])
                if not cursor.fetchone()[0]:
                    log.info("roll-up already running elsewhere; skipped")
                    return 0
        state = RollupState.load()
        max_id = Message.objects.aggregate(m=Max("id"))["m"] or 0
        if force_all or state.last_run_at is None:
            changed = Message.objects.all()
            if force_all:
                TrafficStat.objects.all().delete()
                DailyTop.objects.all().delete()
                AddressStat.objects.all().delete()
        else:
            since = state.last_run_at - OVERLAP
            changed = Message.objects.filter(Q(id__gt=state.last_message_id) | Q(received_at__gte=since)
                                             | changed_since(since))
        days = sorted(set(changed.annotate(day=TruncDate("received_at")).values_list("day", flat=True)
                          .order_by().distinct()))
        rebuild_days(days)
        state.last_message_id = max_id
        # The start of this run, not its end: what changes while it runs is seen by the next one.
        state.last_run_at = now
        state.last_duration_ms = int((time.monotonic() - started) * 1000)
        state.last_days = len(days)
        state.save()
    if days:
        log.info("roll-up: %d day(s) recomputed in %d ms", len(days), state.last_duration_ms)
    return len(days)


def changed_since(since: datetime) -> Q:
    """Claimed, scanned or completed since then. On PostgreSQL as GREATEST(…), which skips NULLs: the
    expression of the one index that serves it (reports/migrations/0003); elsewhere as three conditions
    (SQLite's MAX(…) of several values is NULL when one is)."""
    if connection.vendor == "postgresql":
        return Q(GreaterThanOrEqual(Greatest("claimed_at", "scanned_at", "completed_at"), since))
    return Q(claimed_at__gte=since) | Q(scanned_at__gte=since) | Q(completed_at__gte=since)


def rebuild_days(days: Iterable[date], *, method: str | None = None) -> None:
    """Recompute the roll-up rows of these local days (inside the caller's transaction)."""
    method = method or ("sql" if connection.vendor == "postgresql" else "python")
    builder = _rebuild_day_sql if method == "sql" else _rebuild_day_python
    for day in days:
        start, end = day_bounds(day)
        with transaction.atomic():
            TrafficStat.objects.filter(hour__gte=start, hour__lt=end).delete()
            DailyTop.objects.filter(day=day).delete()
            AddressStat.objects.filter(day=day).delete()
            builder(day, start, end)


# --- PostgreSQL ---------------------------------------------------------------------------------------------

_SQL_DAY_MESSAGES = """
CREATE TEMP TABLE rollup_m ON COMMIT DROP AS
SELECT id, received_at, direction, state, verdict, quarantined, size, refusal_reason, spam_score,
       lower(sender_domain) AS sender_domain, lower(envelope_sender) AS sender,
       CASE WHEN jsonb_typeof(spam_rules) = 'array' THEN spam_rules ELSE '[]'::jsonb END AS spam_rules,
       CASE WHEN jsonb_typeof(virus_names) = 'array' THEN virus_names ELSE '[]'::jsonb END AS virus_names
FROM gateway_message WHERE received_at >= %(start)s AND received_at < %(end)s
"""
# Every recipient of the day's messages, read from the log once: the scopes, the recipient reports and the
# addresses all need them, and at ten million messages each read of the recipient table costs seconds. The
# id range lets PostgreSQL read a day's ids from the index, which are one range when ids follow the time.
_SQL_DAY_ALL_RECIPIENTS = """
CREATE TEMP TABLE rollup_rr ON COMMIT DROP AS
SELECT r.message_id, lower(r.address) AS address, lower(r.domain) AS domain
FROM gateway_recipient r JOIN rollup_m m ON m.id = r.message_id
WHERE r.message_id BETWEEN (SELECT min(id) FROM rollup_m) AND (SELECT max(id) FROM rollup_m)
"""
# The scopes of a message: all mail, plus each protected domain it comes from or goes to.
_SQL_DAY_SCOPES = """
CREATE TEMP TABLE rollup_s ON COMMIT DROP AS
SELECT id AS message_id, %(all)s::varchar AS scope FROM rollup_m
UNION
SELECT m.id, d.name FROM rollup_m m JOIN gateway_domain d ON d.name = m.sender_domain
UNION
SELECT r.message_id, d.name FROM rollup_rr r JOIN gateway_domain d ON d.name = r.domain
"""
# The recipients of the day's accepted messages, for both recipient reports.
_SQL_DAY_RECIPIENTS = """
CREATE TEMP TABLE rollup_r ON COMMIT DROP AS
SELECT r.message_id, left(r.address, 320) AS address, left(r.domain, 320) AS domain, m.size
FROM rollup_rr r JOIN rollup_m m ON m.id = r.message_id WHERE m.state <> 'refused'
"""
# The counters of a group of rollup_m rows m, in TrafficStat.COUNTERS order.
_SQL_COUNTERS = """
    count(*) FILTER (WHERE m.state <> 'refused'),
    count(*) FILTER (WHERE m.state <> 'refused' AND m.verdict = 'clean'),
    count(*) FILTER (WHERE m.state <> 'refused' AND m.verdict = 'spam'),
    count(*) FILTER (WHERE m.state <> 'refused' AND m.verdict = 'high_spam'),
    count(*) FILTER (WHERE m.state <> 'refused' AND m.verdict = 'virus'),
    count(*) FILTER (WHERE m.state <> 'refused' AND m.verdict = 'blocked_attachment'),
    count(*) FILTER (WHERE m.state <> 'refused' AND m.verdict = 'blocked_sender'),
    count(*) FILTER (WHERE m.state <> 'refused' AND m.verdict = 'unscannable'),
    count(*) FILTER (WHERE m.state <> 'refused' AND m.quarantined),
    coalesce(sum(m.size) FILTER (WHERE m.state <> 'refused'), 0),
    count(*) FILTER (WHERE m.state = 'refused'),
    count(*) FILTER (WHERE m.state = 'refused' AND m.refusal_reason = 'unknown_user'),
    count(*) FILTER (WHERE m.state = 'refused' AND m.refusal_reason = 'cant_resolve'),
    count(*) FILTER (WHERE m.state = 'refused' AND m.refusal_reason = 'rbl'),
    count(*) FILTER (WHERE m.state = 'refused' AND m.refusal_reason = 'relay_denied')
"""
_COUNTER_COLUMNS = ", ".join(TrafficStat.COUNTERS)
_SQL_TRAFFIC = f"""
INSERT INTO reports_trafficstat (hour, scope, direction, {_COUNTER_COLUMNS})
SELECT date_trunc('hour', m.received_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', s.scope, m.direction,
{_SQL_COUNTERS}
FROM rollup_m m JOIN rollup_s s ON s.message_id = m.id
GROUP BY 1, 2, 3
"""
# The addresses of protected domains a message is from or to (a user's numbers, AddressStat), but for an
# attempt refused as an unknown user: that address was nobody's.
_SQL_DAY_ADDRESSES = """
CREATE TEMP TABLE rollup_a ON COMMIT DROP AS
SELECT m.id AS message_id, left(m.sender, 320) AS address FROM rollup_m m
JOIN gateway_domain d ON d.name = m.sender_domain
WHERE position('@' IN m.sender) > 0 AND m.refusal_reason IS DISTINCT FROM 'unknown_user'
UNION
SELECT r.message_id, left(r.address, 320) FROM rollup_rr r JOIN rollup_m m ON m.id = r.message_id
JOIN gateway_domain d ON d.name = r.domain
WHERE m.refusal_reason IS DISTINCT FROM 'unknown_user'
"""
_SQL_ADDRESS_STATS = f"""
INSERT INTO reports_addressstat (day, address, direction, {_COUNTER_COLUMNS})
SELECT %(day)s, a.address, m.direction,
{_SQL_COUNTERS}
FROM rollup_m m JOIN rollup_a a ON a.message_id = m.id
GROUP BY 2, 3
"""
_SQL_SCORE_BUCKET = f"least(greatest(floor(m.spam_score), {SCORE_MIN}), {SCORE_MAX})::int::text"
# A user's score distribution: the one kind of top kept per address (the others per address would be as
# large as the log itself; a user's are read from their messages of the period).
_SQL_ADDRESS_SCORES = f"""
INSERT INTO reports_dailytop (day, scope, kind, key, count, volume, score_sum)
SELECT %(day)s, a.address, 'score', {_SQL_SCORE_BUCKET}, count(*), sum(m.size), 0
FROM rollup_m m JOIN rollup_a a ON a.message_id = m.id
WHERE m.state <> 'refused' AND m.spam_score IS NOT NULL GROUP BY 2, 4
"""
_SQL_TOP_INSERT = "INSERT INTO reports_dailytop (day, scope, kind, key, count, volume, score_sum) "
_SQL_TOPS = {
    "sender": """
SELECT %(day)s, s.scope, 'sender', k.key, count(*), sum(m.size), 0
FROM rollup_m m JOIN rollup_s s ON s.message_id = m.id,
LATERAL (SELECT left(coalesce(nullif(m.sender, ''), '<>'), 320) AS key) k
WHERE m.state <> 'refused' GROUP BY s.scope, k.key""",
    "sender_domain": """
SELECT %(day)s, s.scope, 'sender_domain', k.key, count(*), sum(m.size), 0
FROM rollup_m m JOIN rollup_s s ON s.message_id = m.id,
LATERAL (SELECT left(coalesce(nullif(m.sender_domain, ''), '<>'), 320) AS key) k
WHERE m.state <> 'refused' GROUP BY s.scope, k.key""",
    "recipient": """
SELECT %(day)s, s.scope, 'recipient', r.address, count(*), sum(r.size), 0
FROM rollup_r r JOIN rollup_s s ON s.message_id = r.message_id GROUP BY 2, 4""",
    "recipient_domain": """
SELECT %(day)s, s.scope, 'recipient_domain', r.domain, count(*), sum(r.size), 0
FROM rollup_r r JOIN rollup_s s ON s.message_id = r.message_id GROUP BY 2, 4""",
    "virus": """
SELECT %(day)s, s.scope, 'virus', left(v.name, 320), count(DISTINCT m.id), 0, 0
FROM (SELECT id, virus_names FROM rollup_m WHERE state <> 'refused' AND virus_names <> '[]'::jsonb) m
JOIN rollup_s s ON s.message_id = m.id,
LATERAL (SELECT DISTINCT value AS name FROM jsonb_array_elements_text(m.virus_names)) v
GROUP BY 2, 4""",
    "rule": """
SELECT %(day)s, s.scope, 'rule', left(r.rule->>'name', 320), count(*), 0,
       coalesce(sum(CASE WHEN jsonb_typeof(r.rule->'score') = 'number' THEN (r.rule->>'score')::float END), 0)
FROM (SELECT id, spam_rules FROM rollup_m WHERE state <> 'refused' AND spam_rules <> '[]'::jsonb) m
JOIN rollup_s s ON s.message_id = m.id,
LATERAL jsonb_array_elements(m.spam_rules) r(rule)
WHERE jsonb_typeof(r.rule) = 'object' AND coalesce(r.rule->>'name', '') <> ''
GROUP BY 2, 4""",
    "refusal": """
SELECT %(day)s, s.scope, 'refusal', coalesce(nullif(m.refusal_reason, ''), 'other'), count(*), 0, 0
FROM rollup_m m JOIN rollup_s s ON s.message_id = m.id
WHERE m.state = 'refused' GROUP BY 2, 4""",
    "score": f"""
SELECT %(day)s, s.scope, 'score', {_SQL_SCORE_BUCKET}, count(*), sum(m.size), 0
FROM rollup_m m JOIN rollup_s s ON s.message_id = m.id
WHERE m.state <> 'refused' AND m.spam_score IS NOT NULL GROUP BY 2, 4""",
}
_SQL_RULE_DESCRIPTIONS = """
INSERT INTO reports_ruledescription (name, description, score)
SELECT DISTINCT ON (name) name, description, score FROM (
    SELECT left(r.rule->>'name', 100) AS name, left(coalesce(r.rule->>'description', ''), 500) AS description,
           CASE WHEN jsonb_typeof(r.rule->'score') = 'number' THEN (r.rule->>'score')::float END AS score
    FROM rollup_m m, LATERAL jsonb_array_elements(m.spam_rules) r(rule)
    WHERE m.spam_rules <> '[]'::jsonb AND jsonb_typeof(r.rule) = 'object' AND coalesce(r.rule->>'name', '') <> ''
) rules ORDER BY name, (description <> '') DESC
ON CONFLICT (name) DO UPDATE SET
    description = CASE WHEN EXCLUDED.description <> '' THEN EXCLUDED.description
                       ELSE reports_ruledescription.description END,
    score = coalesce(EXCLUDED.score, reports_ruledescription.score)
"""


def _rebuild_day_sql(day: date, start: datetime, end: datetime) -> None:
    params = {"start": start, "end": end, "day": day, "all": ALL_SCOPE}
    with connection.cursor() as cursor:
        # The temporary tables have no statistics of their JSON columns, the planner's estimates are huge, and
        # PostgreSQL would spend more compiling the queries (JIT) than running them.
        cursor.execute("SET LOCAL jit = off")
        cursor.execute("SET LOCAL work_mem = '64MB'")  # hash the groupings in memory rather than sort them
        cursor.execute("DROP TABLE IF EXISTS rollup_m, rollup_rr, rollup_s, rollup_r, rollup_a")
        cursor.execute(_SQL_DAY_MESSAGES, params)
        # Statistics of the join keys only: analysing the JSON columns would cost more than the joins.
        cursor.execute("ANALYZE rollup_m (id, state)")
        cursor.execute(_SQL_DAY_ALL_RECIPIENTS, params)
        cursor.execute("ANALYZE rollup_rr (message_id, domain)")
        cursor.execute(_SQL_DAY_SCOPES, params)
        cursor.execute("ANALYZE rollup_s")
        cursor.execute(_SQL_DAY_RECIPIENTS, params)
        cursor.execute("ANALYZE rollup_r (message_id)")
        cursor.execute(_SQL_TRAFFIC, params)
        for select in _SQL_TOPS.values():
            cursor.execute(_SQL_TOP_INSERT + select, params)
        cursor.execute(_SQL_RULE_DESCRIPTIONS, params)
        cursor.execute(_SQL_DAY_ADDRESSES, params)
        cursor.execute("ANALYZE rollup_a")
        cursor.execute(_SQL_ADDRESS_STATS, params)
        cursor.execute(_SQL_ADDRESS_SCORES, params)
        cursor.execute("DROP TABLE rollup_m, rollup_rr, rollup_s, rollup_r, rollup_a")


# --- Any database (the reference implementation) -------------------------------------------------------------

BASIC_FIELDS = ("id", "received_at", "direction", "state", "verdict", "quarantined", "size", "refusal_reason",
                "spam_score", "sender_domain", "envelope_sender")
DETAIL_FIELDS = ("spam_rules", "virus_names")


def iter_with_recipients(messages, chunk_size: int = 2000, *, details: bool = True, stream: bool = True):
    """(message values, [(address, domain)…]) for each message of a queryset, in bounded memory.

    details=False leaves out what only some reports need (recipients, rule hits, viruses): the counters, the
    senders and the scores cost a fraction of it. stream=False reads all rows at once instead of through a
    server-side cursor, which PostgreSQL plans for the first rows (cursor_tuple_fraction) rather than for all:
    the right choice for a user's few thousand messages.
    """
    chunk: list[dict] = []
    fields = BASIC_FIELDS + DETAIL_FIELDS if details else BASIC_FIELDS

    def flush():
        if not details:
            return [(m, []) for m in chunk]
        recipients: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for message_id, address, domain in (Recipient.objects.filter(message_id__in=[m["id"] for m in chunk])
                                            .order_by().values_list("message_id", "address", "domain")):
            recipients[message_id].append((address.lower(), domain.lower()))
        return [(m, recipients.get(m["id"], [])) for m in chunk]

    rows = messages.order_by().values(*fields)
    for row in rows.iterator(chunk_size=chunk_size) if stream else rows:
        chunk.append(row)
        if len(chunk) >= chunk_size:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


class Accumulator:
    """Roll-up counters built in Python from messages: the same numbers the SQL computes.

    Used to roll up on databases other than PostgreSQL, and to answer a user's reports from their own
    (small) slice of the log with the very same arithmetic.
    """

    def __init__(self, protected: set[str] | frozenset = frozenset()):
        self.protected = protected
        self.traffic: dict[tuple, dict[str, int]] = defaultdict(lambda: dict.fromkeys(TrafficStat.COUNTERS, 0))
        self.tops: dict[tuple, list] = defaultdict(lambda: [0, 0, 0.0])  # (day, scope, kind, key) -> c, v, s
        # (day, address, direction) -> counters: the addresses of protected domains (AddressStat).
        self.addresses: dict[tuple, dict[str, int]] = defaultdict(lambda: dict.fromkeys(TrafficStat.COUNTERS, 0))
        self.descriptions: dict[str, tuple[str, float | None]] = {}
        # Looked up once: timezone.localtime() per message costs more than the rest of add().
        self.tz = timezone.get_current_timezone()

    def add(self, m: dict, rcpts: list[tuple[str, str]]) -> None:
        sender_domain = (m["sender_domain"] or "").lower()
        scopes = {ALL_SCOPE}
        if self.protected:
            scopes |= ({sender_domain} & self.protected) | ({d for _, d in rcpts} & self.protected)
        received = m["received_at"]
        hour = received.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        day = received.astimezone(self.tz).date()
        size = m["size"] or 0
        refused = m["state"] == REFUSED
        rules = [r for r in (m.get("spam_rules") if isinstance(m.get("spam_rules"), list) else [])
                 if isinstance(r, dict) and r.get("name")]
        viruses = set(m.get("virus_names") if isinstance(m.get("virus_names"), list) else [])
        for rule in rules:
            name = str(rule["name"])[:100]
            score = rule.get("score") if isinstance(rule.get("score"), (int, float)) else None
            text = str(rule.get("description") or "")[:500]
            old = self.descriptions.get(name)
            if old is None or (text and not old[0]):
                self.descriptions[name] = (text, score)
        tops = self.tops
        if self.protected and m["refusal_reason"] != "unknown_user":
            sender = (m["envelope_sender"] or "").lower()
            addresses = {address for address, domain in rcpts if domain in self.protected}
            if "@" in sender and sender_domain in self.protected:
                addresses.add(sender[:320])
            for address in addresses:
                self._count(self.addresses[(day, address[:320], m["direction"])], m, refused, size)
                if not refused and m["spam_score"] is not None:
                    top = tops[(day, address[:320], "score", str(score_bucket(m["spam_score"])))]
                    top[0] += 1
                    top[1] += size
        for scope in scopes:
            self._count(self.traffic[(hour, scope, m["direction"])], m, refused, size)
            if refused:
                tops[(day, scope, "refusal", m["refusal_reason"] or "other")][0] += 1
                continue
            keys = [("sender", (m["envelope_sender"] or "").lower()[:320] or "<>"),
                    ("sender_domain", sender_domain[:320] or "<>")]
            keys += [("recipient", address[:320]) for address, _ in rcpts]
            keys += [("recipient_domain", domain[:320]) for _, domain in rcpts]
            if m["spam_score"] is not None:
                keys.append(("score", str(score_bucket(m["spam_score"]))))
            for kind, key in keys:
                top = tops[(day, scope, kind, key)]
                top[0] += 1
                top[1] += size
            for name in viruses:
                tops[(day, scope, "virus", str(name)[:320])][0] += 1
            for rule in rules:
                top = tops[(day, scope, "rule", str(rule["name"])[:320])]
                top[0] += 1
                if isinstance(rule.get("score"), (int, float)):
                    top[2] += rule["score"]


    @staticmethod
    def _count(t: dict[str, int], m: dict, refused: bool, size: int) -> None:
        if refused:
            t["refused"] += 1
            column = REFUSAL_COLUMNS.get(m["refusal_reason"])
            if column:
                t[column] += 1
            return
        t["messages"] += 1
        t["volume"] += size
        if m["verdict"] in VERDICTS:
            t[m["verdict"]] += 1
        if m["quarantined"]:
            t["quarantined"] += 1


def _rebuild_day_python(day: date, start: datetime, end: datetime) -> None:
    acc = Accumulator(set(Domain.objects.values_list("name", flat=True)))
    for m, rcpts in iter_with_recipients(Message.objects.filter(received_at__gte=start, received_at__lt=end)):
        acc.add(m, rcpts)
    TrafficStat.objects.bulk_create(
        [TrafficStat(hour=hour, scope=scope, direction=direction, **counters)
         for (hour, scope, direction), counters in acc.traffic.items()], batch_size=2000)
    DailyTop.objects.bulk_create(
        [DailyTop(day=top_day, scope=scope, kind=kind, key=key, count=c, volume=v, score_sum=s)
         for (top_day, scope, kind, key), (c, v, s) in acc.tops.items()], batch_size=2000)
    AddressStat.objects.bulk_create(
        [AddressStat(day=stat_day, address=address, direction=direction, **counters)
         for (stat_day, address, direction), counters in acc.addresses.items()], batch_size=2000)
    for name, (text, score) in acc.descriptions.items():
        existing = RuleDescription.objects.filter(name=name).first()
        if existing is None:
            RuleDescription.objects.create(name=name, description=text, score=score)
        elif (text and text != existing.description) or (score is not None and score != existing.score):
            existing.description = text or existing.description
            existing.score = score if score is not None else existing.score
            existing.save()
