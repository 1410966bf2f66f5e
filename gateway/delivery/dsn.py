"""Delivery status notifications (RFC 3464): tell the envelope sender which recipients failed.

A DSN is a message of our own (direction 'dsn', null envelope sender so that it can never cause
another one), logged and delivered like any other, without a scan.
"""

from __future__ import annotations

import email.policy
import email.utils
import re
from email.message import EmailMessage

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from gateway.dispatch import enqueue
from gateway.mailbytes import header_section
from gateway.models import Message, RawMessage, Recipient, Verdict

ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


def _status(recipient: Recipient) -> str:
    match = ENHANCED.search(recipient.reply_text or "")
    if match and match.group(1)[0] in "45":
        # A DSN reports a final failure: a 4.x.x that expired is reported as its 5.x.x counterpart.
        return "5" + match.group(1)[1:]
    return "5.4.7" if recipient.status == Recipient.Status.EXPIRED else "5.0.0"


def _original_headers(message: Message) -> bytes:
    raw = RawMessage.objects.filter(message=message).values_list("data", flat=True).first()
    if raw is None:
        return b""
    return header_section(bytes(raw)) + b"\r\n"


def _diagnostic(recipient: Recipient) -> list[str]:
    """The downstream's reply as a Diagnostic-Code field (only when a server answered)."""
    if not recipient.reply_code:
        return []
    diagnostic = re.sub(r"\s*\(from [^)]*\)$", "", recipient.reply_text)
    return [f"Diagnostic-Code: smtp; {' '.join(diagnostic.split())}"]


def _report(message: Message, *, kind: str, subject: str, text: list[str], recipient_fields: list[str]) -> bytes:
    """A multipart/report (RFC 3462, report-type delivery-status) to the envelope sender: the text for people,
    the delivery-status fields (the per-message ones here, then `recipient_fields`), the original's header."""
    host = settings.SMTP_HOSTNAME
    boundary = f"=_{kind}_{message.queue_id}_{int(timezone.now().timestamp())}"
    human = EmailMessage()
    human.set_content("\n".join(text) + "\n", cte="quoted-printable")
    fields = [
        f"Reporting-MTA: dns; {host}",
        f"X-Mailgate-Queue-ID: {message.queue_id}",
        f"Arrival-Date: {email.utils.format_datetime(message.received_at)}",
        *recipient_fields,
    ]
    header_lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{message.envelope_sender}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: {email.utils.make_msgid(domain=host)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    parts = [
        "\r\n".join(header_lines).encode() + b"\r\n\r\nThis is a MIME-encapsulated delivery status notification.\r\n",
        f"--{boundary}\r\n".encode() + human.as_bytes(policy=email.policy.SMTP),
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n".encode()
        + "\r\n".join(fields).encode("utf-8", "replace") + b"\r\n",
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n".encode() + _original_headers(message),
        f"--{boundary}--\r\n".encode(),
    ]
    return b"\r\n".join(p.rstrip(b"\r\n") for p in parts[:-1]) + b"\r\n" + parts[-1]


def _about(message: Message) -> list[str]:
    return [f"  Subject: {message.subject}",
            f"  Queued as: {message.queue_id}, received {message.received_at:%Y-%m-%d %H:%M:%S %Z}", ""]


FAILURE_SUBJECT = "Undelivered Mail Returned to Sender"
DELAY_SUBJECT = "Delayed Mail (still being retried)"


def build_failure_notice(message: Message, failed: list[Recipient]) -> bytes:
    text = [
        f"This is the mail system at {settings.SMTP_HOSTNAME}.",
        "",
        "Your message could not be delivered to one or more recipients. The reply of the",
        "receiving server is shown below for each of them.",
        "",
        *_about(message),
    ]
    fields: list[str] = []
    for recipient in failed:
        reason = "expired in the queue after retrying" if recipient.status == Recipient.Status.EXPIRED else "refused"
        text.append(f"<{recipient.address}>: {reason}: {recipient.reply_text}")
        fields += ["", f"Final-Recipient: rfc822; {recipient.address}", "Action: failed",
                   f"Status: {_status(recipient)}"]
        remote = re.search(r"\(from ([^)\s]+)\)", recipient.reply_text or "")
        if remote:
            fields.append(f"Remote-MTA: dns; {remote.group(1).rsplit(':', 1)[0]}")
        fields += _diagnostic(recipient)
        fields.append(f"Last-Attempt-Date: {email.utils.format_datetime(timezone.now())}")
    return _report(message, kind="dsn", subject=FAILURE_SUBJECT, text=text, recipient_fields=fields)


@transaction.atomic
def send_failure_notice(message: Message, failed: list[Recipient]) -> Message | None:
    """Queue a DSN to the envelope sender; none for a null sender or for a DSN itself."""
    if not message.envelope_sender or message.direction == Message.Direction.DSN:
        return None
    return queue_notice(message, build_failure_notice(message, failed),
                        subject=FAILURE_SUBJECT, note=f"failure notice for {message.queue_id}")


# --- delay warnings (RFC 3464 Action: delayed) -------------------------------------------------------------

def _delay_status(recipient: Recipient) -> str:
    match = ENHANCED.search(recipient.reply_text or "")
    return "4" + match.group(1)[1:] if match else "4.0.0"


def build_delay_notice(message: Message, delayed: list[Recipient], retry_until) -> bytes:
    """A warning to the sender that these recipients have not had the message yet and that it is still being
    tried (until `retry_until`): no action is needed from them."""
    text = [
        f"This is the mail system at {settings.SMTP_HOSTNAME}.",
        "",
        "####################################################################",
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
        "####################################################################",
        "",
        "Your message could not be delivered yet to the recipients below. It is",
        f"still being tried, until {retry_until:%Y-%m-%d %H:%M %Z}; you will be told if it fails.",
        "",
        *_about(message),
    ]
    fields: list[str] = []
    for recipient in delayed:
        text.append(f"<{recipient.address}>: {recipient.reply_text or 'not delivered yet'}")
        fields += ["", f"Final-Recipient: rfc822; {recipient.address}", "Action: delayed",
                   f"Status: {_delay_status(recipient)}", *_diagnostic(recipient),
                   f"Will-Retry-Until: {email.utils.format_datetime(retry_until)}"]
    return _report(message, kind="delay", subject=DELAY_SUBJECT, text=text, recipient_fields=fields)


def queue_notice(message: Message, data: bytes, *, subject: str, note: str) -> Message:
    """A notice of ours to the envelope sender, logged and delivered like any message, without a scan."""
    notice = Message.objects.create(
        node=settings.NODE_NAME, direction=Message.Direction.DSN, state=Message.State.DELIVERING,
        envelope_sender="", header_from=f"MAILER-DAEMON@{settings.SMTP_HOSTNAME}",
        subject=subject, size=len(data), verdict=Verdict.CLEAN,
        action="deliver", scanned_at=timezone.now(), scan_notes=[note])
    RawMessage.objects.create(message=notice, data=data)
    Recipient.objects.create(message=notice, address=message.envelope_sender.lower(), verdict=Verdict.CLEAN,
                             action="deliver", next_attempt_at=timezone.now())
    enqueue.delivery(notice.pk)
    return notice


@transaction.atomic
def send_delay_notice(message: Message, delayed: list[Recipient], retry_until) -> Message | None:
    """Queue a delay warning to the envelope sender; none for a null sender or for a DSN itself."""
    if not message.envelope_sender or message.direction == Message.Direction.DSN:
        return None
    return queue_notice(message, build_delay_notice(message, delayed, retry_until),
                        subject=DELAY_SUBJECT, note=f"delay warning for {message.queue_id}")
