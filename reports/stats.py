"""Numbers for the dashboard, the reports and the API, scoped to the viewer.

Each function answers from the roll-ups for administrators and domain administrators (`Viewer.scopes`) and
for users from the rows of their addresses (`Viewer.addresses`: days and score distribution). What those rows
do not hold (a user's hours, top senders, rules…; everything for a user with an address outside the
protected domains) comes from their own messages of the window (through `Message.objects.visible_to`),
rolled up on the fly by the same Python arithmetic the roll-up uses on SQLite
(`reports.rollup.Accumulator`), once per window and request.
Both paths return the same shapes, so pages and exports do not care which one answered.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from django.db.models import Count, Q, Sum, Value
from django.db.models.functions import Coalesce, Left, Lower, NullIf, TruncDate, TruncHour
from django.utils import timezone

from gateway.models import Message

from .models import AddressStat, DailyTop, RuleDescription, TrafficStat
from .rollup import REFUSAL_COLUMNS, SCORE_MAX, SCORE_MIN, Accumulator, day_bounds, iter_with_recipients
from .scope import Viewer

REFUSED = Message.State.REFUSED
VERDICT_COUNTERS = ("clean", "spam", "high_spam", "virus", "blocked_attachment", "blocked_sender", "unscannable")
COUNTERS = TrafficStat.COUNTERS
TOP_KINDS = {k.value: k.label for k in DailyTop.Kind}


@dataclass(frozen=True)
class Period:
    """An inclusive range of local dates."""

    start: date
    end: date

    @classmethod
    def last_days(cls, days: int, today: date | None = None) -> Period:
        today = today or timezone.localdate()
        return cls(today - timedelta(days=days - 1), today)

    @property
    def bounds(self) -> tuple[datetime, datetime]:
        return day_bounds(self.start)[0], day_bounds(self.end)[1]

    def days(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range((self.end - self.start).days + 1)]


class LiveRollup:
    """The roll-up of one viewer's own messages over a window, computed on the fly (users have no rows).

    Without `details` it leaves out recipients, rule hits and viruses, which only some reports need.
    """

    def __init__(self, viewer: Viewer, start: datetime, end: datetime, *, details: bool):
        self.start, self.end, self.details = start, end, details
        self.acc = Accumulator()
        for message, recipients in iter_with_recipients(viewer.messages(received=(start, end)), details=details,
                                                        stream=False):
            self.acc.add(message, recipients)

    def covers(self, start: datetime, end: datetime, details: bool) -> bool:
        return self.start <= start and end <= self.end and (self.details or not details)


DETAIL_KINDS = {"recipient", "recipient_domain", "rule", "virus"}
# The kinds of top the roll-up keeps per address (reports.rollup: the others would be as large as the log).
ADDRESS_KINDS = {DailyTop.Kind.SCORE}


def _live(viewer: Viewer, start: datetime, end: datetime, *, details: bool = False) -> Accumulator:
    for live in viewer.live:
        if live.covers(start, end, details):
            return live.acc
    live = LiveRollup(viewer, start, end, details=details)
    viewer.live.append(live)
    return live.acc


# What a user with per-address rows has added up by PostgreSQL over their mail of a window, in the roll-up's
# arithmetic (reports.rollup.Accumulator; tests/reports/test_user_rollups_and_paging.py compares the two):
# the counters per hour, and the tops whose key is a column of the message.
ACCEPTED = ~Q(state=REFUSED)
_SQL_COUNTERS = {
    "messages": Count("id", filter=ACCEPTED),
    **{verdict: Count("id", filter=ACCEPTED & Q(verdict=verdict)) for verdict in VERDICT_COUNTERS},
    "quarantined": Count("id", filter=ACCEPTED & Q(quarantined=True)),
    "volume": Coalesce(Sum("size", filter=ACCEPTED), 0),
    "refused": Count("id", filter=Q(state=REFUSED)),
    **{column: Count("id", filter=Q(state=REFUSED, refusal_reason=reason))
       for reason, column in REFUSAL_COLUMNS.items()},
}
SQL_KINDS = {
    "sender": (Coalesce(NullIf(Left(Lower("envelope_sender"), 320), Value("")), Value("<>")), ACCEPTED),
    "sender_domain": (Coalesce(NullIf(Left(Lower("sender_domain"), 320), Value("")), Value("<>")), ACCEPTED),
    "refusal": (Coalesce(NullIf("refusal_reason", Value("")), Value("other")), Q(state=REFUSED)),
}


def _sql_traffic(viewer: Viewer, start: datetime, end: datetime) -> dict[datetime, dict]:
    rows = (viewer.messages(received=(start, end)).annotate(t=TruncHour("received_at", tzinfo=UTC)).order_by()
            .values("t").annotate(**_SQL_COUNTERS))
    return {row.pop("t"): row for row in rows}


def _sql_top(viewer: Viewer, kind: str, start: datetime, end: datetime) -> list[dict]:
    key, which = SQL_KINDS[kind]
    rows = (viewer.messages(received=(start, end)).filter(which).annotate(key=key).order_by().values("key")
            .annotate(count=Count("id"), volume=Coalesce(Sum("size"), 0)))
    return [{**row, "score_sum": 0.0} for row in rows]


def warm(viewer: Viewer, period: Period, *, details: bool = False) -> None:
    """Read the messages of a user without roll-up rows for the whole period once: the page's other numbers
    are parts of it. Users with rows have their messages read only for what the rows do not hold."""
    if not viewer.uses_rollups and not viewer.uses_address_rollups:
        _live(viewer, *period.bounds, details=details)


def _recent_hours(hours: int, now: datetime | None) -> tuple[datetime, datetime]:
    """The first hour of the last `hours` (the current one included) and the end of the current one, in UTC."""
    # Hour arithmetic in UTC: a local day with a DST change has 23 or 25 hours.
    now = (now or timezone.now()).astimezone(UTC)
    last = now.replace(minute=0, second=0, microsecond=0)
    return last - timedelta(hours=hours - 1), last + timedelta(hours=1)


def _rollup_counters() -> dict:
    return {name: Sum(name, default=0) for name in COUNTERS}


def _empty() -> dict:
    return dict.fromkeys(COUNTERS, 0)


def _traffic(viewer: Viewer, start: datetime, end: datetime, trunc) -> dict:
    """Counters per truncated time (TruncDate or TruncHour), as {date-or-datetime: counters}."""
    if viewer.uses_rollups:
        qs = (TrafficStat.objects.filter(scope__in=viewer.scopes, hour__gte=start, hour__lt=end)
              .annotate(t=trunc("hour")).values("t").annotate(**_rollup_counters()).order_by())
        return {row.pop("t"): row for row in qs}
    found: dict = {}
    if viewer.uses_address_rollups:
        # Hours the per-day rows do not hold: added up by PostgreSQL over the user's mail of the window.
        for hour, counters in _sql_traffic(viewer, start, end).items():
            local = timezone.localtime(hour)
            row = found.setdefault(local.date() if trunc is TruncDate else local, _empty())
            for name in COUNTERS:
                row[name] += counters[name]
        return found
    for (hour, _, _), counters in _live(viewer, start, end).traffic.items():
        if start <= hour < end:
            local = timezone.localtime(hour)
            row = found.setdefault(local.date() if trunc is TruncDate else local, _empty())
            for name in COUNTERS:
                row[name] += counters[name]
    return found


def traffic_by_day(viewer: Viewer, period: Period) -> list[dict]:
    """One row per day of the period (days without mail included), oldest first."""
    if viewer.uses_address_rollups:
        qs = (AddressStat.objects.filter(address__in=viewer.addresses, day__gte=period.start, day__lte=period.end)
              .values("day").annotate(**_rollup_counters()).order_by())
        found = {row.pop("day"): row for row in qs}
    else:
        found = _traffic(viewer, *period.bounds, TruncDate)
    return [{"day": day, **found.get(day, _empty())} for day in period.days()]


def traffic_by_hour(viewer: Viewer, hours: int = 24, now: datetime | None = None) -> list[dict]:
    """One row per hour of the last `hours` hours (the current one included), oldest first."""
    first, end = _recent_hours(hours, now)
    found = _traffic(viewer, first, end, TruncHour)
    slots = [first + timedelta(hours=i) for i in range(hours)]
    return [{"hour": timezone.localtime(t), **found.get(t, _empty())} for t in slots]


def traffic_by_hour_of_day(viewer: Viewer, period: Period) -> list[dict]:
    """Sums per local hour of the day (0–23) over the period."""
    sums: dict[int, dict] = {h: _empty() for h in range(24)}
    for t, row in _traffic(viewer, *period.bounds, TruncHour).items():
        target = sums[timezone.localtime(t).hour]
        for name in COUNTERS:
            target[name] += row[name] or 0
    return [{"hour": h, **sums[h]} for h in range(24)]


def totals(rows: list[dict]) -> dict:
    return {name: sum(row[name] or 0 for row in rows) for name in COUNTERS}


def today_totals(viewer: Viewer) -> dict:
    return totals(traffic_by_day(viewer, Period.last_days(1)))


def percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


def total_mail_by_date(viewer: Viewer, period: Period) -> tuple[list[dict], dict]:
    """MailWatch's "Total mail by date": per day, newest first, and the totals row."""
    rows = []
    for row in reversed(traffic_by_day(viewer, period)):
        rows.append(_mailwatch_row(row))
    return rows, _mailwatch_row(totals(rows))


