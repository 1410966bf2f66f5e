"""The mail queue as an administrator reads it (`mailq`): every recipient not yet final, with where it goes,
what the last attempt was answered, and when the next one is; grouped by destination and by the last reply.

This module only reads: the dashboard (reports) may ask it which routes are failing. What it lists is what
the caller may act for (gateway.access.recipients_in_scope): all of it for an administrator, the recipients
in their domains for a domain administrator, nothing for anyone else; `user=None` is the command line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db.models import Case, CharField, Count, F, Min, QuerySet, Value, When
from django.utils import timezone

from gateway.access import Role, recipients_in_scope, role_of
from gateway.models import Domain, MailFlowSettings, Message, Recipient, Route


class QueueState:
    """Where a queued recipient stands: the words of the page, the filter and `manage.py queue list`."""

    SCAN = "scan"  # received, waiting for the scan
    SCANNING = "scanning"
    SCAN_DEFERRED = "scan_deferred"  # a scanner did not answer: the scan is tried again
    PENDING = "pending"  # scanned, waiting for its delivery
    DELIVERING = "delivering"
    DEFERRED = "deferred"  # the last delivery failed temporarily: tried again
    HELD = "held"  # on hold: not delivered until released

    LABELS = {
        SCAN: "waiting for the scan", SCANNING: "being scanned", SCAN_DEFERRED: "scan deferred",
        PENDING: "waiting for delivery", DELIVERING: "being delivered", DEFERRED: "deferred", HELD: "on hold",
    }
    ALL = tuple(LABELS)


SCAN_STATES = (Message.State.RECEIVED, Message.State.SCANNING, Message.State.SCAN_DEFERRED)
QUEUED_STATUSES = (Recipient.Status.PENDING, Recipient.Status.DEFERRED, Recipient.Status.DELIVERING,
                   Recipient.Status.HELD)


def queued(user=None) -> QuerySet[Recipient]:
    """Every recipient not yet final that `user` may act for (None: every one), annotated with its queue
    state (`queue_state`) and the text of its last failure (`last_reply`: the scan's error while the
    message waits for its scan, else the downstream's last reply)."""
    recipients = Recipient.objects.filter(status__in=QUEUED_STATUSES).exclude(
        message__state__in=(Message.State.QUARANTINED, Message.State.REFUSED))
    if user is not None:
        recipients = recipients_in_scope(recipients, user)
    return recipients.annotate(
        queue_state=Case(
            When(message__state=Message.State.RECEIVED, then=Value(QueueState.SCAN)),
            When(message__state=Message.State.SCANNING, then=Value(QueueState.SCANNING)),
            When(message__state=Message.State.SCAN_DEFERRED, then=Value(QueueState.SCAN_DEFERRED)),
            default=F("status"), output_field=CharField()),
        last_reply=Case(When(message__state__in=SCAN_STATES, then=F("message__last_error")),
                        default=F("reply_text"), output_field=CharField()),
    )


def may_see_queue(user) -> bool:
    return role_of(user) in (Role.ADMIN, Role.DOMAIN_ADMIN)


# --- destinations ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Destinations:
    """Where each recipient domain's mail goes, as the delivery would send it: its route, the outbound relay,
    or its MX hosts."""

    routes: dict[str, Route]
    outbound_relay: str

    @classmethod
    def read(cls) -> Destinations:
        domains = Domain.objects.filter(active=True).select_related("route")
        return cls({d.name: d.route for d in domains}, MailFlowSettings.cached().outbound_relay)

    def of(self, domain: str) -> str:
        route = self.routes.get(domain)
        if route is not None:
            return f"{route.name} ({route.address})"
        if self.outbound_relay:
            return f"outbound relay ({self.outbound_relay})"
        return f"MX of {domain}"

    def filter(self, recipients: QuerySet[Recipient], host: str) -> QuerySet[Recipient]:
        """The recipients whose mail goes to `host`: a route's name, host or HOST:PORT, the outbound relay, or a
        destination as `of` writes it ("MX of example.net")."""
        wanted = host.strip().lower()
        domains = [domain for domain, route in self.routes.items()
                   if wanted in (route.name.lower(), route.host.lower(), route.address.lower(),
                                 self.of(domain).lower())]
        if domains:
            return recipients.filter(domain__in=domains)
        relay = self.outbound_relay.lower()
        if relay and wanted in (relay, relay.rsplit(":", 1)[0], f"outbound relay ({relay})"):
            return recipients.exclude(domain__in=list(self.routes))
        if not relay and wanted.startswith("mx of "):
            return recipients.filter(domain=wanted[len("mx of "):]).exclude(domain__in=list(self.routes))
        return recipients.none()


# --- the page's groups --------------------------------------------------------------------------------------

def reply_key(text: str) -> str:
    """A short, stable name of a reply text, for a group's link and form."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Group:
    kind: str  # "destination" or "reply"
    label: str
    key: str
    count: int = 0
    oldest: datetime | None = None
    next_attempt: datetime | None = None
    states: dict[str, int] = field(default_factory=dict)

    @property
    def age(self):
        return timezone.now() - self.oldest if self.oldest else None


def _merge(group: Group, row: dict) -> None:
    group.count += row["n"]
    if row["oldest"] is not None and (group.oldest is None or row["oldest"] < group.oldest):
        group.oldest = row["oldest"]
    if row["next"] is not None and (group.next_attempt is None or row["next"] < group.next_attempt):
        group.next_attempt = row["next"]
    group.states[row["queue_state"]] = group.states.get(row["queue_state"], 0) + row["n"]


def _rows(recipients: QuerySet[Recipient], key: str) -> list[dict]:
    return list(recipients.order_by().values(key, "queue_state").annotate(
        n=Count("id"), oldest=Min("message__received_at"), next=Min("next_attempt_at")))


def by_destination(recipients: QuerySet[Recipient], destinations: Destinations) -> list[Group]:
    groups: dict[str, Group] = {}
    for row in _rows(recipients, "domain"):
        label = destinations.of(row["domain"])
        group = groups.setdefault(label, Group("destination", label, label))
        _merge(group, row)
    return sorted(groups.values(), key=lambda g: (-g.count, g.label))


def by_reply(recipients: QuerySet[Recipient]) -> list[Group]:
    groups: dict[str, Group] = {}
    for row in _rows(recipients, "last_reply"):
        text = row["last_reply"] or ""
        group = groups.setdefault(text, Group("reply", text or "(no reply yet)", reply_key(text)))
        _merge(group, row)
    return sorted(groups.values(), key=lambda g: (-g.count, g.label))


def in_reply_group(recipients: QuerySet[Recipient], key: str) -> QuerySet[Recipient]:
    """The recipients whose last reply is the one `reply_key` named."""
    texts = [text for text in recipients.order_by().values_list("last_reply", flat=True).distinct()
             if reply_key(text or "") == key]
    return recipients.filter(last_reply__in=texts) if texts else recipients.none()


def state_counts(recipients: QuerySet[Recipient]) -> dict[str, int]:
    counts = dict.fromkeys(QueueState.ALL, 0)
    for row in recipients.order_by().values("queue_state").annotate(n=Count("id")):
        counts[row["queue_state"]] = row["n"]
    return counts


# --- routes that fail --------------------------------------------------------------------------------------

@dataclass
class FailingRoute:
    route: Route
    attempts: int
    last_reply: str


def failing_routes(n: int | None = None) -> list[FailingRoute]:
    """The routes whose last `n` deliveries (ROUTE_FAILING_AFTER: the newest recipients tried on them) all
    failed. Read from the recipients' own outcomes: nothing more is written on the path of a message."""
    n = n or settings.ROUTE_FAILING_AFTER
    failing = []
    for route in Route.objects.prefetch_related("domains"):
        domains = [d.name for d in route.domains.all() if d.active]
        if not domains:
            continue
        last = list(Recipient.objects.filter(domain__in=domains, attempts__gt=0).exclude(
            status=Recipient.Status.DELIVERING).order_by("-id").values("status", "reply_code", "reply_text")[:n])
        if len(last) == n and all(r["status"] != Recipient.Status.DELIVERED and (r["reply_code"] or 0) >= 400
                                  for r in last):
            failing.append(FailingRoute(route, n, last[0]["reply_text"]))
    return failing
