"""What an administrator does to the mail queue (`postqueue -f`, `postsuper -d/-h/-H`, a bounce): retry now,
bounce with a DSN, delete, hold and release the hold. From the /queue/ page and `manage.py queue` alike.

Each action takes recipients the caller may act for (gateway.mailqueue.listing.queued: `by=None` is the
command line, the machine's administrator) and works message by message, each in one transaction with
the message row locked and its recipients claimed by their status: a recipient a worker holds at that
moment (being scanned or delivered) is left alone and counted as skipped, and an action clicked twice acts
once. Every action writes its audit row; the work it makes due is enqueued on commit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from gateway.delivery import dsn
from gateway.delivery.record import state_from
from gateway.dispatch import enqueue
from gateway.models import ACTIVE_RECIPIENT_STATUSES, Message, RawMessage, Recipient, record_audit

from .listing import SCAN_STATES

RETRY, BOUNCE, DELETE, HOLD, RELEASE_HOLD = "retry", "bounce", "delete", "hold", "release-hold"
ACTIONS = (RETRY, BOUNCE, DELETE, HOLD, RELEASE_HOLD)
BOUNCE_TEXT = "5.0.0 returned to the sender by the mail administrator"

# Message states in which a worker holds the message: nothing of it is touched until it lets go.
_BUSY_STATES = (Message.State.SCANNING,)


@dataclass
class Outcome:
    action: str
    done: int = 0  # recipients acted on
    skipped: int = 0  # selected but not in a state this action applies to (or held by a worker)
    messages: set[str] = field(default_factory=set)
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def skip(self, count: int, reason: str) -> None:
        if count:
            self.skipped += count
            self.reasons[reason] += count

    def summary(self) -> str:
        verb = {RETRY: "retried", BOUNCE: "bounced", DELETE: "deleted", HOLD: "put on hold",
                RELEASE_HOLD: "released from hold"}[self.action]
        text = f"{self.done} recipient(s) of {len(self.messages)} message(s) {verb}"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items()))
        return text


def act(action: str, recipients: QuerySet[Recipient] | Iterable[Recipient], *, by=None,
        ip: str | None = None) -> Outcome:
    """Do `action` to these recipients (already limited to those the caller may act for)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown queue action {action!r}: one of {', '.join(ACTIONS)}")
    outcome = Outcome(action)
    chosen: dict[int, list[int]] = defaultdict(list)
    pairs = (recipients.values_list("message_id", "pk") if isinstance(recipients, QuerySet)
             else ((r.message_id, r.pk) for r in recipients))
    for message_id, pk in pairs:
        chosen[message_id].append(pk)
    for message_id, ids in sorted(chosen.items()):
        _act_on_message(action, message_id, ids, outcome, by=by, ip=ip)
    return outcome


@transaction.atomic
def _act_on_message(action: str, message_id: int, ids: list[int], outcome: Outcome, *, by, ip) -> None:
    message = Message.objects.select_for_update().filter(pk=message_id).first()
    if message is None:
        outcome.skip(len(ids), "gone")
        return
    if message.state in _BUSY_STATES:
        outcome.skip(len(ids), "being scanned")
        return
    in_scan = message.state in SCAN_STATES
    # The recipients, locked: a delivery claim waits for this transaction, then finds them changed.
    recipients = list(Recipient.objects.select_for_update().filter(pk__in=ids, message_id=message_id).order_by("id"))
    outcome.skip(len(ids) - len(recipients), "gone")
    busy = [r for r in recipients if r.status == Recipient.Status.DELIVERING]
    outcome.skip(len(busy), "being delivered")
    recipients = [r for r in recipients if r.status != Recipient.Status.DELIVERING]
    now = timezone.now()
    done: list[Recipient] = []
    if action == RETRY:
        held = [r for r in recipients if r.status == Recipient.Status.HELD]
        outcome.skip(len(held), "on hold (release the hold first)")
        done = [r for r in recipients if r.status in (Recipient.Status.PENDING, Recipient.Status.DEFERRED)]
        if done and in_scan:
            Message.objects.filter(pk=message.pk, state__in=SCAN_STATES).update(next_attempt_at=now)
            enqueue.scan(message.pk)
        elif done:
            Recipient.objects.filter(pk__in=[r.pk for r in done]).update(next_attempt_at=now)
            enqueue.delivery(message.pk)
    elif action == HOLD:
        if in_scan:
            outcome.skip(len(recipients), "waiting for the scan (hold it once scanned)")
        else:
            done = [r for r in recipients if r.status in (Recipient.Status.PENDING, Recipient.Status.DEFERRED)]
            outcome.skip(len(recipients) - len(done), "already on hold")
            Recipient.objects.filter(pk__in=[r.pk for r in done]).update(status=Recipient.Status.HELD)
    elif action == RELEASE_HOLD:
        done = [r for r in recipients if r.status == Recipient.Status.HELD]
        outcome.skip(len(recipients) - len(done), "not on hold")
        if done:
            Recipient.objects.filter(pk__in=[r.pk for r in done]).update(
                status=Recipient.Status.DEFERRED, next_attempt_at=now)
            enqueue.delivery(message.pk)
    elif action in (BOUNCE, DELETE):
        done = recipients
        if action == BOUNCE:
            for recipient in done:
                last = f" (the last attempt: {recipient.reply_text})" if recipient.reply_text else ""
                recipient.status, recipient.reply_code = Recipient.Status.BOUNCED, None
                recipient.reply_text = BOUNCE_TEXT + last
                recipient.next_attempt_at = None
            Recipient.objects.bulk_update(done, ["status", "reply_code", "reply_text", "next_attempt_at"])
            if done:
                dsn.send_failure_notice(message, done)
                Recipient.objects.filter(pk__in=[r.pk for r in done]).update(dsn_sent=True)
        else:
            Recipient.objects.filter(pk__in=[r.pk for r in done]).update(
                status=Recipient.Status.DELETED, next_attempt_at=None)
        if done:
            _settle(message, in_scan)
    if not done:
        return
    outcome.done += len(done)
    outcome.messages.add(message.queue_id)
    record_audit(f"queue_{action.replace('-', '_')}", user=by, ip=ip, message=message,
                 recipients=[r.address for r in done])


def _settle(message: Message, in_scan: bool) -> None:
    """The message's state after recipients left the queue. One still waiting for its scan keeps its state
    while any recipient waits with it (the scan goes on for them); its original goes once none is left on
    its way or held in the quarantine."""
    statuses = list(message.recipients.values_list("status", flat=True))
    if in_scan and Recipient.Status.PENDING in statuses:
        return
    state = state_from(statuses, Message.State.DELIVERING if in_scan else message.state)
    fields = {"state": state}
    if state in (Message.State.DELIVERED, Message.State.PARTIAL, Message.State.BOUNCED, Message.State.DELETED):
        fields["completed_at"] = timezone.now()
    Message.objects.filter(pk=message.pk, state=message.state).update(**fields)
    if not set(statuses) & {Recipient.Status.QUARANTINED, *ACTIVE_RECIPIENT_STATUSES}:
        RawMessage.objects.filter(message=message).delete()
