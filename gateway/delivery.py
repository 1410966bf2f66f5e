"""Delivery: relay a message to the mail server of each recipient's domain.

Each recipient is claimed before its attempt (status pending/deferred/released → delivering), so a
retried or duplicated task never delivers twice. Per recipient the downstream's reply is kept;
4xx and connection failures are retried with exponential back-off until the queue lifetime ends,
5xx (or the end of the queue lifetime) bounce, with a DSN to the envelope sender.
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from . import dsn, mailbytes, queue, rowsql, signing
from .auth.dmarc import strip_authentication_results
from .auth.dns import TemporaryDNSError, get_sync_resolver
from .models import (
    Action,
    Domain,
    MailFlowSettings,
    Message,
    RawMessage,
    Recipient,
    Route,
    Verdict,
    far_from_stale,
    parse_host_port,
)
from .snapshot import Snapshot

if TYPE_CHECKING:
    from .pipeline import HeldVerdict

log = logging.getLogger(__name__)

DUE_STATUSES = [Recipient.Status.PENDING, Recipient.Status.DEFERRED]
ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


class NoRoute(Exception):
    """No mail server is known for a domain (no route, no MX): a permanent failure."""


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    require_tls: bool = False
    via_mx: bool = False

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def backoff(attempt: int, base: int, cap: int) -> int:
    return min(cap, base * 2 ** max(0, attempt - 1))


def mx_hosts(domain: str) -> list[str]:
    """The domain's MX hosts by preference, or the domain itself (RFC 5321 §5.1 implicit MX).

    Raises NoRoute for a domain that does not exist or accepts no mail (null MX, RFC 7505), and
    TemporaryDNSError when the look-up fails (the delivery is deferred).
    """
    lookup = get_sync_resolver().lookup(domain, "MX")
    if lookup.nxdomain:
        raise NoRoute(f"domain {domain} does not exist")
    records = sorted((r.preference, str(r.exchange).rstrip(".")) for r in lookup.rdatas)
    if not records:
        return [domain]
    hosts = [host for _, host in records]
    if hosts == [""]:
        raise NoRoute(f"domain {domain} accepts no mail (null MX)")
    return hosts


def _read_routes() -> dict[str, Domain]:
    return {d.name: d for d in Domain.objects.filter(active=True).select_related("route")}


# The active domains with their routes: a look-up on the path of every message otherwise.
_routes = Snapshot(_read_routes).clear_on_change(Domain, Route)


def active_routes() -> dict[str, Domain]:
    """The active domains with their routes, as read at most CONFIG_CACHE_SECONDS ago (at once after a
    change saved in this process)."""
    return _routes.get()


def destination_for(domain: str, config: MailFlowSettings, routes: dict[str, Domain]) -> list[Destination]:
    """Where mail for a domain goes: its route, else the outbound relay, else its MX hosts."""
    local = routes.get(domain)
    if local is not None:
        return [Destination(local.route.host, local.route.port, local.route.require_tls)]
    if config.outbound_relay:
        host, port = parse_host_port(config.outbound_relay, default_port=25)
        return [Destination(host, port)]
    return [Destination(host, 25, via_mx=True) for host in mx_hosts(domain)]


def scan_headers(message: Message, recipient_verdict: str) -> bytes:
    """Our headers on delivered mail: what was found, so the mail client and the user can tell."""
    lines = [f"X-Mailgate-Verdict: {recipient_verdict or message.verdict or 'unscanned'}"]
    if message.spam_score is not None:
        is_spam = recipient_verdict in (Verdict.SPAM, Verdict.HIGH_SPAM)
        tests = ",".join(f"{r['name']}={r['score']:g}" for r in message.spam_rules) or "none"
        lines.append(f"X-Spam-Status: {'Yes' if is_spam else 'No'}, score={message.spam_score:.1f} "
                     f"required={message.spam_threshold or 0:.1f} tests={tests}")
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


# --- kept SMTP sessions ---------------------------------------------------------------------------------
# A session to a destination is kept open after a delivery for the next message to the same place, as
# Postfix's connection cache does: the connection, greeting, EHLO (and STARTTLS) and QUIT of every
# message were a third of the exchanges with the downstream server. Per thread (smtplib is not
# thread-safe), for SESSION_IDLE_SECONDS at most between uses and SESSION_MAX_USES messages.
SESSION_IDLE_SECONDS = 2.0
SESSION_MAX_USES = 100
class _Sessions(threading.local):
    def __init__(self) -> None:
        self.cache: dict = {}  # destination -> (session, last used, messages carried)


_sessions = _Sessions()


def _session_cache() -> dict:
    return _sessions.cache


def _quit(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()


def drop_sessions() -> None:
    """Close this thread's kept sessions."""
    cache = _session_cache()
    while cache:
        _quit(cache.popitem()[1][0])


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {' '.join(text.split())}"[:1000]


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
        # Authentication-Results claiming to be ours came from outside (RFC 8601 §5): they go, here and not
        # in the stored original, which stays as received.
        head = raw[: raw.find(b"\r\n\r\n") if b"\r\n\r\n" in raw else len(raw)].lower()
        if b"authentication-results" in head and settings.SMTP_HOSTNAME.lower().encode() in head:
            raw = strip_authentication_results(raw, settings.SMTP_HOSTNAME)
        for (destinations, tagged, verdict), group in groups.items():
            content = self.message.added_headers.encode("utf-8", "replace").replace(b"\r\n", b"\n").replace(
                b"\n", b"\r\n") + scan_headers(self.message, verdict)
            body = tag_subject(raw, self.config.subject_prefix) if tagged else raw
            try:
                self._send(destinations, group, signing.sign_outgoing(self.message, content + body))
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
                text = f"{_reply(code, detail)} (from {destination})"
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
        smtp, uses = self._session(destination)
        try:
            try:
                first = self._mail_from(smtp, group, data)
            except (OSError, smtplib.SMTPServerDisconnected):
                if not uses:
                    raise
                first = (421, b"the kept session was closed")
            if uses and first is not None and first[0] == 421:
                # The kept session went stale (the server closed it, or is closing it): nothing of this
                # transaction was accepted, so it starts again on a new connection.
                smtp.close()
                smtp, uses = self._connect(destination), 0
                first = self._mail_from(smtp, group, data)
            reusable = self._transaction(smtp, destination, group, data, first)
        except BaseException:
            smtp.close()
            raise
        if reusable and uses + 1 < SESSION_MAX_USES:
            _session_cache()[destination] = (smtp, time.monotonic(), uses + 1)
        else:
            _quit(smtp)

    def _session(self, destination: Destination) -> tuple[smtplib.SMTP, int]:
        """This thread's kept session to the destination if it is fresh enough, else a new one; and how many
        messages the session carried before."""
        kept = _session_cache().pop(destination, None)
        if kept is not None:
            smtp, last_used, uses = kept
            if time.monotonic() - last_used <= SESSION_IDLE_SECONDS:
                return smtp, uses
            _quit(smtp)
        return self._connect(destination), 0

    def _connect(self, destination: Destination) -> smtplib.SMTP:
        smtp = smtplib.SMTP(destination.host, destination.port, local_hostname=settings.SMTP_HOSTNAME,
                            timeout=settings.DELIVERY_TIMEOUT)
        try:
            smtp.ehlo()
            if smtp.has_extn("starttls"):
                context = ssl.create_default_context()
                if not destination.require_tls:
                    # Opportunistic TLS (RFC 7435): encrypt when offered, without authenticating the peer.
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                smtp.starttls(context=context)
                smtp.ehlo()
            elif destination.require_tls:
                raise smtplib.SMTPException(f"{destination} does not offer STARTTLS and the route requires it")
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _mail_from(self, smtp: smtplib.SMTP, group: list[Recipient], data: bytes) -> tuple[int, bytes] | None:
        """MAIL FROM with the parameters this message needs, and its reply; None when the message cannot be
        sent on this session at all (recorded: a non-ASCII address without SMTPUTF8).

        When the server offers PIPELINING (RFC 2920), the RCPT commands and DATA go in the same write, and
        their replies are read by `_transaction`: one round trip instead of two plus one per recipient."""
        options = []
        if smtp.has_extn("8bitmime") and "BODY=8BITMIME" in self.message.mail_options:
            options.append("BODY=8BITMIME")
        addresses = [self.message.envelope_sender, *(r.address for r in group)]
        utf8 = "SMTPUTF8" in self.message.mail_options or not all(a.isascii() for a in addresses)
        if utf8:
            if not smtp.has_extn("smtputf8"):
                self._finish(group, 553, "5.6.7 the destination does not support SMTPUTF8", permanent=True)
                return None
            options.append("SMTPUTF8")
        if smtp.has_extn("size"):
            options.append(f"SIZE={len(data)}")
        # The addresses as the envelope gave them (checked at intake), not re-parsed as header addresses.
        commands = ["MAIL FROM:<" + self.message.envelope_sender + ">" + "".join(" " + o for o in options)]
        if smtp.has_extn("pipelining"):
            commands += [f"RCPT TO:<{r.address}>" for r in group] + ["DATA"]
        # Every command of this transaction (the RCPTs sent one at a time too) in UTF-8 only with SMTPUTF8;
        # a non-ASCII address without it raises UnicodeEncodeError.
        smtp.command_encoding = "utf-8" if utf8 else "ascii"
        smtp.send("".join(c + "\r\n" for c in commands))
        return smtp.getreply()

    def _transaction(self, smtp: smtplib.SMTP, destination: Destination, group: list[Recipient], data: bytes,
                     first: tuple[int, bytes] | None) -> bool:
        """The rest of the transaction after MAIL FROM; True when the session can carry another message."""
        if first is None:
            return True
        pipelined = smtp.has_extn("pipelining")  # the RCPTs and DATA went with MAIL FROM
        code, text = first
        if code != 250:
            self._finish(group, code, _reply(code, text), permanent=code >= 500)
            if code == 421:
                return False  # the server is closing the session
            if pipelined:
                for _ in range(len(group) + 1):  # the replies to the RCPTs and DATA sent with it
                    smtp.getreply()
            smtp.rset()
            return True
        accepted = []
        for recipient in group:
            if pipelined:
                code, text = smtp.getreply()
            else:
                code, text = smtp.docmd("RCPT", f"TO:<{recipient.address}>")
            if code in (250, 251):
                accepted.append(recipient)
            else:
                self._finish([recipient], code, _reply(code, text), permanent=code >= 500)
        if pipelined:
            code, text = smtp.getreply()
        elif accepted:
            code, text = smtp.docmd("DATA")
        if not accepted:
            if pipelined and code == 354:
                # A server that opened DATA although it refused every recipient gets an empty message.
                smtp.send(b".\r\n")
                smtp.getreply()
            smtp.rset()
            return code != 421
        if code != 354:
            self._finish(accepted, code, _reply(code, text), permanent=code >= 500)
            smtp.rset()
            return code != 421
        smtp.send(mailbytes.dot_stuffed(data))
        code, text = smtp.getreply()
        self._finish(accepted, code, _reply(code, text), permanent=code >= 500,
                     delivered=code == 250, destination=destination)
        return code != 421

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
            queue.enqueue_delivery(self.message.pk, countdown=delay)


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

