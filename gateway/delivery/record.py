"""Recording what one delivery pass did: each recipient's outcome, under its claim, and at the end the
message's state, the DSN of what failed and the next try of what was deferred.

A pass that follows a scan may carry the scan's verdict still to be written (a `HeldVerdict`): it is
written with the first outcome, or, when one SMTP transaction took every recipient, together with all the
outcomes and the message's final state in one statement. Should the scan's claim be lost before that (the
sweeper gave the message to another worker), this pass records nothing.
"""

from __future__ import annotations

import datetime
import enum
import logging
import time
from collections import defaultdict
from datetime import timedelta
from typing import Any, Protocol

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from gateway import maillog, metrics
from gateway.claims import backoff
from gateway.db import statements
from gateway.dispatch import enqueue
from gateway.models import MailFlowSettings, Message, Recipient

from . import dsn

log = logging.getLogger(__name__)


class HeldVerdict(Protocol):
    """A scan's verdict not yet written, for the delivery that follows at once under the scan's claim
    (gateway.scan.record.HeldVerdict)."""

    recipients: list[Recipient]

    def fresh(self) -> bool:
        """Whether the scan's claim is young enough to carry on under it."""

    def write(self) -> Any:
        """The verdict, its recipients claimed for this delivery; None when the scan's claim was lost."""

    def write_delivered(self, values: dict, ids: list[int], completed_at: datetime.datetime) -> int | None:
        """The verdict and these recipients' outcome in one statement: how many it recorded, None when the
        scan's claim was lost."""


class Verdict(enum.Enum):
    """Where the scan's verdict stands for this pass."""

    WRITTEN = "written"  # before the pass (or there was none to carry)
    HELD = "held"  # still to be written, with the first outcome
    LOST = "lost"  # the scan's claim was lost before it was written: this pass records nothing


class Recorder:
    """The record of one pass over a message's recipients."""

    def __init__(self, message: Message, config: MailFlowSettings, started: datetime.datetime, *,
                 recipient_count: int | None = None, held: HeldVerdict | None = None):
        self.message = message
        self.config = config
        self.started = started  # the pass's claim token, for recipients claimed without their own
        # How many recipients the message has, when the caller knows (the scan just counted them): when the
        # pass claims them all, the message's state follows from what the pass recorded, without a read.
        self.recipient_count = recipient_count
        self.held = held
        self.verdict = Verdict.HELD if held is not None else Verdict.WRITTEN
        self.claimed = 0  # recipients this pass claimed
        self.outcomes = 0  # outcomes recorded so far
        self.final_state_written = False

    @property
    def lost(self) -> bool:
        return self.verdict is Verdict.LOST

    def keep_claim_fresh(self) -> bool:
        """Before a connection: a held verdict whose scan claim nears staleness is written now. False when
        its claim was lost meanwhile (another worker has the message: this group is not sent)."""
        if self.verdict is Verdict.HELD and not self.held.fresh():
            return self._write_held()
        return True

    def _write_held(self) -> bool:
        """Write the held verdict, this pass's recipients claimed with it; False when the scan's claim was
        lost meanwhile."""
        self.verdict = Verdict.WRITTEN
        if retrying(self.message, self.held.write) is None:
            self._claim_lost()
            return False
        return True

    def _claim_lost(self) -> None:
        self.verdict = Verdict.LOST
        log.warning("%s: the scan's claim was lost during its delivery; its outcome is not recorded",
                    self.message.queue_id)

    def outcome(self, recipients: list[Recipient], code: int, text: str, *, permanent: bool = False,
                delivered: bool = False, destination=None, tried=None) -> None:
        """The reply these recipients got: delivered, bounced (permanent, or expired in the queue), or
        deferred for a retry with back-off. `destination`: the server that answered (its name is added to
        the text); `tried`: the one last tried, when none answered."""
        if not text.startswith(str(code)):
            text = f"{code} {text}"
        said = text
        where = destination if destination is not None else tried
        relay_to = maillog.relay(where.host, where.port) if where is not None else ""
        if destination is not None:
            text = f"{text} (from {destination})"
        now = timezone.now()
        expired = now - self.message.received_at > self.config.queue_lifetime
        groups: dict[tuple, list[Recipient]] = defaultdict(list)
        for recipient in recipients:
            held = recipient.claimed_at or self.started
            recipient.reply_code, recipient.reply_text = code, text
            recipient.attempts += 1
            recipient.claimed_at = None
            if delivered:
                recipient.status, recipient.delivered_at, recipient.next_attempt_at = (
                    Recipient.Status.DELIVERED, now, None)
            elif permanent:
                recipient.status, recipient.next_attempt_at = Recipient.Status.BOUNCED, None
            elif expired:
                recipient.status, recipient.next_attempt_at = Recipient.Status.EXPIRED, None
            else:
                delay = backoff(recipient.attempts, settings.DELIVERY_RETRY_BASE, settings.DELIVERY_RETRY_MAX)
                recipient.status, recipient.next_attempt_at = Recipient.Status.DEFERRED, now + timedelta(seconds=delay)
            metrics.count("mailgate_deliveries", outcome=recipient.status)
            if delivered:
                metrics.observe("mailgate_delivery_seconds", (now - self.message.received_at).total_seconds())
            groups[(held, recipient.status, recipient.attempts, recipient.delivered_at,
                    recipient.next_attempt_at)].append(recipient)
            log.info("%s to <%s>: %s (%s)", self.message.queue_id, recipient.address, recipient.status, text)
            maillog.delivery(self.message.queue_id, recipient=recipient.address, relay_to=relay_to,
                             delay=(now - self.message.received_at).total_seconds(), code=code, text=said,
                             status=_postfix_status(recipient.status))
        # One UPDATE per outcome shared by several recipients (one for a one-recipient message), and only
        # while the claim is still ours: never overwrite what another worker recorded. When this one SMTP
        # transaction delivered every recipient of the message, the message's final state goes with it.
        completes = (delivered and len(groups) == 1 and not self.outcomes and self.recipient_count is not None
                     and len(recipients) == self.claimed == self.recipient_count)
        self.outcomes += 1
        if self.lost or (self.verdict is Verdict.HELD and not completes and not self._write_held()):
            return
        for (held, status, attempts, delivered_at, next_attempt_at), group in groups.items():
            ids = [r.pk for r in group]
            values = {"status": status, "reply_code": code, "reply_text": text, "attempts": attempts,
                      "claimed_at": None, "delivered_at": delivered_at, "next_attempt_at": next_attempt_at}
            if completes and self.verdict is Verdict.HELD:
                self.final_state_written = self._with_verdict(values, ids, now)
            elif completes:
                final = _state_from([Recipient.Status.DELIVERED], self.message.state)
                self.final_state_written = retrying(
                    self.message, statements.write_outcome_and_final_state, ids, held, values, self.message.pk,
                    self.message.state, final, now)
            else:
                retrying(self.message, statements.write_outcome, ids, held, values)

    def _with_verdict(self, values: dict, ids: list[int], now) -> bool:
        """The held verdict with every recipient's outcome and the message's final state, in one statement.
        True when all of it was written (or nothing, the claim being lost); False when some recipient was
        not recorded (no longer pending), so that `end` reads them back."""
        self.verdict = Verdict.WRITTEN
        written = retrying(self.message, self.held.write_delivered, values, ids, now)
        if written is None:
            self._claim_lost()
            return True
        return written == len(ids)

    def end(self) -> None:
        """The message's state from all its recipients, a DSN for what failed, the next try of what waits."""
        if self.final_state_written or self.lost:
            return
        message = self.message
        statuses = list(message.recipients.values_list("status", flat=True))
        failures = {Recipient.Status.BOUNCED, Recipient.Status.EXPIRED}
        with transaction.atomic():
            failed = list(message.recipients.select_for_update().filter(
                status__in=failures, dsn_sent=False)) if failures & set(statuses) else []
            if failed:
                notice = dsn.send_failure_notice(message, failed)
                if notice is not None:
                    maillog.notice(message.queue_id, notice.queue_id)
                Recipient.objects.filter(pk__in=[r.pk for r in failed]).update(dsn_sent=True)
            state = _state_from(statuses, message.state)
            fields = {"state": state}
            if state in (Message.State.DELIVERED, Message.State.PARTIAL, Message.State.BOUNCED):
                fields["completed_at"] = timezone.now()
            # Never overwrite a state someone else set meanwhile (quarantine, release).
            Message.objects.filter(pk=message.pk, state=message.state).update(**fields)
        waiting = message.recipients.filter(status=Recipient.Status.DEFERRED).order_by("next_attempt_at").first() \
            if Recipient.Status.DEFERRED in statuses else None
        if waiting is not None:
            delay = max(1.0, (waiting.next_attempt_at - timezone.now()).total_seconds())
            enqueue.delivery(message.pk, countdown=delay)


