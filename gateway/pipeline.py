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

from quarantine.lists import list_decision, lists_are_empty

from . import rowsql
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


MESSAGE_VERDICT_FIELDS = ("verdict", "action", "spam_score", "spam_threshold", "spam_rules", "virus_names",
                          "attachments", "scan_notes", "checks", "scanned_at", "last_error", "next_attempt_at",
                          "quarantined", "state", "completed_at")


def _outcome_to_message(message: Message, outcome: ScanOutcome, verdicts: list[str], actions: set[str],
                        statuses: set[str], config: MailFlowSettings, now) -> bool:
    """Set the message's scan fields from the recipients' verdicts, actions and statuses; True when
    recipients are due for delivery."""
    message.verdict = outcome.verdict if outcome.verdict != Verdict.CLEAN else worst(verdicts)
    message.action = next((a for a in (Action.QUARANTINE, Action.DELETE, Action.TAG, Action.DELIVER) if a in actions),
                          config.action_for(message.verdict))
    message.spam_score, message.spam_threshold = outcome.spam_score, outcome.spam_threshold
    message.spam_rules, message.virus_names = outcome.spam_rules, outcome.virus_names
    message.attachments, message.scan_notes = outcome.attachments, outcome.notes
    message.checks = {**message.checks, "scan_seconds": outcome.timings}
    message.scanned_at, message.last_error, message.next_attempt_at = now, "", None
    message.quarantined = Recipient.Status.QUARANTINED in statuses
    deliver = Recipient.Status.PENDING in statuses
    message.completed_at = None
    if message.quarantined:
        message.state = Message.State.QUARANTINED
    elif deliver:
        message.state = Message.State.DELIVERING
    else:
        message.state = Message.State.DELETED
        message.completed_at = now
    return deliver


def _pending_of(message: Message, ids: list[int] | None = None) -> tuple[str, list]:
    """WHERE clause and parameters for the message's pending recipients (those of `ids` only, if given)."""
    where = f"{rowsql.column(Recipient, 'message')} = %s AND {rowsql.state_is(Recipient, 'status')}"
    params: list = [message.pk, Recipient.Status.PENDING]
    if ids is not None:
        where += f" AND {rowsql.column(Recipient, 'id')} IN ({', '.join(['%s'] * len(ids))})"
        params += ids
    return where, params


@dataclass
class Applied:
    """What apply_verdict wrote: whether recipients are due for delivery, and those of them it already
    claimed for the caller's delivery (status delivering under this scan's timestamp), if it was asked to."""

    deliver: bool
    claimed: list[Recipient] | None = None


def apply_verdict(message: Message, outcome: ScanOutcome, config: MailFlowSettings, *,
                  claim_delivery: bool = False) -> Applied | None:
    """Write the scan's outcome: per-recipient verdict and action, and the message's state.

    Returns what is now due for delivery (the caller delivers, or enqueues it), and None when this scan's
    claim is no longer held (it went stale and another worker took the message). The message row is
    written (and locked) first, under the claim, then the recipients: the same order as every other
    writer of both, and nothing is written when the claim is lost.

    With claim_delivery, the recipients to deliver are claimed for the caller in the same UPDATE that
    records their verdict (the caller delivers at once): one write per recipient fewer. Should the
    caller die before it records an outcome, the sweeper hands the stale claim back, as it does for a
    delivery that died on the way.
    """
    now = timezone.now()
    if lists_are_empty():
        # No allow/block entry exists, so every pending recipient gets the scan's own verdict: one UPDATE
        # for all of them instead of a read and a write each (the path of nearly every message).
        action = config.action_for(outcome.verdict)
        status = RECIPIENT_STATUS[action]
        deliver = _outcome_to_message(message, outcome, [outcome.verdict], {action}, {status}, config, now)
        values = {"verdict": outcome.verdict, "action": action, "status": status,
                  "next_attempt_at": now if status == Recipient.Status.PENDING else None}
        claim = deliver and claim_delivery
        if claim:
            values.update(status=Recipient.Status.DELIVERING, claimed_at=now)
        if message.state != Message.State.DELETED and rowsql.writes_in_one_statement():
            result = _uniform_in_one_statement(message, outcome, config, values, claim, now)
        else:
            result = _uniform_in_a_transaction(message, outcome, config, values, claim, now)
    else:
        result = _per_recipient(message, outcome, config, now)
    if result is not None:
        log.info("scanned %s: verdict=%s action=%s score=%s viruses=%s", message.queue_id, message.verdict,
                 message.action, message.spam_score, ",".join(message.virus_names) or "-")
    return result


def _claim_check(message: Message) -> tuple[str, list]:
    return (f"{rowsql.column(Message, 'id')} = %s AND {rowsql.state_is(Message, 'state')} "
            f"AND {rowsql.column(Message, 'claimed_at')} = %s",
            [message.pk, Message.State.SCANNING, rowsql.value(Message, "claimed_at", message.claimed_at)])


