"""The message log's filters and its keyset pagination, shared by the log page, its CSV export and the API.

Keyset ("seek") pagination: a page is "the next 50 after this (sort value, id)", which an index answers
directly however deep one pages; OFFSET would read and throw away every row before the page, and a COUNT(*)
of a filter over millions of rows costs as much as the whole scan. So the log shows Newer / Older, not page
numbers or a total.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from dataclasses import dataclass
from datetime import datetime, time, timedelta

from django import forms
from django.db.models import F, FloatField, Q, QuerySet, Value
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from gateway.models import Message, Recipient, Verdict, keyset_rows

PAGE_SIZE = 50
# The null spam score (not scanned, refused) sorts below every real score.
NO_SCORE = -1_000_000.0

SORTS = {
    "-received": ("received_at", True, "Newest first"),
    "received": ("received_at", False, "Oldest first"),
    "-score": ("spam_score", True, "Highest score"),
    "score": ("spam_score", False, "Lowest score"),
    "-size": ("size", True, "Largest"),
    "size": ("size", False, "Smallest"),
}

VERDICT_CHOICES = [("", "Any verdict"), *Verdict.choices, ("refused", "Refused at SMTP"),
                   ("pending", "Not scanned yet")]
QUARANTINE_CHOICES = [("", "Any"), ("yes", "Quarantined"), ("no", "Not quarantined")]


class MessageFilterForm(forms.Form):
    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))
    sender = forms.CharField(required=False, max_length=320,
                             help_text="An address, @domain or domain, or part of an address")
    recipient = forms.CharField(required=False, max_length=320,
                                help_text="An address, @domain or domain, or part of an address")
    subject = forms.CharField(required=False, max_length=200)
    client_ip = forms.CharField(required=False, max_length=50, label="Client IP",
                                help_text="An address or a CIDR network")
    verdict = forms.ChoiceField(required=False, choices=VERDICT_CHOICES)
    score_min = forms.FloatField(required=False, label="Score ≥")
    score_max = forms.FloatField(required=False, label="Score ≤")
    quarantined = forms.ChoiceField(required=False, choices=QUARANTINE_CHOICES)
    state = forms.ChoiceField(required=False, label="Status", choices=[("", "Any status"), *Message.State.choices])
    direction = forms.ChoiceField(required=False, choices=[("", "Any direction"), *Message.Direction.choices])
    node = forms.CharField(required=False, max_length=100, help_text="The node that received it (its NODE_NAME)")
    sort = forms.ChoiceField(required=False, choices=[(k, v[2]) for k, v in SORTS.items()])

    def clean_client_ip(self) -> str:
        value = self.cleaned_data["client_ip"].strip()
        if value:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise forms.ValidationError("Not an IP address or network.") from None
        return value

    def clean(self):
        data = super().clean()
        if data.get("date_from") and data.get("date_to") and data["date_from"] > data["date_to"]:
            self.add_error("date_to", "The end is before the start.")
        return data

    @property
    def sort_key(self) -> str:
        return (self.cleaned_data.get("sort") if self.is_valid() else "") or "-received"

    def is_filtered(self) -> bool:
        return self.is_valid() and any(v not in (None, "") for k, v in self.cleaned_data.items() if k != "sort")


def _address_filter(value: str, *, address_field: str, domain_field: str) -> Q:
    """An exact address or domain uses an index; anything else is a substring search."""
    value = value.strip().lower()
    if value.startswith("@") and "@" not in value[1:]:
        return Q(**{domain_field: value[1:]})
    if "@" in value:
        local, _, domain = value.rpartition("@")
        if local and "." in domain:
            return Q(**{address_field: value})
    elif "." in value and " " not in value and not value.startswith(".") and not value.endswith("."):
        return Q(**{domain_field: value})
    return Q(**{f"{address_field}__icontains": value})


def date_bounds(data: dict) -> tuple[datetime | None, datetime | None]:
    """The filter's From and To dates as the start and the (exclusive) end of local days."""
    tz = timezone.get_current_timezone()
    start = end = None
    if data.get("date_from"):
        start = timezone.make_aware(datetime.combine(data["date_from"], time.min), tz)
    if data.get("date_to"):
        end = timezone.make_aware(datetime.combine(data["date_to"] + timedelta(days=1), time.min), tz)
    return start, end


def log_page(user, data: dict | None, sort: str, *, after: str | None = None, before: str | None = None,
             limit: int = PAGE_SIZE) -> Page:
    """One page of the message log of this user with these filters (None: the filters were not valid, an
    empty page), built on `visible_to`; a user's pages in time order are read from their index-ordered
    parts."""
    if data is None:
        return Page([], None, None)
    qs = apply_filters(Message.objects.visible_to(user), data)
    parts = Message.objects.newest_visible_parts(user)
    if parts is not None:
        start, end = date_bounds(data)
        # The dates on the part's own time too, so that an old period is sought in the index, not reached
        # by reading everything newer.
        parts = [apply_filters(part, data).filter(*([Q(_sort__gte=start)] if start else []),
                                                  *([Q(_sort__lt=end)] if end else []))
                 for part in parts]
    return paginate(qs, sort, after=after, before=before, limit=limit, parts=parts)


