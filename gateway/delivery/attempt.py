"""Delivery: relay a message to the mail server of each recipient's domain.

Each recipient is claimed before its attempt (status pending/deferred/released → delivering), so a
retried or duplicated task never delivers twice. Per recipient the downstream's reply is kept;
4xx and connection failures are retried with exponential back-off until the queue lifetime ends,
5xx (or the end of the queue lifetime) bounce, with a DSN to the envelope sender.
"""

from __future__ import annotations

import datetime
import logging
import smtplib
import ssl
import time
from collections import defaultdict
from datetime import timedelta
from typing import Any, Protocol

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from gateway.claims import backoff, far_from_stale
from gateway.db import rowsql
from gateway.dispatch import enqueue
from gateway.mailauth.dns import TemporaryDNSError
from gateway.models import Action, MailFlowSettings, Message, RawMessage, Recipient

from . import client, content, dsn
from .routing import Destination, NoRoute, active_routes, destination_for

log = logging.getLogger(__name__)


class HeldVerdict(Protocol):
    """A scan's verdict not yet written, for the delivery that follows at once under the scan's claim
    (gateway.scan.record.HeldVerdict): written with the first outcome, or with every outcome at once."""

    recipients: list[Recipient]

    def fresh(self) -> bool:
        """Whether the scan's claim is young enough to carry on under it."""

    def write(self) -> Any:
        """The verdict, its recipients claimed for this delivery; None when the scan's claim was lost."""

    def write_delivered(self, values: dict, ids: list[int], completed_at: datetime.datetime) -> int | None:
        """The verdict and these recipients' outcome in one statement: how many it recorded, None when the
        scan's claim was lost."""


DUE_STATUSES = [Recipient.Status.PENDING, Recipient.Status.DEFERRED]