def _mailwatch_row(row: dict) -> dict:
    spam = row["spam"] + row["high_spam"]
    out = dict(row)
    out.update(
        mail=row["messages"], spam_total=spam,
        virus_pct=percent(row["virus"], row["messages"]), spam_pct=percent(spam, row["messages"]),
        content=row["blocked_attachment"], content_pct=percent(row["blocked_attachment"], row["messages"]),
    )
    return out


def top(viewer: Viewer, kind: str, period: Period, *, order: str = "count", limit: int = 10) -> list[dict]:
    """The top keys of one kind (sender, recipient_domain, rule, virus…) by message count or volume."""
    order_by = ["-volume" if order == "volume" else "-count", "key"]
    scopes = viewer.scopes if viewer.uses_rollups else (
        viewer.addresses if viewer.uses_address_rollups and kind in ADDRESS_KINDS else None)
    if scopes is not None:
        qs = (DailyTop.objects.filter(scope__in=scopes, kind=kind, day__gte=period.start,
                                      day__lte=period.end)
              .values("key").annotate(count=Sum("count"), volume=Sum("volume"), score_sum=Sum("score_sum"))
              .order_by(*order_by))
        rows = list(qs[:limit] if limit else qs)
    else:
        rows = _raw_top(viewer, kind, period)
        rows.sort(key=lambda r: (-(r["volume"] if order == "volume" else r["count"]), r["key"]))
        rows = rows[:limit] if limit else rows
    if kind == DailyTop.Kind.RULE:
        info = {r.name: r for r in RuleDescription.objects.filter(name__in=[row["key"] for row in rows])}
        for row in rows:
            rule = info.get(row["key"])
            row["description"] = rule.description if rule else ""
            row["rule_score"] = rule.score if rule else None
            row["avg_score"] = round(row["score_sum"] / row["count"], 3) if row["count"] else 0
    return rows


