"""What a delivered message carries besides its stored original: our trace and scan headers, the subject
tag of tagged spam, and (for mail of ours) the DKIM signature, made per delivery; the stored original
stays as received."""

from __future__ import annotations

from django.conf import settings

from gateway.mailauth.dmarc import strip_authentication_results
from gateway.models import Message, Verdict

from . import signing


def scan_headers(message: Message, recipient_verdict: str, threshold: float | None = None) -> bytes:
    """Our headers on delivered mail: what was found, so the mail client and the user can tell. `threshold`:
    the recipients' own spam threshold (their spam policy's), else the message's."""
    lines = [f"X-Mailgate-Verdict: {recipient_verdict or message.verdict or 'unscanned'}"]
    if message.spam_score is not None:
        is_spam = recipient_verdict in (Verdict.SPAM, Verdict.HIGH_SPAM)
        tests = ",".join(f"{r['name']}={r['score']:g}" for r in message.spam_rules) or "none"
        lines.append(f"X-Spam-Status: {'Yes' if is_spam else 'No'}, score={message.spam_score:.1f} "
                     f"required={threshold if threshold is not None else message.spam_threshold or 0:.1f} "
                     f"tests={tests}")
        lines.append(f"X-Spam-Score: {message.spam_score:.1f}")
        if is_spam:
            lines.append("X-Spam-Flag: YES")
    if message.virus_names:
        lines.append(f"X-Mailgate-Virus: {', '.join(message.virus_names)}")
    blocked = [a for a in message.attachments if a.get("blocked")]
    if blocked:
        lines.append("X-Mailgate-Blocked-Attachments: " + ", ".join(a["name"] or "unnamed" for a in blocked))
    lines.append(f"X-Mailgate-Queue-ID: {message.queue_id} ({message.node})")
    out = []
    for line in lines:
        # Fold long values; header values here are ASCII (rule names, scores, our words) or were decoded.
        text = line.encode("ascii", "replace").decode()
        while len(text) > 900:
            cut = text.rfind(",", 0, 900) + 1 or 900
            out.append(text[:cut])
            text = "\t" + text[cut:]
        out.append(text)
    return ("\r\n".join(out) + "\r\n").encode()


def tag_subject(raw: bytes, prefix: str) -> bytes:
    """Put the prefix in front of the Subject, touching nothing else in the message."""
    if not prefix:
        return raw
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = raw.partition(b"\n\n")
    newline = b"\r\n" if b"\r\n" in raw[: len(head) + 2] else b"\n"
    lines = head.split(newline)
    tag = prefix.encode("utf-8") + b" "
    for index, line in enumerate(lines):
        if line[:8].lower() == b"subject:":
            value = line[8:].lstrip(b" \t")
            if not value.startswith(tag.strip()):
                lines[index] = b"Subject: " + tag + value
            break
    else:
        lines.append(b"Subject: " + tag.strip())
    return newline.join(lines) + sep + body


def without_foreign_authentication_results(raw: bytes) -> bytes:
    """Authentication-Results claiming to be ours came from outside (RFC 8601 §5): they go, here and not
    in the stored original, which stays as received."""
    head = raw[: raw.find(b"\r\n\r\n") if b"\r\n\r\n" in raw else len(raw)].lower()
    if b"authentication-results" in head and settings.SMTP_HOSTNAME.lower().encode() in head:
        return strip_authentication_results(raw, settings.SMTP_HOSTNAME)
    return raw


def outgoing(message: Message, raw: bytes, verdict: str, *, tagged: bool, prefix: str,
             threshold: float | None = None) -> bytes:
    """The bytes sent for one group of recipients: our added headers (CRLF), the scan headers for their
    verdict (and their spam threshold), the original (its subject tagged for tagged spam), signed when the
    message is ours to sign."""
    content = message.added_headers.encode("utf-8", "replace").replace(b"\r\n", b"\n").replace(
        b"\n", b"\r\n") + scan_headers(message, verdict, threshold)
    body = tag_subject(raw, prefix) if tagged else raw
    return signing.sign_outgoing(message, content + body)
