"""Writing a scan's verdict: each recipient's verdict and action, and the message's state.

`apply_verdict()` writes it now (and claims the recipients to deliver for the caller); `hold_verdict()`
keeps it, as a `HeldVerdict`, to be written with the outcome of the delivery that follows at once.
Every write is made under the scan's claim (the message in `scanning` with this scan's timestamp), so a
scan whose claim went stale writes nothing.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from gateway import maillog
from gateway.claims import far_from_stale
from gateway.db import statements
from gateway.models import Action, MailFlowSettings, Message, RawMessage, Recipient, Verdict
from gateway.policy.lists import lists_are_empty

from . import spampolicy
from .verdict import Decided, Groups, Key, ScanOutcome, verdict_for_all, verdicts_per_recipient, worst

log = logging.getLogger(__name__)


def _outcome_to_message(message: Message, outcome: ScanOutcome, groups: Iterable[Key],
                        config: MailFlowSettings, now) -> None:
    """Set the message's scan fields from its recipients' (verdict, action, status, policy) groups."""
    verdicts, actions, statuses, _ = (set(column) for column in zip(*groups, strict=True)) if groups else (set(),) * 4
    message.verdict = outcome.verdict if outcome.verdict != Verdict.CLEAN else worst(verdicts)
    message.action = next((a for a in (Action.QUARANTINE, Action.DELETE, Action.TAG, Action.DELIVER) if a in actions),
                          config.action_for(message.verdict))
    message.spam_score, message.spam_threshold = outcome.spam_score, outcome.spam_threshold
    message.spam_rules, message.virus_names = outcome.spam_rules, outcome.virus_names
    message.attachments, message.scan_notes = outcome.attachments, outcome.notes
    message.checks = {**message.checks, "scan_seconds": outcome.timings}
    message.scanned_at, message.last_error, message.next_attempt_at = now, "", None
    message.quarantined = Recipient.Status.QUARANTINED in statuses
    message.completed_at = None
    if message.quarantined:
        message.state = Message.State.QUARANTINED
    elif Recipient.Status.PENDING in statuses:
        message.state = Message.State.DELIVERING
    else:
        message.state = Message.State.DELETED
        message.completed_at = now


@dataclass
class Applied:
    """What apply_verdict wrote: whether recipients are due for delivery, and those it claimed for the
    caller's delivery (status delivering under the scan's timestamp)."""

    deliver: bool
    claimed: list[Recipient] | None = None


def apply_verdict(message: Message, outcome: ScanOutcome, config: MailFlowSettings,
                  pending: list[Recipient] | None = None) -> Applied | None:
    """Write the scan's outcome: per-recipient verdict and action, and the message's state.

    Returns what is now due for delivery, its recipients already claimed for the caller, who delivers at
    once (should the caller die first, the sweeper hands the stale claim back, as for a delivery that died
    on the way); None when this scan's claim is no longer held (it went stale and another worker took the
    message). The message row is written (and locked) first, under the claim, then the recipients: the
    same order as every other writer of both, and nothing is written when the claim is lost.
    """
    now = timezone.now()
    domains = {r.domain for r in pending} if pending else None  # in hand on PostgreSQL; else any domain
    if lists_are_empty() and not spampolicy.any_policy(domains):
        # No allow/block entry and no domain or user spam policy exists, so every pending recipient gets the
        # scan's own verdict: one UPDATE for all of them, without reading them (the path of nearly every
        # message).
        groups: Groups = {verdict_for_all(outcome, config): None}
        decided: list[Decided] = []
    else:
        decided = []
        groups = verdicts_per_recipient(message, outcome, config, decided=decided)
    _outcome_to_message(message, outcome, groups, config, now)
    if len(groups) == 1 and message.state != Message.State.DELETED and statements.joined():
        result = _in_one_statement(message, outcome, config, groups, now)
    else:
        result = _in_a_transaction(message, outcome, config, groups, now)
    if result is not None:
        _log_verdict(message, decided)
    return result


def _log_verdict(message: Message, decided: list[Decided]) -> None:
    """The scan's line of the log; with the policy that decided when it is not the global one, and a line
    for each recipient when their policies differ (`decided`: each recipient's outcome, empty when every
    recipient had the global policy's)."""
    policies = {policy for _, _, _, policy in decided}
    policy = next(iter(policies)) if len(policies) == 1 else ""
    log.info("scanned %s: verdict=%s action=%s score=%s viruses=%s", message.queue_id, message.verdict,
             message.action, message.spam_score, ",".join(message.virus_names) or "-")
    maillog.scanned(message.queue_id, verdict=message.verdict, action=message.action, score=message.spam_score,
                    viruses=message.virus_names or (),
                    policy="" if policy.startswith("global ") else policy or "per recipient")
    if len(policies) > 1:
        for address, verdict, action, each in decided:
            maillog.recipient_verdict(message.queue_id, recipient=address, verdict=verdict, action=action,
                                      policy=each)


def hold_verdict(message: Message, outcome: ScanOutcome, config: MailFlowSettings,
                 pending: list[Recipient] | None) -> HeldVerdict | None:
    """The verdict held back for the delivery that follows, when the path allows it (see HeldVerdict):
    PostgreSQL, no allow/block entry, one verdict for every pending recipient (the same spam policy's, or
    policies that agree), an action that delivers, recipients pending, and a scan claim far from stale.
    None: apply_verdict() writes it now."""
    if not pending or not statements.joined() or not lists_are_empty():
        return None
    now = timezone.now()
    if spampolicy.any_policy({r.domain for r in pending}):
        # The recipients' policies are in memory (no list entry to read): held only when they agree.
        groups = verdicts_per_recipient(message, outcome, config, pending)
        if len(groups) != 1:
            return None
        (key,) = groups
    else:
        key = verdict_for_all(outcome, config)
    if key[2] != Recipient.Status.PENDING:
        return None
    held = HeldVerdict(message, outcome, config, key, now, pending)
    if not held.fresh():
        return None
    _outcome_to_message(message, outcome, [key], config, now)
    values = _recipient_values(*key, now)
    for recipient in pending:  # claimed for the delivery, in memory: the scan's claim covers them
        for name, value in values.items():
            setattr(recipient, name, value)
    return held


@dataclass
class HeldVerdict:
    """A scan's outcome not yet written, for a delivery that follows at once under the scan's claim.

    When that delivery's one SMTP transaction takes every recipient (nearly every message), the verdict,
    the recipients' outcome and the message's final state go in one statement (`write_delivered`): one
    write per message fewer than the verdict, then the outcome. Any other course (a refusal, a deferral,
    several destinations, a pass long enough for the scan's claim to near staleness) writes the verdict
    first (`write`, the statement of apply_verdict, which claims the recipients under the timestamp they
    already carry), then records each outcome as usual. A worker that dies between the SMTP transaction
    and the write leaves the message claimed for its scan; the sweeper hands it back when the claim is
    stale and it is scanned and delivered again, as when a worker dies between a delivery and its record.
    """

    message: Message
    outcome: ScanOutcome
    config: MailFlowSettings
    key: Key
    now: datetime.datetime
    recipients: list[Recipient]
    tried: bool = False  # write() was called before

    def fresh(self) -> bool:
        """Whether the scan's claim is young enough to carry on under it."""
        return far_from_stale(self.message.claimed_at or self.now)

    def write(self) -> Applied | None:
        """The verdict, its recipients claimed for this delivery; None when the scan's claim was lost.

        Called again after a connection lost mid-statement (gateway.delivery.record.retrying), it first looks
        whether the earlier call was committed: the verdict's timestamp is this scan's own."""
        if self.tried and Message.objects.filter(pk=self.message.pk, scanned_at=self.now).exists():
            return Applied(True)
        self.tried = True
        result = _in_one_statement(self.message, self.outcome, self.config, {self.key: None}, self.now)
        if result is not None:
            _log_verdict(self.message, self._decided())
        return result

    def write_delivered(self, values: dict, ids: list[int], completed_at: datetime.datetime) -> int | None:
        """The verdict, the message delivered, and these recipients' outcome (`values`), in one statement
        under the scan's claim: how many recipients it recorded, None when the claim was lost (nothing
        written)."""
        message = self.message
        fields = {**_verdict_fields(message), "state": Message.State.DELIVERED, "completed_at": completed_at}
        verdict, action, _, policy = self.key
        count = statements.write_verdict_delivered(message.pk, message.claimed_at, fields, verdict, action,
                                                   policy.label, policy.spam_threshold, values, ids)
        if not count and not statements.verdict_written(message.pk, Message.State.DELIVERED, self.now):
            return None
        message.state, message.completed_at = Message.State.DELIVERED, completed_at
        _log_verdict(message, self._decided())
        return count

    def _decided(self) -> list[Decided]:
        verdict, action, _, policy = self.key
        return [(recipient.address, verdict, action, policy.label) for recipient in self.recipients]


def _recipient_values(verdict: str, action: str, status: str, policy: spampolicy.SpamPolicy, now) -> dict:
    """A group's verdict and the policy that decided; the recipients to deliver are claimed for the caller in
    the same write."""
    decided = {"verdict": verdict, "action": action, "policy": policy.label, "spam_threshold": policy.spam_threshold}
    if status == Recipient.Status.PENDING:
        return {**decided, "status": Recipient.Status.DELIVERING, "claimed_at": now, "next_attempt_at": now}
    return {**decided, "status": status, "next_attempt_at": None}


def _verdict_fields(message: Message) -> dict:
    return {name: getattr(message, name) for name in statements.VERDICT_FIELDS}


def _in_one_statement(message: Message, outcome: ScanOutcome, config: MailFlowSettings, groups: Groups,
                      now) -> Applied | None:
    """PostgreSQL, one group: the message's verdict under the claim and its pending recipients', both or
    neither, in one statement and one commit, without a transaction block (BEGIN and COMMIT are round
    trips of their own)."""
    ((key, _),) = groups.items()
    count, claimed = statements.write_verdict_and_group(message.pk, message.claimed_at, _verdict_fields(message),
                                                        _recipient_values(*key, now))
    if count:
        return Applied(bool(claimed), claimed or None)
    # No recipient row changed: the claim was lost (nothing written), or none was pending (written).
    if not statements.verdict_written(message.pk, message.state, now):
        return None
    with transaction.atomic():
        return _no_recipient_pending(message, outcome, config, now)


@transaction.atomic
def _in_a_transaction(message: Message, outcome: ScanOutcome, config: MailFlowSettings, groups: Groups,
                      now) -> Applied | None:
    """Elsewhere (SQLite), with several groups, or for the delete action: the message, then each group."""
    if not statements.write_verdict(message.pk, message.claimed_at, _verdict_fields(message)):
        return None
    count, claimed = 0, []
    for key, ids in groups.items():
        changed, mine = statements.write_group(message.pk, _recipient_values(*key, now), ids)
        count, claimed = count + changed, claimed + mine
    if not count:
        return _no_recipient_pending(message, outcome, config, now)
    _discard_if_deleted(message)
    return Applied(bool(claimed), claimed or None)


def _no_recipient_pending(message: Message, outcome: ScanOutcome, config: MailFlowSettings, now) -> Applied:
    """No recipient was pending: nothing to deliver or hold (the message was all but empty)."""
    _outcome_to_message(message, outcome, (), config, now)
    statements.write_verdict_unclaimed(message.pk, _verdict_fields(message))
    _discard_if_deleted(message)
    return Applied(False)


def _discard_if_deleted(message: Message) -> None:
    if message.state == Message.State.DELETED:
        # The "delete" action discards the mail; its log entry stays.
        RawMessage.objects.filter(message=message).delete()