def _raw_top(viewer: Viewer, kind: str, period: Period) -> list[dict]:
    if viewer.uses_address_rollups and kind in SQL_KINDS:
        return _sql_top(viewer, kind, *period.bounds)
    sums: dict[str, list] = defaultdict(lambda: [0, 0, 0.0])
    live = _live(viewer, *period.bounds, details=kind in DETAIL_KINDS)
    for (day, _, top_kind, key), (count, volume, score_sum) in live.tops.items():
        if top_kind == kind and period.start <= day <= period.end:
            row = sums[key]
            row[0] += count
            row[1] += volume
            row[2] += score_sum
    return [{"key": key, "count": c, "volume": v, "score_sum": s} for key, (c, v, s) in sums.items()]


def score_distribution(viewer: Viewer, period: Period) -> list[dict]:
    """Messages per whole spam score, from SCORE_MIN (and below) to SCORE_MAX (and above)."""
    found = {int(row["key"]): row["count"] for row in top(viewer, "score", period, limit=0)}
    if not found:
        return []
    low, high = min(found), max(found)
    return [{"score": s, "label": _score_label(s), "count": found.get(s, 0)} for s in range(low, high + 1)
            if SCORE_MIN <= s <= SCORE_MAX]


def _score_label(score: int) -> str:
    if score == SCORE_MIN:
        return f"≤ {SCORE_MIN}"
    if score == SCORE_MAX:
        return f"≥ {SCORE_MAX}"
    return str(score)


def refusals(viewer: Viewer, period: Period) -> list[dict]:
    labels = dict(Message.Refusal.choices)
    return [{**row, "label": labels.get(row["key"], row["key"].replace("_", " ").capitalize())}
            for row in top(viewer, "refusal", period, limit=0)]
