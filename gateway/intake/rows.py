"""The rows of the mail log for an accepted message: the Message and its Recipients, with the summary of its
headers, our trace header, and every column's default, as the ORM would fill it in (the PostgreSQL writer
sends them without the ORM)."""

from __future__ import annotations

import email.errors
import email.header
import email.parser
import email.policy
import email.utils
from dataclasses import dataclass, field
from functools import cache

from django.conf import settings
from django.utils import timezone

from gateway.mailbytes import header_section
from gateway.models import Message, Recipient, new_queue_id


@dataclass
class Arrival:
    """An accepted message's envelope and what the server knew of its client and session: what the intake
    writes with the message's bytes."""

    client_ip: str | None
    client_name: str
    helo: str
    sender: str
    recipients: list[str]
    mail_options: list[str]
    authenticated_as: str = ""
    added_headers: str = ""
    checks: dict = field(default_factory=dict)


def _header_text(value) -> str:
    try:
        return " ".join(str(value).split())
    except Exception:  # noqa: BLE001 - an undecodable header is logged as its raw form
        return ""


def _decoded(value) -> str:
    """A header value with its encoded words (RFC 2047) decoded; what cannot be decoded stays as sent."""
    if isinstance(value, email.header.Header):
        value = str(value)
    text = str(value)
    if "=?" in text:
        try:
            parts = email.header.decode_header(text)
        except (ValueError, email.errors.HeaderParseError):
            parts = []
        try:
            text = str(email.header.make_header(parts)) if parts else text
        except (LookupError, UnicodeError, ValueError, email.errors.HeaderParseError):
            # Raw UTF-8 beside encoded words, or an unknown charset: each part on its own.
            text = "".join(_part_text(part, charset) for part, charset in parts)
    return " ".join(text.split())


def _part_text(part: bytes | str, charset: str | None) -> str:
    if isinstance(part, str):
        return part
    try:
        # decode_header hands back the unencoded runs as raw-unicode-escape bytes.
        return part.decode(charset or "raw-unicode-escape", "replace")
    except LookupError:
        return part.decode("ascii", "replace")


def summarise_headers(data: bytes) -> dict[str, str]:
    """From, Subject and Message-ID, decoded for the log, from the header section only.

    compat32 and decode_header rather than email.policy.default: the same text for the log at a tenth
    of the cost, on the path of every message. Raw UTF-8 in headers (RFC 6532, and common without it)
    is read as UTF-8; bytes that are not UTF-8 show as U+FFFD.
    """
    head = header_section(data)
    try:
        headers = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(head.decode("utf-8", "replace"))
    except Exception:  # noqa: BLE001
        return {"header_from": "", "subject": "", "message_id": ""}
    out = {}
    for key, name in (("header_from", "From"), ("subject", "Subject"), ("message_id", "Message-ID")):
        try:
            value = _decoded(headers.get(name, ""))
        except Exception:  # noqa: BLE001 - malformed encoded words, bad charsets
            value = ""
        out[key] = value[:998]
    return out


def without_nul(value):
    """PostgreSQL's text and jsonb cannot hold NUL: a header, HELO or check detail with one is logged with
    U+FFFD instead (else the row could never be written, and the client would retry for ever)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_nul(v) for v in value]
    return value


@cache
def new_row_fields(model) -> tuple:
    """The columns a new row of `model` is written with: all but its primary key and its foreign keys
    (the database numbers the row; the writer joins it to its message)."""
    return tuple(f for f in model._meta.concrete_fields if not f.primary_key and not f.is_relation)


@cache
def _defaults(model) -> tuple[tuple[str, object, bool], ...]:
    """(attribute, default, whether to call it) for each column of a new row."""
    out = []
    for f in new_row_fields(model):
        call = f.has_default() and callable(f.default)
        out.append((f.attname, f.default if call else f.get_default(), call))
    return tuple(out)


def row_values(model, **given) -> dict:
    """Every column of a new row of `model` (attribute → value): those given, and the others' defaults
    as the ORM would fill them in."""
    values = {name: default() if call else default for name, default, call in _defaults(model) if name not in given}
    values.update(given)
    return values


def new_message(envelope: Arrival, data: bytes) -> tuple[dict, list[dict]]:
    """The columns of the Message row of an accepted message and those of its Recipient rows."""
    direction = Message.Direction.OUTBOUND if envelope.authenticated_as or envelope.checks.get("relay") \
        else Message.Direction.INBOUND
    sender = envelope.sender[:320]
    # queue_id and received_at are known before the INSERT, so the Received: header goes in with it.
    queue_id, received_at = new_queue_id(), timezone.now()
    given = without_nul(dict(
        queue_id=queue_id, received_at=received_at, node=settings.NODE_NAME, direction=direction,
        state=Message.State.RECEIVED, client_ip=envelope.client_ip or None, client_name=envelope.client_name[:255],
        helo=envelope.helo[:255], authenticated_as=envelope.authenticated_as, envelope_sender=sender,
        sender_domain=sender.rsplit("@", 1)[1].lower()[:253] if "@" in sender else "",
        mail_options=envelope.mail_options, size=len(data), checks=envelope.checks,
        added_headers=received_header(envelope, queue_id, received_at) + envelope.added_headers,
        **summarise_headers(data)))
    recipients = [row_values(Recipient, address=address.lower(), domain=address.rsplit("@", 1)[-1].lower(),
                             received_at=received_at)
                  for address in envelope.recipients]
    return row_values(Message, **given), recipients


def received_header(envelope: Arrival, queue_id: str, received_at) -> str:
    """Our trace header (RFC 5321 §4.4), prepended on delivery; the stored original stays untouched."""
    client = f"{envelope.client_name or 'unknown'} [{envelope.client_ip}]"
    protocol = "ESMTP"
    if envelope.checks.get("tls"):
        protocol += "S"
    if envelope.authenticated_as:
        protocol += "A"
    if "SMTPUTF8" in envelope.mail_options:
        protocol = "UTF8" + ("SMTPS" if envelope.checks.get("tls") else "SMTP") + (
            "A" if envelope.authenticated_as else "")
    date = email.utils.format_datetime(timezone.localtime(received_at))
    for_part = f"\r\n\tfor <{envelope.recipients[0]}>" if len(envelope.recipients) == 1 else ""
    return (f"Received: from {envelope.helo or 'unknown'} ({client})\r\n"
            f"\tby {settings.SMTP_HOSTNAME} (Mailgate) with {protocol} id {queue_id}{for_part};\r\n"
            f"\t{date}\r\n")
