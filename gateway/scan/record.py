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

from gateway.claims import far_from_stale
from gateway.db import rowsql
from gateway.models import Action, MailFlowSettings, Message, RawMessage, Recipient, Verdict
from gateway.policy.lists import lists_are_empty

from .verdict import Groups, ScanOutcome, verdict_for_all, verdicts_after_lists, worst

log = logging.getLogger(__name__)


MESSAGE_VERDICT_FIELDS = ("verdict", "action", "spam_score", "spam_threshold", "spam_rules", "virus_names",
                          "attachments", "scan_notes", "checks", "scanned_at", "last_error", "next_attempt_at",
                          "quarantined", "state", "completed_at")


def _outcome_to_message(message: Message, outcome: ScanOutcome, groups: Iterable[tuple[str, str, str]],
                        config: MailFlowSettings, now) -> None:
    """Set the message's scan fields from its recipients' (verdict, action, status) groups."""
    verdicts, actions, statuses = (set(column) for column in zip(*groups, strict=True)) if groups else (set(),) * 3
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
    """What apply_verdict wrote: whether recipients are due for delivery, and those it claimed for the
    caller's delivery (status delivering under the scan's timestamp)."""

    deliver: bool
    claimed: list[Recipient] | None = None


def apply_verdict(message: Message, outcome: ScanOutcome, config: MailFlowSettings) -> Applied | None:
    """Write the scan's outcome: per-recipient verdict and action, and the message's state.

    Returns what is now due for delivery, its recipients already claimed for the caller, who delivers at
    once (should the caller die first, the sweeper hands the stale claim back, as for a delivery that died
    on the way); None when this scan's claim is no longer held (it went stale and another worker took the
    message). The message row is written (and locked) first, under the claim, then the recipients: the
    same order as every other writer of both, and nothing is written when the claim is lost.
    """
    now = timezone.now()
    if lists_are_empty():
        # No allow/block entry exists, so every pending recipient gets the scan's own verdict: one UPDATE
        # for all of them, without reading them (the path of nearly every message).
        groups: Groups = {verdict_for_all(outcome, config): None}
    else:
        groups = verdicts_after_lists(message, outcome, config)
    _outcome_to_message(message, outcome, groups, config, now)
    if len(groups) == 1 and message.state != Message.State.DELETED and rowsql.writes_in_one_statement():
        result = _in_one_statement(message, outcome, config, groups, now)
    else:
        result = _in_a_transaction(message, outcome, config, groups, now)
    if result is not None:
        _log_verdict(message)
    return result


def _log_verdict(message: Message) -> None:
    log.info("scanned %s: verdict=%s action=%s score=%s viruses=%s", message.queue_id, message.verdict,
             message.action, message.spam_score, ",".join(message.virus_names) or "-")


def hold_verdict(message: Message, outcome: ScanOutcome, config: MailFlowSettings,
                 pending: list[Recipient] | None) -> HeldVerdict | None:
    """The verdict held back for the delivery that follows, when the path allows it (see HeldVerdict):
    PostgreSQL, no allow/block entry (one verdict for every pending recipient), an action that delivers,
    recipients pending, and a scan claim far from stale. None: apply_verdict() writes it now."""
    if not pending or not rowsql.writes_in_one_statement() or not lists_are_empty():
        return None
    now = timezone.now()
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
    key: tuple[str, str, str]
    now: datetime.datetime
    recipients: list[Recipient]
    tried: bool = False  # write() was called before

    def fresh(self) -> bool:
        """Whether the scan's claim is young enough to carry on under it."""
        return far_from_stale(self.message.claimed_at or self.now)

    def write(self) -> Applied | None:
        """The verdict, its recipients claimed for this delivery; None when the scan's claim was lost.

        Called again after a connection lost mid-statement (delivery._recorded), it first looks whether the
        earlier call was committed: the verdict's timestamp is this scan's own."""
        if self.tried and Message.objects.filter(pk=self.message.pk, scanned_at=self.now).exists():
            return Applied(True)
        self.tried = True
        result = _in_one_statement(self.message, self.outcome, self.config, {self.key: None}, self.now)
        if result is not None:
            _log_verdict(self.message)
        return result

    def write_delivered(self, values: dict, ids: list[int], completed_at: datetime.datetime) -> int | None:
        """The verdict, the message delivered, and these recipients' outcome (`values`), in one statement
        under the scan's claim: how many recipients it recorded, None when the claim was lost (nothing
        written)."""
        message = self.message
        fields = {**_verdict_fields(message), "state": Message.State.DELIVERED, "completed_at": completed_at}
        sql, params = rowsql.update_sql(Message, fields, *_claim_check(message), returning=rowsql.column(Message, "id"))
        recipients = rowsql.table(Recipient)
        where = (f"{recipients}.{rowsql.column(Recipient, 'message')} = scanned.{rowsql.column(Message, 'id')} "
                 f"AND {rowsql.state_is(Recipient, 'status')} "
                 f"AND {recipients}.{rowsql.column(Recipient, 'id')} IN ({', '.join(['%s'] * len(ids))})")
        count = rowsql.update(Recipient, {"verdict": self.key[0], "action": self.key[1], **values}, where,
                              [Recipient.Status.PENDING, *ids], with_=rowsql.With("scanned", sql, params))
        if not count and not Message.objects.filter(pk=message.pk, state=Message.State.DELIVERED,
                                                    scanned_at=self.now).exists():
            return None
        message.state, message.completed_at = Message.State.DELIVERED, completed_at
        _log_verdict(message)
        return count


