"""The verdict on a message: what ClamAV, the attachment rules and SpamAssassin find (`scan`), and for
each recipient what follows from its spam policy and the allow and block lists (`recipient_verdict`,
grouped by `verdict_for_all` / `verdicts_per_recipient`). Nothing here writes: gateway.scan.record does."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.conf import settings

from gateway.mailbytes import first_received
from gateway.models import CONTENT_VERDICTS, Action, MailFlowSettings, Message, Recipient, Verdict, spam_verdict
from gateway.policy.lists import list_decision

from . import attachments, clamav, mime, spamassassin, spampolicy
from .limits import ScanLimits

log = logging.getLogger(__name__)

# Worst first. Unscannable follows virus: what could not be checked is held unless the administrator's action
# for it says otherwise.
VERDICT_RANK = [Verdict.VIRUS, Verdict.UNSCANNABLE, Verdict.BLOCKED_ATTACHMENT, Verdict.BLOCKED_SENDER,
                Verdict.HIGH_SPAM, Verdict.SPAM, Verdict.CLEAN]


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
    unscannable: list[str] = field(default_factory=list)  # why it could not be checked whole (also in notes)


def scan(message: Message, raw: bytes, config: MailFlowSettings) -> ScanOutcome:
    """Ask every configured scanner about the message. Raises ScannerUnavailable when one is down.

    The message is read once (gateway.scan.mime) for both the attachment rules and clamd, which is given the
    whole message and then, over the same connection, each decoded part and archive member the walk finds.
    A message that cannot be read whole (a limit, MIME that cannot be read one way only, too large for clamd)
    is unscannable: its reasons are in the notes and the log, and it is held by `action_unscannable`.
    """
    outcome = ScanOutcome(verdict=Verdict.CLEAN)
    limits = ScanLimits.from_settings()

    started = time.monotonic()
    structure = None if attachments.plain_text_only(raw) else mime.read(raw, limits.mime)
    scanner = attachments.AttachmentScanner(config.blocked_attachment_patterns(),
                                            block_executables=config.block_executables_by_content, limits=limits)
    virus = _VirusScan(raw, many=structure is not None) if clamav.configured() else None
    try:
        if virus is not None:
            virus.scan("the message", raw, "")
        else:
            outcome.notes.append("virus scan off: CLAMD_URL is not configured")
        # One text part without a name (structure None): no attachment, nothing beyond the whole message.
        report = attachments.AttachmentReport() if structure is None else \
            scanner.scan(raw, structure, inspect=virus.scan if virus is not None else None)
    finally:
        if virus is not None:
            virus.session.close()
    outcome.attachments = report.attachments
    unscannable = list(report.unscannable)
    if virus is not None:
        result = virus.session.result
        outcome.virus_names = result.virus_names
        outcome.notes += result.errors
        unscannable += result.unscannable
        outcome.timings["clamav"] = round(virus.seconds, 4)
    outcome.timings["attachments"] = round(time.monotonic() - started - outcome.timings.get("clamav", 0.0), 4)
    outcome.notes += _few(report.notes)
    outcome.unscannable = _few(list(dict.fromkeys(unscannable)))
    outcome.notes += [f"unscannable: {reason}" for reason in outcome.unscannable]

    if outcome.virus_names:
        # A virus is quarantined whatever SpamAssassin would say: no need to spend spamd's time on it.
        outcome.verdict = Verdict.VIRUS
        return outcome
    if outcome.unscannable:
        # Held, not delivered unchecked: the part not read may be the one that matters. Not sent to spamd
        # either: whatever it says, the action for unscannable mail decides.
        log.warning("message %s is unscannable: %s", message.queue_id, "; ".join(outcome.unscannable))
        outcome.verdict = Verdict.UNSCANNABLE
        return outcome

    if spamassassin.configured():
        if len(raw) > settings.SPAMD_MAX_SIZE:
            outcome.notes.append(f"spam scan skipped: the message is larger than {settings.SPAMD_MAX_SIZE} bytes")
        else:
            started = time.monotonic()
            spam = spamassassin.check(spamd_input(message.added_headers, raw))
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
    else:
        outcome.verdict = spam_verdict(outcome.spam_score, config.spam_threshold, config.high_spam_threshold)
    return outcome


MAX_NOTES = 20


def _few(notes: list[str]) -> list[str]:
    """At most MAX_NOTES of them: a message of a thousand odd parts says so in a line, not a thousand."""
    if len(notes) <= MAX_NOTES:
        return notes
    return [*notes[:MAX_NOTES], f"... and {len(notes) - MAX_NOTES} more"]


class _VirusScan:
    """The streams of one message for clamd: the whole message first, then each decoded part and archive
    member that is not the same bytes as one already sent."""

    def __init__(self, raw: bytes, *, many: bool):
        self.session = clamav.Session(session=many)
        self.sent: set[str] = set()
        self.raw_size = len(raw)
        self.seconds = 0.0

    def scan(self, label: str, data: bytes, sha256: str) -> None:
        if sha256:
            if sha256 in self.sent:
                return
            self.sent.add(sha256)
        started = time.monotonic()
        try:
            self.session.scan(data, label)
        finally:
            self.seconds += time.monotonic() - started


def spamd_input(added_headers: str, raw: bytes) -> bytes:
    """The message as SpamAssassin should see it: with our Received field in front, as an MTA hands it
    to a content filter. Without it SpamAssassin cannot tell the connecting client (its address, reverse
    name and HELO): the rules on the last untrusted relay (RDNS_NONE, the HELO rules; with network tests
    on, the RCVD_IN_* blocklists) judge whatever relays the sender wrote into the message instead, and
    Bayes never learns the sending host. Only that field: the Received-SPF and Authentication-Results we
    add report the SMTP-time checks, which add to the score on their own (docs/smtp-policy.md)."""
    return first_received(added_headers) + raw


def recipient_verdict(message: Message, recipient: Recipient, verdict: str) -> tuple[str, str]:
    """The verdict for one recipient after the lists: (verdict, why)."""
    entry = list_decision(message.envelope_sender, message.client_ip, recipient.address)
    if entry is None:
        return verdict, ""
    where = f"{entry.get_scope_display().lower()} {entry.kind} list: {entry.sender}"
    if entry.kind == entry.Kind.BLOCK:
        if verdict in CONTENT_VERDICTS:
            return verdict, where
        return Verdict.BLOCKED_SENDER, where
    # Allowed senders skip the spam verdicts; a virus, an unscannable message or a blocked attachment is still
    # held.
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


# A verdict for a group of recipients: (verdict, action, status, the spam policy that decided), and the ids of
# the recipients it is for (None: every pending recipient of the message).
Key = tuple[str, str, str, spampolicy.SpamPolicy]
Groups = dict[Key, list[int] | None]
# One recipient's (address, verdict, action, policy), for the log.
Decided = tuple[str, str, str, str]


def verdict_for_all(outcome: ScanOutcome, config: MailFlowSettings) -> Key:
    """(verdict, action, status, policy) of every pending recipient when no list entry and no domain or user
    policy tells them apart: the global policy's, whose thresholds gave the scan its verdict."""
    policy = spampolicy.global_policy(config)
    action = policy.action_for(outcome.verdict, config)
    return outcome.verdict, action, RECIPIENT_STATUS[action], policy