def apply_filters(qs: QuerySet, data: dict) -> QuerySet:
    start, end = date_bounds(data)
    if start:
        qs = qs.filter(received_at__gte=start)
    if end:
        qs = qs.filter(received_at__lt=end)
    if data.get("sender"):
        qs = qs.filter(_address_filter(data["sender"], address_field="envelope_sender",
                                       domain_field="sender_domain"))
    if data.get("recipient"):
        wanted = Recipient.objects.filter(_address_filter(data["recipient"], address_field="address",
                                                          domain_field="domain"))
        qs = qs.filter(pk__in=wanted.values("message_id"))
    if data.get("subject"):
        qs = qs.filter(subject__icontains=data["subject"])
    if data.get("client_ip"):
        network = ipaddress.ip_network(data["client_ip"], strict=False)
        if network.num_addresses == 1:
            qs = qs.filter(client_ip=str(network.network_address))
        elif _is_postgresql():
            # inet containment: PostgreSQL compares networks natively.
            qs = qs.extra(where=["gateway_message.client_ip <<= %s::inet"], params=[str(network)])
        else:
            qs = qs.filter(client_ip__startswith=_text_prefix(network))
    verdict = data.get("verdict")
    if verdict == "refused":
        qs = qs.filter(state=Message.State.REFUSED)
    elif verdict == "pending":
        qs = qs.filter(verdict="").exclude(state=Message.State.REFUSED)
    elif verdict:
        qs = qs.filter(verdict=verdict)
    if data.get("score_min") is not None:
        qs = qs.filter(spam_score__gte=data["score_min"])
    if data.get("score_max") is not None:
        qs = qs.filter(spam_score__lte=data["score_max"])
    if data.get("quarantined") == "yes":
        qs = qs.filter(quarantined=True)
    elif data.get("quarantined") == "no":
        qs = qs.filter(quarantined=False)
    if data.get("state"):
        qs = qs.filter(state=data["state"])
    if data.get("direction"):
        qs = qs.filter(direction=data["direction"])
    if data.get("node"):
        qs = qs.filter(node=data["node"].strip())
    return qs


def _text_prefix(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """SQLite has no inet type: match the whole octets of an IPv4 network as text (a /20 acts as a /16)."""
    if network.version == 4:
        octets = str(network.network_address).split(".")[: network.prefixlen // 8]
        return ".".join(octets) + "." if octets else ""
    return str(network.network_address).rstrip(":")


def _is_postgresql() -> bool:
    from django.db import connection

    return connection.vendor == "postgresql"


# --- Keyset pagination -----------------------------------------------------------------------------------

@dataclass
class Page:
    items: list
    next_cursor: str | None
    prev_cursor: str | None


def _sort_expression(field: str):
    if field == "spam_score":
        return Coalesce(F("spam_score"), Value(NO_SCORE), output_field=FloatField())
    return F(field)


def encode_cursor(value, pk: int) -> str:
    if isinstance(value, datetime):
        value = value.isoformat()
    raw = json.dumps([value, pk], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, field: str):
    """(sort value, id) or None when the cursor is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value, pk = json.loads(raw)
        pk = int(pk)
        if field == "received_at":
            value = parse_datetime(value)
            if value is None:
                return None
        elif field == "size":
            value = int(value)
        else:
            value = float(value)
        return value, pk
    except (ValueError, TypeError, json.JSONDecodeError):
        return None


def sort_value(message, field: str):
    value = getattr(message, field)
    if field == "spam_score" and value is None:
        return NO_SCORE
    return value


def paginate(qs: QuerySet, sort: str, *, after: str | None = None, before: str | None = None,
             limit: int = PAGE_SIZE, parts: list[QuerySet] | None = None) -> Page:
    """One page of `qs` in `sort` order, after (older side) or before (newer side) a cursor.

    `parts` (`MessageQuerySet.newest_visible_parts` with the same filters applied): a user's messages as
    several index-ordered parts, merged, for the sorts by time; `qs` answers the other sorts.
    """
    field, descending, _ = SORTS.get(sort, SORTS["-received"])
    if parts is None or field != "received_at":
        parts = [qs.annotate(_sort=_sort_expression(field))]
    if before and (key := decode_cursor(before, field)):
        rows = keyset_rows(parts, descending=not descending, beyond=key, limit=limit + 1)
        has_prev = len(rows) > limit
        rows = list(reversed(rows[:limit]))
        has_next = True
    else:
        key = decode_cursor(after, field) if after else None
        has_prev = key is not None
        rows = keyset_rows(parts, descending=descending, beyond=key, limit=limit + 1)
        has_next = len(rows) > limit
        rows = rows[:limit]
    next_cursor = encode_cursor(sort_value(rows[-1], field), rows[-1].pk) if rows and has_next else None
    prev_cursor = encode_cursor(sort_value(rows[0], field), rows[0].pk) if rows and has_prev else None
    return Page(rows, next_cursor, prev_cursor)
