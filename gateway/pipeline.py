"""The scan of one message: ClamAV, the attachment rules, SpamAssassin, then the allow/block lists,
giving a verdict and an action for each recipient.

`scan()` only asks the scanners; `apply_verdict()` writes the outcome in one transaction and hands
what is to be delivered to the delivery task on commit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from quarantine.lists import list_decision

from .models import Action, MailFlowSettings, Message, RawMessage, Recipient, Verdict
from .scanners import attachments, clamav, spamassassin

log = logging.getLogger(__name__)

VERDICT_RANK = [Verdict.VIRUS, Verdict.BLOCKED_ATTACHMENT, Verdict.BLOCKED_SENDER, Verdict.HIGH_SPAM, Verdict.SPAM,
                Verdict.CLEAN]


@dataclass
class ScanOutcome:
    verdict: str
    spam_score: float | None = None
    spam_threshold: float | None = None
    spam_rules: list[dict] = field(default_factory=list)
    virus_names: list[str] = field(default_factory=list)
    attachments: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def scan(message: Message, raw: bytes, config: MailFlowSettings) -> ScanOutcome:
    """Ask every configured scanner about the message. Raises ScannerUnavailable when one is down."""
    outcome = ScanOutcome(verdict=Verdict.CLEAN)

    started = time.monotonic()
    if clamav.configured():
        result = clamav.scan(raw)
        outcome.virus_names = result.virus_names
        outcome.notes += result.errors
        outcome.timings["clamav"] = round(time.monotonic() - started, 4)
    else:
        outcome.notes.append("virus scan off: CLAMD_URL is not configured")

    started = time.monotonic()
    report = attachments.AttachmentScanner(config.blocked_attachment_patterns(),
                                           block_executables=config.block_executables_by_content).scan(raw)
    outcome.attachments = report.attachments
    outcome.notes += report.notes
    outcome.timings["attachments"] = round(time.monotonic() - started, 4)

    if outcome.virus_names:
        # A virus is quarantined whatever SpamAssassin would say: no need to spend spamd's time on it.
        outcome.verdict = Verdict.VIRUS
        return outcome

    if spamassassin.configured():
        if len(raw) > settings.SPAMD_MAX_SIZE:
            outcome.notes.append(f"spam scan skipped: the message is larger than {settings.SPAMD_MAX_SIZE} bytes")
        else:
            started = time.monotonic()
            spam = spamassassin.check(raw)
            outcome.spam_score, outcome.spam_rules = spam.score, spam.rules
            outcome.spam_threshold = config.spam_threshold
            outcome.timings["spamassassin"] = round(time.monotonic() - started, 4)
    else:
        outcome.notes.append("spam scan off: SPAMD_URL is not configured")

    # The SMTP-time checks whose action is "add to the score" (docs/smtp-policy.md) count like a rule.
    smtp_score = float((message.checks or {}).get("score") or 0.0)
    if smtp_score:
        outcome.spam_score = round((outcome.spam_score or 0.0) + smtp_score, 3)
        outcome.spam_threshold = config.spam_threshold
        outcome.spam_rules = [*outcome.spam_rules, {"name": "MAILGATE_SMTP_CHECKS", "score": smtp_score,
                                                    "description": "SMTP-time checks (SPF, DMARC, DNSBL, ...)"}]

    if report.blocked:
        outcome.verdict = Verdict.BLOCKED_ATTACHMENT
    elif outcome.spam_score is not None and outcome.spam_score >= config.high_spam_threshold:
        outcome.verdict = Verdict.HIGH_SPAM
    elif outcome.spam_score is not None and outcome.spam_score >= config.spam_threshold:
        outcome.verdict = Verdict.SPAM
    return outcome


def recipient_verdict(message: Message, recipient: Recipient, verdict: str) -> tuple[str, str]:
    """The verdict for one recipient after the lists: (verdict, why)."""
    entry = list_decision(message.envelope_sender, message.client_ip, recipient.address)
    if entry is None:
        return verdict, ""
    where = f"{entry.get_scope_display().lower()} {entry.kind} list: {entry.sender}"
    if entry.kind == entry.Kind.BLOCK:
        if verdict in (Verdict.VIRUS, Verdict.BLOCKED_ATTACHMENT):
            return verdict, where
        return Verdict.BLOCKED_SENDER, where
    # Allowed senders skip the spam verdicts; a virus or a blocked attachment is still held.
    if verdict in (Verdict.SPAM, Verdict.HIGH_SPAM):
        return Verdict.CLEAN, where
    return verdict, where


RECIPIENT_STATUS = {
    Action.DELIVER: Recipient.Status.PENDING,
    Action.TAG: Recipient.Status.PENDING,
    Action.QUARANTINE: Recipient.Status.QUARANTINED,
    Action.DELETE: Recipient.Status.DELETED,
}


def worst(verdicts) -> str:
    present = set(verdicts)
    return next((v for v in VERDICT_RANK if v in present), Verdict.CLEAN)


@transaction.atomic
def apply_verdict(message: Message, outcome: ScanOutcome, config: MailFlowSettings) -> bool | None:
    """Write the scan's outcome: per-recipient verdict and action, and the message's state.

    Returns True when recipients are now due for delivery (the caller delivers, or enqueues it), and
    None when this scan's claim is no longer held (it went stale and another worker took the message).
    """
    still_ours = Message.objects.select_for_update().filter(
        pk=message.pk, state=Message.State.SCANNING, claimed_at=message.claimed_at).exists()
    if not still_ours:
        return None
    now = timezone.now()
    recipients = list(message.recipients.filter(status=Recipient.Status.PENDING))
    for recipient in recipients:
        verdict, why = recipient_verdict(message, recipient, outcome.verdict)
        action = config.action_for(verdict)
        recipient.verdict, recipient.action = verdict, action
        recipient.status = RECIPIENT_STATUS[action]
        recipient.next_attempt_at = now if recipient.status == Recipient.Status.PENDING else None
        if why:
            outcome.notes.append(f"{recipient.address}: {why}")
    if len(recipients) == 1:
        recipients[0].save(update_fields=["verdict", "action", "status", "next_attempt_at"])
    else:
        Recipient.objects.bulk_update(recipients, ["verdict", "action", "status", "next_attempt_at"])

    actions = {r.action for r in recipients}
    message.verdict = outcome.verdict if outcome.verdict != Verdict.CLEAN else worst(r.verdict for r in recipients)
    message.action = next((a for a in (Action.QUARANTINE, Action.DELETE, Action.TAG, Action.DELIVER) if a in actions),
                          config.action_for(message.verdict))
    message.spam_score, message.spam_threshold = outcome.spam_score, outcome.spam_threshold
    message.spam_rules, message.virus_names = outcome.spam_rules, outcome.virus_names
    message.attachments, message.scan_notes = outcome.attachments, outcome.notes
    message.checks = {**message.checks, "scan_seconds": outcome.timings}
    message.scanned_at, message.last_error, message.next_attempt_at = now, "", None
    message.quarantined = any(r.status == Recipient.Status.QUARANTINED for r in recipients)
    deliver = any(r.status == Recipient.Status.PENDING for r in recipients)
    if message.quarantined:
        message.state = Message.State.QUARANTINED
    elif deliver:
        message.state = Message.State.DELIVERING
    else:
        message.state = Message.State.DELETED
        message.completed_at = now
    message.save(update_fields=[
        "verdict", "action", "spam_score", "spam_threshold", "spam_rules", "virus_names", "attachments",
        "scan_notes", "checks", "scanned_at", "last_error", "next_attempt_at", "quarantined", "state",
        "completed_at"])
    if message.state == Message.State.DELETED:
        # The "delete" action discards the mail; its log entry stays.
        RawMessage.objects.filter(message=message).delete()
    log.info("scanned %s: verdict=%s action=%s score=%s viruses=%s", message.queue_id, message.verdict,
             message.action, message.spam_score, ",".join(message.virus_names) or "-")
    return deliver