def verdicts_per_recipient(message: Message, outcome: ScanOutcome, config: MailFlowSettings,
                           recipients: Iterable[Recipient] | None = None,
                           decided: list[Decided] | None = None) -> Groups:
    """Allow/block entries or spam policies exist: each pending recipient's verdict under its own policy
    (gateway.scan.spampolicy) and then the lists, grouped. `recipients`: the pending ones when already in
    hand; `decided`, when given, gets each recipient's outcome for the log.

    The message's own spam verdict becomes the worst its recipients' policies give (before the lists, as a
    list entry never changes the message's verdict), so that a message clean for its only recipient's
    thresholds is not called spam; a verdict on the content stays what it is."""
    if recipients is None:
        recipients = message.recipients.filter(status=Recipient.Status.PENDING)
    groups: Groups = {}
    judged = []
    for recipient in recipients:
        policy = spampolicy.for_recipient(recipient.address, config)
        judged.append(policy.verdict(outcome.verdict, outcome.spam_score))
        verdict, why = recipient_verdict(message, recipient, judged[-1])
        action = policy.action_for(verdict, config)
        groups.setdefault((verdict, action, RECIPIENT_STATUS[action], policy), []).append(recipient.pk)
        if decided is not None:
            decided.append((recipient.address, verdict, action, policy.label))
        if why:
            outcome.notes.append(f"{recipient.address}: {why}")
    if judged and outcome.verdict not in CONTENT_VERDICTS:
        outcome.verdict = worst(judged)
    return groups