def _verdict_fields(message: Message) -> dict:
    return {name: getattr(message, name) for name in MESSAGE_VERDICT_FIELDS}


def _uniform_in_one_statement(message: Message, outcome: ScanOutcome, config: MailFlowSettings, values: dict,
                              claim: bool, now) -> Applied | None:
    """PostgreSQL: the message's UPDATE under the claim as a WITH, its pending recipients' UPDATE joined
    to it: both or neither, in one statement and one commit, without a transaction block (BEGIN and
    COMMIT are round trips of their own)."""
    message_id = rowsql.column(Message, "id")
    sql, params = rowsql.update_sql(Message, _verdict_fields(message), *_claim_check(message), returning=message_id)
    scanned = rowsql.With("scanned", sql, params)
    where = (f"{rowsql.table(Recipient)}.{rowsql.column(Recipient, 'message')} = scanned.{message_id} "
             f"AND {rowsql.state_is(Recipient, 'status')}")
    claimed = None
    if claim:
        rows = rowsql.update_returning(Recipient, values, where, [Recipient.Status.PENDING], with_=scanned)
        claimed = sorted((r for r, _ in rows), key=lambda r: r.pk)
        count = len(claimed)
    else:
        count = rowsql.update(Recipient, values, where, [Recipient.Status.PENDING], with_=scanned)
    if count:
        return Applied(message.state == Message.State.DELIVERING, claimed)
    # No recipient row changed: the claim was lost (nothing written), or none was pending (written).
    if not Message.objects.filter(pk=message.pk, state=message.state, scanned_at=now).exists():
        return None
    with transaction.atomic():
        return _no_recipient_pending(message, outcome, config, now)


def _no_recipient_pending(message: Message, outcome: ScanOutcome, config: MailFlowSettings, now) -> Applied:
    """No recipient was pending: nothing to deliver or hold (the message was all but empty)."""
    _outcome_to_message(message, outcome, [], set(), set(), config, now)
    rowsql.update(Message, _verdict_fields(message), f"{rowsql.column(Message, 'id')} = %s", [message.pk])
    _discard_if_deleted(message)
    return Applied(False)


def _discard_if_deleted(message: Message) -> None:
    if message.state == Message.State.DELETED:
        # The "delete" action discards the mail; its log entry stays.
        RawMessage.objects.filter(message=message).delete()


@transaction.atomic
def _uniform_in_a_transaction(message: Message, outcome: ScanOutcome, config: MailFlowSettings, values: dict,
                              claim: bool, now) -> Applied | None:
    """Elsewhere (SQLite), or for the delete action: the message, then its recipients, in a transaction."""
    if not rowsql.update(Message, _verdict_fields(message), *_claim_check(message)):
        return None
    claimed = None
    if claim:
        claimed = sorted((r for r, _ in rowsql.update_returning(Recipient, values, *_pending_of(message))),
                         key=lambda r: r.pk)
        count = len(claimed)
    else:
        count = rowsql.update(Recipient, values, *_pending_of(message))
    if not count:
        return _no_recipient_pending(message, outcome, config, now)
    _discard_if_deleted(message)
    return Applied(message.state == Message.State.DELIVERING, claimed)


@transaction.atomic
def _per_recipient(message: Message, outcome: ScanOutcome, config: MailFlowSettings, now) -> Applied | None:
    """Allow/block entries exist: each recipient's verdict after the lists, one UPDATE per distinct one."""
    still_ours = Message.objects.select_for_update().filter(
        pk=message.pk, state=Message.State.SCANNING, claimed_at=message.claimed_at).exists()
    if not still_ours:
        return None
    recipients = list(message.recipients.filter(status=Recipient.Status.PENDING))
    groups: dict[tuple, list[int]] = {}
    for recipient in recipients:
        verdict, why = recipient_verdict(message, recipient, outcome.verdict)
        action = config.action_for(verdict)
        recipient.verdict, recipient.action = verdict, action
        recipient.status = RECIPIENT_STATUS[action]
        groups.setdefault((verdict, action, recipient.status), []).append(recipient.pk)
        if why:
            outcome.notes.append(f"{recipient.address}: {why}")
    for (verdict, action, status), ids in groups.items():
        rowsql.update(Recipient, {"verdict": verdict, "action": action, "status": status,
                                  "next_attempt_at": now if status == Recipient.Status.PENDING else None},
                      *_pending_of(message, ids))
    deliver = _outcome_to_message(message, outcome, [r.verdict for r in recipients],
                                  {r.action for r in recipients}, {r.status for r in recipients}, config, now)
    # The row is locked above and the claim checked: still ours.
    rowsql.update(Message, _verdict_fields(message), f"{rowsql.column(Message, 'id')} = %s", [message.pk])
    _discard_if_deleted(message)
    return Applied(deliver)  # the recipients stay pending: the caller's delivery claims them