def retrying(message: Message, write, *args) -> Any:
    """A write that records what an SMTP transaction did, run again for a while (a quarter of
    STALE_CLAIM_SECONDS) when the database does not answer: the mail went, and a delivery left unrecorded
    is sent again once its claim is stale."""
    deadline = time.monotonic() + settings.STALE_CLAIM_SECONDS / 4
    attempt = 0
    while True:
        try:
            return write(*args)
        except (OperationalError, InterfaceError) as exc:
            attempt += 1
            delay = backoff(attempt, 1, 30)
            if connection.in_atomic_block or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: recording its delivery failed (%s); trying again in %s s", message.queue_id,
                        str(exc).strip() or exc.__class__.__name__, delay)
            connection.close()  # the next attempt opens a new one
            time.sleep(delay)


def state_from(statuses: list[str], current: str) -> str:
    """The message's state from its recipients' statuses (also for the mail queue's actions)."""
    return _state_from(statuses, current)
def _postfix_status(status: str) -> str:
    """Postfix's word for a recipient's outcome: sent, deferred, bounced, expired."""
    return {Recipient.Status.DELIVERED: "sent", Recipient.Status.BOUNCED: "bounced",
            Recipient.Status.EXPIRED: "expired"}.get(status, "deferred")


def _state_from(statuses: list[str], current: str) -> str:
    s = set(statuses)
    if Recipient.Status.QUARANTINED in s:
        return Message.State.QUARANTINED
    busy = {Recipient.Status.PENDING, Recipient.Status.DEFERRED, Recipient.Status.DELIVERING, Recipient.Status.HELD}
    if s & busy:
        return current if current == Message.State.RELEASED else Message.State.DELIVERING
    failed = {Recipient.Status.BOUNCED, Recipient.Status.EXPIRED}
    if Recipient.Status.DELIVERED in s:
        if s & failed:
            return Message.State.PARTIAL
        return Message.State.RELEASED if current == Message.State.RELEASED else Message.State.DELIVERED
    if s & failed:
        return Message.State.BOUNCED
    return Message.State.DELETED if s <= {Recipient.Status.DELETED} else current