class DeliveryAttempt:
    """One pass over the due recipients of one message."""

    def __init__(self, message: Message, raw: bytes | None = None, recipient_count: int | None = None,
                 claimed: list[Recipient] | None = None, held: HeldVerdict | None = None):
        self.message = message
        self.raw = raw
        # How many recipients the message has, when the caller knows (the scan just counted them): when this
        # pass claims them all, the message's state follows from what the pass recorded, without a read.
        self.recipient_count = recipient_count
        self.config = MailFlowSettings.cached()
        self.now = timezone.now()
        # Recipients the caller already claimed for this pass (the scan, in the UPDATE of their verdict).
        self.preclaimed = held.recipients if held is not None else claimed
        # The scan's verdict, when it is still to be written (with the first outcome; pipeline.HeldVerdict).
        self.held = held
        self.lost = False  # the scan's claim was lost before the verdict was written: nothing is recorded
        self.claimed: list[Recipient] = []
        self.finished_any = False  # an outcome was recorded already in this pass
        self.message_done = False  # the message's final state was written with the last outcome

    def claim(self) -> list[Recipient]:
        """The due recipients, claimed (→ delivering, the claim token being this pass's timestamp) and read in
        one statement: only the rows this very statement moved come back."""
        next_attempt = rowsql.column(Recipient, "next_attempt_at")
        rows = rowsql.update_returning(
            Recipient, {"status": Recipient.Status.DELIVERING, "claimed_at": self.now},
            f"{rowsql.column(Recipient, 'message')} = %s AND {rowsql.state_is(Recipient, 'status', 2)} "
            f"AND ({next_attempt} IS NULL OR {next_attempt} <= %s)",
            [self.message.pk, *DUE_STATUSES, rowsql.value(Recipient, "next_attempt_at", self.now)])
        self.claimed = sorted((recipient for recipient, _ in rows), key=lambda r: r.pk)
        return self.claimed

    def run(self) -> None:
        if self.preclaimed is not None:
            self.claimed = recipients = self.preclaimed
        else:
            recipients = self.claim()
        if not recipients:
            return
        raw = self.raw
        if raw is None:
            raw = RawMessage.objects.filter(message=self.message).values_list("data", flat=True).first()
        if raw is None:
            self._finish(recipients, 554, "5.3.0 the stored message is gone", permanent=True)
            return
        raw = bytes(raw)
        routes = active_routes()
        # One SMTP transaction per destination and per variant of the content (tagged or not, verdict header).
        groups: dict[tuple, list[Recipient]] = defaultdict(list)
        for recipient in recipients:
            try:
                destinations = tuple(destination_for(recipient.domain, self.config, routes))
            except NoRoute as exc:
                self._finish([recipient], 550, f"5.1.2 {exc}", permanent=True)
                continue
            except TemporaryDNSError as exc:
                self._finish([recipient], 451, f"4.4.3 DNS lookup of {recipient.domain} failed: {exc}")
                continue
            tagged = recipient.action == Action.TAG and not recipient.released
            groups[(destinations, tagged, recipient.verdict)].append(recipient)
        raw = content.without_foreign_authentication_results(raw)
        for (destinations, tagged, verdict), group in groups.items():
            try:
                data = content.outgoing(self.message, raw, verdict, tagged=tagged, prefix=self.config.subject_prefix)
                self._send(destinations, group, data)
            except Exception:
                # A bug or an odd input must not leave recipients claimed for ever: defer them, so that
                # retries and the queue lifetime (then a DSN) still apply.
                log.exception("delivery of %s failed unexpectedly", self.message.queue_id)
                self._finish([r for r in group if r.status == Recipient.Status.DELIVERING], 451,
                             "4.3.0 local error while delivering")
        self._update_message()

    def _write_held(self) -> bool:
        """Write the held verdict, this pass's recipients claimed with it; False when the scan's claim was
        lost meanwhile (another worker has the message: this pass records nothing)."""
        held, self.held = self.held, None
        if _recorded(self.message, held.write) is None:
            self._claim_lost()
            return False
        return True

    def _claim_lost(self) -> None:
        self.lost = True
        log.warning("%s: the scan's claim was lost during its delivery; its outcome is not recorded",
                    self.message.queue_id)

    def _send(self, destinations: tuple[Destination, ...], group: list[Recipient], data: bytes) -> None:
        code, text, permanent = 451, "4.4.1 no destination could be tried", False
        for destination in destinations:
            if self.held is not None and not self.held.fresh() and not self._write_held():
                return
            unfinished = self._reclaim([r for r in group if r.status == Recipient.Status.DELIVERING])
            if not unfinished:
                return
            try:
                self._send_to(destination, unfinished, data)
                return
            except UnicodeEncodeError:
                # A non-ASCII address the destination cannot take (no SMTPUTF8 in this transaction).
                self._finish(unfinished, 553, "5.6.7 a non-ASCII address needs SMTPUTF8", permanent=True)
                return
            except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
                # A refused connection, a timeout, a dropped session: try the next MX host, else defer.
                # Only a 5xx the server itself answered (to the greeting or DATA) is permanent.
                code = getattr(exc, "smtp_code", 0) or 451
                permanent = isinstance(exc, smtplib.SMTPResponseException) and 500 <= code < 600
                if not 400 <= code < 600:
                    code = 451
                detail = getattr(exc, "smtp_error", b"") or str(exc) or exc.__class__.__name__
                text = f"{client.reply_text(code, detail)} (from {destination})"
                log.warning("delivery of %s to %s failed: %s", self.message.queue_id, destination, text)
                if permanent:
                    break
        self._finish([r for r in group if r.status == Recipient.Status.DELIVERING], code, text, permanent=permanent)

    def _reclaim(self, group: list[Recipient]) -> list[Recipient]:
        """Renew the claim on these recipients just before a connection: a pass that ran so long that the
        sweeper handed them to another worker must not send them again."""
        if not group:
            return []
        fresh = timezone.now()
        held = group[0].claimed_at or self.now
        if far_from_stale(held, fresh):
            return group  # the sweeper cannot have handed it on yet
        ids = [r.pk for r in group]
        Recipient.objects.filter(pk__in=ids, status=Recipient.Status.DELIVERING, claimed_at=held).update(
            claimed_at=fresh)
        mine = set(Recipient.objects.filter(pk__in=ids, status=Recipient.Status.DELIVERING, claimed_at=fresh)
                   .values_list("pk", flat=True))
        for recipient in group:
            if recipient.pk in mine:
                recipient.claimed_at = fresh
            else:
                recipient.status = "lost"  # another worker has it now: leave it alone
        return [r for r in group if r.pk in mine]

    def _send_to(self, destination: Destination, group: list[Recipient], data: bytes) -> None:
        client.send(self.message, destination, group, data, self._finish)

    def _finish(self, recipients: list[Recipient], code: int, text: str, *, permanent: bool = False,
                delivered: bool = False, destination: Destination | None = None) -> None:
        if not text.startswith(str(code)):
            text = f"{code} {text}"
        if destination is not None:
            text = f"{text} (from {destination})"
        now = timezone.now()
        expired = now - self.message.received_at > self.config.queue_lifetime
        groups: dict[tuple, list[Recipient]] = defaultdict(list)
        for recipient in recipients:
            held = recipient.claimed_at or self.now
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
            groups[(held, recipient.status, recipient.attempts, recipient.delivered_at,
                    recipient.next_attempt_at)].append(recipient)
            log.info("%s to <%s>: %s (%s)", self.message.queue_id, recipient.address, recipient.status, text)
        # One UPDATE per outcome shared by several recipients (one for a one-recipient message), and only
        # while the claim is still ours: never overwrite what another worker recorded. When this one SMTP
        # transaction delivered every recipient of the message, the message's final state goes with it.
        completes = (delivered and len(groups) == 1 and not self.finished_any and self.recipient_count is not None
                     and len(recipients) == len(self.claimed) == self.recipient_count)
        self.finished_any = True
        if self.lost or (self.held is not None and not completes and not self._write_held()):
            return
        for (held, status, attempts, delivered_at, next_attempt_at), group in groups.items():
            ids = [r.pk for r in group]
            values = {"status": status, "reply_code": code, "reply_text": text, "attempts": attempts,
                      "claimed_at": None, "delivered_at": delivered_at, "next_attempt_at": next_attempt_at}
            where = (f"{rowsql.column(Recipient, 'id')} IN ({', '.join(['%s'] * len(ids))}) "
                     f"AND {rowsql.state_is(Recipient, 'status')} AND {rowsql.column(Recipient, 'claimed_at')} = %s")
            params = [*ids, Recipient.Status.DELIVERING, rowsql.value(Recipient, "claimed_at", held)]
            if completes and self.held is not None:
                self.message_done = self._record_with_verdict(values, ids, now)
            elif completes:
                self.message_done = _recorded(self.message, self._record_with_final_state, values, where, params,
                                              len(ids), now)
            else:
                _recorded(self.message, rowsql.update, Recipient, values, where, params)

    def _record_with_final_state(self, values: dict, where: str, params: list, count: int, now) -> bool:
        """The outcome of every recipient of the message and the message's final state, the state only if
        each outcome was written under its claim (else _update_message reads the recipients back): one
        statement (a WITH) on PostgreSQL, a transaction elsewhere. True when the state was written."""
        state = {"state": _state_from([Recipient.Status.DELIVERED], self.message.state), "completed_at": now}
        state_where = (f"{rowsql.table(Message)}.{rowsql.column(Message, 'id')} = %s "
                       f"AND {rowsql.state_is(Message, 'state')}")
        state_params = [self.message.pk, self.message.state]
        if rowsql.writes_in_one_statement():
            sql, sql_params = rowsql.update_sql(Recipient, values, where, params,
                                                returning=rowsql.column(Recipient, "id"))
            return bool(rowsql.update(Message, state, f"{state_where} AND (SELECT COUNT(*) FROM done) = %s",
                                      [*state_params, count], with_=rowsql.With("done", sql, sql_params)))
        with transaction.atomic():
            return (rowsql.update(Recipient, values, where, params) == count
                    and bool(rowsql.update(Message, state, state_where, state_params)))

    def _record_with_verdict(self, values: dict, ids: list[int], now) -> bool:
        """The held verdict with every recipient's outcome and the message's final state, in one statement.
        True when all of it was written (or nothing, the claim being lost); False when some recipient was
        not recorded (no longer pending), so that _update_message reads them back."""
        held, self.held = self.held, None
        written = _recorded(self.message, held.write_delivered, values, ids, now)
        if written is None:
            self._claim_lost()
            return True
        return written == len(ids)

    def _update_message(self) -> None:
        if self.message_done or self.lost:
            return
        statuses = list(self.message.recipients.values_list("status", flat=True))
        failures = {Recipient.Status.BOUNCED, Recipient.Status.EXPIRED}
        with transaction.atomic():
            failed = list(self.message.recipients.select_for_update().filter(
                status__in=failures, dsn_sent=False)) if failures & set(statuses) else []
            if failed:
                dsn.send_failure_notice(self.message, failed)
                Recipient.objects.filter(pk__in=[r.pk for r in failed]).update(dsn_sent=True)
            state = _state_from(statuses, self.message.state)
            fields = {"state": state}
            if state in (Message.State.DELIVERED, Message.State.PARTIAL, Message.State.BOUNCED):
                fields["completed_at"] = timezone.now()
            # Never overwrite a state someone else set meanwhile (quarantine, release).
            Message.objects.filter(pk=self.message.pk, state=self.message.state).update(**fields)
        waiting = self.message.recipients.filter(status=Recipient.Status.DEFERRED).order_by("next_attempt_at").first() \
            if Recipient.Status.DEFERRED in statuses else None
        if waiting is not None:
            delay = max(1.0, (waiting.next_attempt_at - timezone.now()).total_seconds())
            enqueue.delivery(self.message.pk, countdown=delay)


def _recorded(message: Message, write, *args) -> Any:
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


def _state_from(statuses: list[str], current: str) -> str:
    s = set(statuses)
    if Recipient.Status.QUARANTINED in s:
        return Message.State.QUARANTINED
    busy = {Recipient.Status.PENDING, Recipient.Status.DEFERRED, Recipient.Status.DELIVERING}
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


def deliver(message: Message, raw: bytes | None = None, *, recipient_count: int | None = None,
            claimed: list[Recipient] | None = None, held: HeldVerdict | None = None) -> None:
    DeliveryAttempt(message, raw, recipient_count, claimed, held).run()


def run_delivery(message_id: int) -> None:
    """The delivery task: one pass over the message's due recipients; quiet when the message is gone."""
    message = Message.objects.filter(pk=message_id).first()
    if message is not None:
        deliver(message)

