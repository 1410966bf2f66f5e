"""Numbers for the dashboard, the reports and the API, scoped to the viewer.

Each function answers from the roll-ups for administrators and domain administrators (`Viewer.scopes`) and
from the raw log, through `Message.objects.visible_to`, for users. Both paths return the same shapes, so
pages and exports do not care which one answered.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from django.db.models import Count, Q, Sum
from django.db.models.functions import Lower, TruncDate, TruncHour
from django.utils import timezone

from gateway.models import Message, Recipient

from .models import DailyTop, RuleDescription, TrafficStat
from .rollup import SCORE_MAX, SCORE_MIN, day_bounds, score_bucket
from .scope import Viewer

REFUSED = Message.State.REFUSED
VERDICT_COUNTERS = ("clean", "spam", "high_spam", "virus", "blocked_attachment", "blocked_sender")
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


def _accepted() -> Q:
    return ~Q(state=REFUSED)


def _raw_counters() -> dict:
    """The TrafficStat counters as aggregates over raw Message rows."""
    accepted = _accepted()
    refused = Q(state=REFUSED)
    aggregates = {
        "messages": Count("id", filter=accepted),
        "quarantined": Count("id", filter=accepted & Q(quarantined=True)),
        "volume": Sum("size", filter=accepted, default=0),
        "refused": Count("id", filter=refused),
    }
    for verdict in VERDICT_COUNTERS:
        aggregates[verdict] = Count("id", filter=accepted & Q(verdict=verdict))
    for reason in ("unknown_user", "cant_resolve", "rbl", "relay_denied"):
        aggregates[f"refused_{reason}"] = Count("id", filter=refused & Q(refusal_reason=reason))
    return aggregates


def _rollup_counters() -> dict:
    return {name: Sum(name, default=0) for name in COUNTERS}


def _empty() -> dict:
    return dict.fromkeys(COUNTERS, 0)


def _traffic(viewer: Viewer, start: datetime, end: datetime, trunc) -> dict:
    """Counters per truncated time (TruncDate or TruncHour), as {datetime-or-date: counters}."""
    if viewer.uses_rollups:
        qs = (TrafficStat.objects.filter(scope__in=viewer.scopes, hour__gte=start, hour__lt=end)
              .annotate(t=trunc("hour")).values("t").annotate(**_rollup_counters()).order_by())
    else:
        qs = (viewer.messages().filter(received_at__gte=start, received_at__lt=end)
              .annotate(t=trunc("received_at")).values("t").annotate(**_raw_counters()).order_by())
    return {row.pop("t"): row for row in qs}


def traffic_by_day(viewer: Viewer, period: Period) -> list[dict]:
    """One row per day of the period (days without mail included), oldest first."""
    found = _traffic(viewer, *period.bounds, TruncDate)
    return [{"day": day, **found.get(day, _empty())} for day in period.days()]


def traffic_by_hour(viewer: Viewer, hours: int = 24, now: datetime | None = None) -> list[dict]:
    """One row per hour of the last `hours` hours (the current one included), oldest first."""
    # Hour arithmetic in UTC: a local day with a DST change has 23 or 25 hours.
    now = (now or timezone.now()).astimezone(UTC)
    last = now.replace(minute=0, second=0, microsecond=0)
    first = last - timedelta(hours=hours - 1)
    found = _traffic(viewer, first, last + timedelta(hours=1), TruncHour)
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
    if viewer.uses_rollups:
        qs = (DailyTop.objects.filter(scope__in=viewer.scopes, kind=kind, day__gte=period.start,
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
    start, end = period.bounds
    messages = viewer.messages().filter(received_at__gte=start, received_at__lt=end).order_by()
    accepted = messages.filter(_accepted())
    if kind in ("sender", "sender_domain"):
        field = "envelope_sender" if kind == "sender" else "sender_domain"
        qs = accepted.annotate(k=Lower(field)).values("k").annotate(count=Count("id"), volume=Sum("size"))
        return [{"key": row["k"] or "<>", "count": row["count"], "volume": row["volume"] or 0, "score_sum": 0}
                for row in qs]
    if kind in ("recipient", "recipient_domain"):
        field = "address" if kind == "recipient" else "domain"
        qs = (Recipient.objects.filter(message__in=accepted.values("id")).annotate(k=Lower(field))
              .values("k").annotate(count=Count("id"), volume=Sum("message__size")).order_by())
        return [{"key": row["k"], "count": row["count"], "volume": row["volume"] or 0, "score_sum": 0}
                for row in qs]
    if kind == "refusal":
        qs = messages.filter(state=REFUSED).values("refusal_reason").annotate(count=Count("id"))
        return [{"key": row["refusal_reason"] or "other", "count": row["count"], "volume": 0, "score_sum": 0}
                for row in qs]
    counts: Counter = Counter()
    volumes: Counter = Counter()
    scores: dict[str, float] = defaultdict(float)
    if kind == "score":
        for score, size in accepted.filter(spam_score__isnull=False).values_list("spam_score", "size"):
            key = str(score_bucket(score))
            counts[key] += 1
            volumes[key] += size
    elif kind == "virus":
        for names in accepted.values_list("virus_names", flat=True):
            for name in set(names if isinstance(names, list) else []):
                counts[str(name)] += 1
    elif kind == "rule":
        for rules in accepted.exclude(spam_rules=[]).values_list("spam_rules", flat=True):
            for rule in rules if isinstance(rules, list) else []:
                if isinstance(rule, dict) and rule.get("name"):
                    counts[str(rule["name"])] += 1
                    if isinstance(rule.get("score"), (int, float)):
                        scores[str(rule["name"])] += rule["score"]
    return [{"key": key, "count": n, "volume": volumes[key], "score_sum": scores[key]} for key, n in counts.items()]


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