def _recipient_values(verdict: str, action: str, status: str, now) -> dict:
    """A group's verdict; the recipients to deliver are claimed for the caller in the same write."""
    if status == Recipient.Status.PENDING:
        return {"verdict": verdict, "action": action, "status": Recipient.Status.DELIVERING, "claimed_at": now,
                "next_attempt_at": now}
    return {"verdict": verdict, "action": action, "status": status, "next_attempt_at": None}


def _claim_check(message: Message) -> tuple[str, list]:
    return (f"{rowsql.column(Message, 'id')} = %s AND {rowsql.state_is(Message, 'state')} "
            f"AND {rowsql.column(Message, 'claimed_at')} = %s",
            [message.pk, Message.State.SCANNING, rowsql.value(Message, "claimed_at", message.claimed_at)])


def _verdict_fields(message: Message) -> dict:
    return {name: getattr(message, name) for name in MESSAGE_VERDICT_FIELDS}


def _write_group(message: Message, key: tuple[str, str, str], ids: list[int] | None, now, *,
                 with_: rowsql.With | None = None) -> tuple[int, list[Recipient]]:
    """One group's UPDATE: how many recipients it changed, and those it claimed for delivery."""
    values = _recipient_values(*key, now)
    if with_ is not None:
        # Joined to the message's UPDATE: no recipient changes unless the message did.
        where = (f"{rowsql.table(Recipient)}.{rowsql.column(Recipient, 'message')} = {with_.name}."
                 f"{rowsql.column(Message, 'id')} AND {rowsql.state_is(Recipient, 'status')}")
        params: list = [Recipient.Status.PENDING]
    else:
        where, params = _pending_of(message, ids)
    if values["status"] != Recipient.Status.DELIVERING:
        return rowsql.update(Recipient, values, where, params, with_=with_), []
    rows = rowsql.update_returning(Recipient, values, where, params, with_=with_)
    return len(rows), sorted((r for r, _ in rows), key=lambda r: r.pk)


def _in_one_statement(message: Message, outcome: ScanOutcome, config: MailFlowSettings, groups: Groups,
                      now) -> Applied | None:
    """PostgreSQL, one group: the message's UPDATE under the claim as a WITH, its pending recipients' UPDATE
    joined to it: both or neither, in one statement and one commit, without a transaction block (BEGIN
    and COMMIT are round trips of their own)."""
    ((key, ids),) = groups.items()
    sql, params = rowsql.update_sql(Message, _verdict_fields(message), *_claim_check(message),
                                    returning=rowsql.column(Message, "id"))
    count, claimed = _write_group(message, key, ids, now, with_=rowsql.With("scanned", sql, params))
    if count:
        return Applied(bool(claimed), claimed or None)
    # No recipient row changed: the claim was lost (nothing written), or none was pending (written).
    if not Message.objects.filter(pk=message.pk, state=message.state, scanned_at=now).exists():
        return None
    with transaction.atomic():
        return _no_recipient_pending(message, outcome, config, now)


@transaction.atomic
def _in_a_transaction(message: Message, outcome: ScanOutcome, config: MailFlowSettings, groups: Groups,
                      now) -> Applied | None:
    """Elsewhere (SQLite), with several groups, or for the delete action: the message, then each group."""
    if not rowsql.update(Message, _verdict_fields(message), *_claim_check(message)):
        return None
    count, claimed = 0, []
    for key, ids in groups.items():
        changed, mine = _write_group(message, key, ids, now)
        count, claimed = count + changed, claimed + mine
    if not count:
        return _no_recipient_pending(message, outcome, config, now)
    _discard_if_deleted(message)
    return Applied(bool(claimed), claimed or None)


def _no_recipient_pending(message: Message, outcome: ScanOutcome, config: MailFlowSettings, now) -> Applied:
    """No recipient was pending: nothing to deliver or hold (the message was all but empty)."""
    _outcome_to_message(message, outcome, (), config, now)
    rowsql.update(Message, _verdict_fields(message), f"{rowsql.column(Message, 'id')} = %s", [message.pk])
    _discard_if_deleted(message)
    return Applied(False)


def _discard_if_deleted(message: Message) -> None:
    if message.state == Message.State.DELETED:
        # The "delete" action discards the mail; its log entry stays.
        RawMessage.objects.filter(message=message).delete()
