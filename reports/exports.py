"""CSV exports: streamed, and safe to open in a spreadsheet.

A cell that starts with =, +, -, @ (or a tab or CR) is a formula to Excel and LibreOffice; a Subject line
is chosen by whoever sent the mail, so such text cells get a leading apostrophe (OWASP "CSV injection").
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator

from django.db.models import Prefetch, QuerySet
from django.http import HttpResponse, StreamingHttpResponse

from gateway.models import Recipient

from .filters import SORTS

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
MESSAGE_COLUMNS = ["Received", "Queue ID", "Direction", "Status", "Client IP", "Client name", "Sender",
                   "Recipients", "From", "Subject", "Size", "Verdict", "Score", "Quarantined", "Viruses",
                   "Refusal reason"]


def safe_cell(value) -> object:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


class _Echo:
    """A file-like object whose write returns the line: csv.writer then yields what to stream."""

    def write(self, value: str) -> str:
        return value


def _csv_lines(rows: Iterable[Iterable]) -> Iterator[str]:
    writer = csv.writer(_Echo())
    for row in rows:
        yield writer.writerow([safe_cell(value) for value in row])


def csv_response(rows: Iterable[Iterable], filename: str) -> HttpResponse:
    response = HttpResponse("".join(_csv_lines(rows)), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def stream_messages(qs: QuerySet, sort: str) -> StreamingHttpResponse:
    field, descending, _ = SORTS.get(sort, SORTS["-received"])
    order = (f"-{field}", "-id") if descending else (field, "id")
    qs = qs.order_by(*order).prefetch_related(
        Prefetch("recipients", queryset=Recipient.objects.order_by("id").only("message_id", "address")))

    def rows() -> Iterator[list]:
        yield MESSAGE_COLUMNS
        # iterator(chunk_size) with prefetch_related: one recipients query per 2000 messages.
        for m in qs.iterator(chunk_size=2000):
            yield [m.received_at.isoformat(), m.queue_id, m.direction, m.state, m.client_ip or "", m.client_name,
                   m.envelope_sender, " ".join(r.address for r in m.recipients.all()), m.header_from, m.subject,
                   m.size, m.verdict, "" if m.spam_score is None else m.spam_score, "yes" if m.quarantined else "no",
                   " ".join(str(v) for v in m.virus_names) if isinstance(m.virus_names, list) else "",
                   m.refusal_reason]

    response = StreamingHttpResponse(_csv_lines(rows()), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="messages.csv"'
    return response


def total_by_date_rows(rows: list[dict], total: dict) -> list[list]:
    header = ["Date", "Mail", "Virus", "Virus %", "Spam", "Spam %", "Content", "Content %", "Volume (bytes)",
              "Unknown users", "Can't resolve", "RBL"]

    def line(label, r):
        return [label, r["mail"], r["virus"], r["virus_pct"], r["spam_total"], r["spam_pct"], r["content"],
                r["content_pct"], r["volume"], r["refused_unknown_user"], r["refused_cant_resolve"], r["refused_rbl"]]

    return [header, *[line(r["day"].isoformat(), r) for r in rows], line("Total", total)]


def top_rows(key_label: str, by_count: list[dict], by_volume: list[dict]) -> list[list]:
    out = [["Order", "Rank", key_label, "Messages", "Volume (bytes)"]]
    for order, rows in (("quantity", by_count), ("volume", by_volume)):
        out += [[order, rank, r["key"], r["count"], r["volume"]] for rank, r in enumerate(rows, 1)]
    return out
