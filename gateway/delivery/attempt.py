"""A delivery pass: relay a message to the mail server of each recipient's domain.

Each recipient is claimed before its attempt (status pending/deferred/released → delivering), so a
retried or duplicated task never delivers twice. Per recipient the downstream's reply is kept;
4xx and connection failures are retried with exponential back-off until the queue lifetime ends,
5xx (or the end of the queue lifetime) bounce, with a DSN to the envelope sender.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from collections import defaultdict

from django.utils import timezone

from gateway.claims import far_from_stale
from gateway.db import statements
from gateway.mailauth.dns import TemporaryDNSError
from gateway.models import Action, MailFlowSettings, Message, RawMessage, Recipient

from . import client, content
from .record import HeldVerdict, Recorder
from .routing import Destination, NoRoute, active_routes, destination_for

log = logging.getLogger(__name__)


class DeliveryAttempt:
    """One pass over the due recipients of one message: claim them, group them by destination and content,
    send each group, and leave the record of each outcome to the pass's `Recorder`."""

    def __init__(self, message: Message, raw: bytes | None = None, recipient_count: int | None = None,
                 claimed: list[Recipient] | None = None, held: HeldVerdict | None = None):
        self.message = message
        self.raw = raw
        self.config = MailFlowSettings.cached()
        self.now = timezone.now()
        # Recipients the caller already claimed for this pass (the scan, in the UPDATE of their verdict).
        self.preclaimed = held.recipients if held is not None else claimed
        self.record = Recorder(message, self.config, self.now, recipient_count=recipient_count, held=held)

    def claim(self) -> list[Recipient]:
        """The due recipients, claimed (→ delivering, the claim token being this pass's timestamp) and read in
        one statement: only the rows this very statement moved come back."""
        return statements.claim_delivery(self.message.pk, self.now)

    def run(self) -> None:
        recipients = self.preclaimed if self.preclaimed is not None else self.claim()
        self.record.claimed = len(recipients)
        if not recipients:
            return
        raw = self.raw
        if raw is None:
            raw = RawMessage.objects.filter(message=self.message).values_list("data", flat=True).first()
        if raw is None:
            self.record.outcome(recipients, 554, "5.3.0 the stored message is gone", permanent=True)
            return
        raw = bytes(raw)
        routes = active_routes()
        # One SMTP transaction per destination and per variant of the content (tagged or not, the verdict and
        # the spam threshold of the scan headers).
        groups: dict[tuple, list[Recipient]] = defaultdict(list)
        for recipient in recipients:
            try:
                destinations = tuple(destination_for(recipient.domain, self.config, routes))
            except NoRoute as exc:
                self.record.outcome([recipient], 550, f"5.1.2 {exc}", permanent=True)
                continue
            except TemporaryDNSError as exc:
                self.record.outcome([recipient], 451, f"4.4.3 DNS lookup of {recipient.domain} failed: {exc}")
                continue
            tagged = recipient.action == Action.TAG and not recipient.released
            groups[(destinations, tagged, recipient.verdict, recipient.spam_threshold)].append(recipient)
        raw = content.without_foreign_authentication_results(raw)
        for (destinations, tagged, verdict, threshold), group in groups.items():
            try:
                data = content.outgoing(self.message, raw, verdict, tagged=tagged, prefix=self.config.subject_prefix,
                                        threshold=threshold)
                self._send(destinations, group, data)
            except Exception:
                # A bug or an odd input must not leave recipients claimed for ever: defer them, so that
                # retries and the queue lifetime (then a DSN) still apply.
                log.exception("delivery of %s failed unexpectedly", self.message.queue_id)
                self.record.outcome([r for r in group if r.status == Recipient.Status.DELIVERING], 451,
                             "4.3.0 local error while delivering")
        self.record.end()

    def _send(self, destinations: tuple[Destination, ...], group: list[Recipient], data: bytes) -> None:
        code, text, permanent, tried = 451, "4.4.1 no destination could be tried", False, None
        for destination in destinations:
            if not self.record.keep_claim_fresh():
                return
            unfinished = self._reclaim([r for r in group if r.status == Recipient.Status.DELIVERING])
            if not unfinished:
                return
            try:
                self._send_to(destination, unfinished, data)
                return
            except UnicodeEncodeError:
                # A non-ASCII address the destination cannot take (no SMTPUTF8 in this transaction).
                self.record.outcome(unfinished, 553, "5.6.7 a non-ASCII address needs SMTPUTF8", permanent=True)
                return
            except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
                # A refused connection, a timeout, a dropped session: try the next MX host, else defer.
                # Only a 5xx the server itself answered (to the greeting or DATA) is permanent.
                code = getattr(exc, "smtp_code", 0) or 451
                permanent = isinstance(exc, smtplib.SMTPResponseException) and 500 <= code < 600
                if not 400 <= code < 600:
                    code = 451
                detail = getattr(exc, "smtp_error", b"") or str(exc) or exc.__class__.__name__
                text, tried = f"{client.reply_text(code, detail)} (from {destination})", destination
                log.warning("delivery of %s to %s failed: %s", self.message.queue_id, destination, text)
                if permanent:
                    break
        unfinished = [r for r in group if r.status == Recipient.Status.DELIVERING]
        self.record.outcome(unfinished, code, text, permanent=permanent, tried=tried)

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
        client.send(self.message, destination, group, data, self.record.outcome)


def deliver(message: Message, raw: bytes | None = None, *, recipient_count: int | None = None,
            claimed: list[Recipient] | None = None, held: HeldVerdict | None = None) -> None:
    DeliveryAttempt(message, raw, recipient_count, claimed, held).run()


def run_delivery(message_id: int) -> None:
    """The delivery task: one pass over the message's due recipients; quiet when the message is gone."""
    message = Message.objects.filter(pk=message_id).first()
    if message is not None:
        deliver(message)

