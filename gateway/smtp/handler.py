"""The SMTP server's answers to each command: aiosmtpd's handler hooks, kept thin.

Each hook checks the syntax it is given, asks the SMTP-time checks (gateway.policy.enforce) whether to go
on, and answers; DATA hands the message to the intake writer and answers `250` only after the commit that
holds it (RFC 5321 §6.1: once we say 250 the message is ours). What the checks refuse they log first.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from django.conf import settings
from django.db import DatabaseError, InterfaceError

from gateway import maillog
from gateway.intake.rows import Arrival
from gateway.intake.writer import IntakeWriter
from gateway.models import Message
from gateway.policy.config import ServerConfig, ServerConfigCache
from gateway.policy.enforce import Enforcer
from gateway.policy.state import MX, Connection, Transaction, envelope_sender

from .addresses import AddressError, parse_address
from .data import DataMemory, spool_directory

log = logging.getLogger(__name__)
Refusal = Message.Refusal


def _refusal_of(exc: AddressError) -> str:
    return f"{'553' if exc.code.startswith('5.1') else '550'} {exc.code} {exc.text}"


class GatewayHandler:
    def __init__(self, *, config: ServerConfigCache | None = None, pool: ThreadPoolExecutor | None = None):
        self.config_cache = config or ServerConfigCache()
        self.pool = pool or ThreadPoolExecutor(max_workers=settings.SMTP_DB_THREADS, thread_name_prefix="smtp-db")
        self.connections: set = set()  # the protocol instances of the open connections
        self.transactions_in_flight = 0
        self.checks = Enforcer(self.config_cache, self.run_sync)
        self.writer = IntakeWriter.for_database(self.run_sync)
        # Message data is spooled to disk beyond SMTP_DATA_SPOOL_THRESHOLD per connection, and held in
        # memory (to be checked and stored) for SMTP_DATA_MEMORY bytes at most in all (gateway.smtp.data).
        self.data_memory = DataMemory(settings.SMTP_DATA_MEMORY)
        self.spool_directory = spool_directory(str(settings.SMTP_SPOOL_DIR))

    async def run_sync(self, func, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(func, *args, **kwargs))

    async def server_config(self) -> ServerConfig:
        return await self.checks.server_config()

    # --- HELO / EHLO -----------------------------------------------------------------------------------

    async def handle_HELO(self, server, session, envelope, hostname):
        session.host_name = hostname
        self.checks.at_helo(server.conn, session, hostname)
        return f"250 {server.hostname}"

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self.checks.at_helo(server.conn, session, hostname)
        last = responses.pop()  # "250 HELP"
        offers_auth = server.offers_auth()
        responses = [line for line in responses if offers_auth or not line.startswith("250-AUTH")]
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]
        return responses

    # --- MAIL FROM -------------------------------------------------------------------------------------

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        conn: Connection = session.conn
        if conn.mode != MX and not session.authenticated:
            return await self.checks.refuse(session, envelope, Refusal.AUTH_FAILED, "530 5.7.0 Authentication required")
        try:
            parsed = parse_address(address, allow_null=True)
        except AddressError as exc:
            return await self.checks.refuse(session, envelope, Refusal.BAD_SENDER, _refusal_of(exc))
        if parsed.domain and "." not in parsed.domain:
            reply = f"550 5.1.8 Sender domain {parsed.domain} is not fully qualified"
            return await self.checks.refuse(session, envelope, Refusal.BAD_SENDER, reply)
        refused = await self.checks.at_mail(session, envelope, str(parsed))
        if refused:
            return refused
        # aiosmtpd takes an empty mail_from for "no MAIL yet": the null sender is kept as "<>".
        envelope.mail_from = str(parsed) or "<>"
        envelope.mail_options.extend(mail_options)
        self.checks.start_sender_checks(session, envelope, str(parsed), parsed.domain)
        return "250 2.1.0 Sender OK"

    # --- RCPT TO ---------------------------------------------------------------------------------------

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        snapshot = await self.server_config()
        if len(envelope.rcpt_tos) >= snapshot.max_recipients:
            return await self.checks.refuse(session, envelope, Refusal.TOO_MANY_RECIPIENTS,
                                            "452 4.5.3 Too many recipients", recipient=address)
        try:
            parsed = parse_address(address)
        except AddressError as exc:
            reason = Refusal.RELAY_DENIED if exc.code == "5.7.1" else Refusal.BAD_RECIPIENT
            return await self.checks.refuse(session, envelope, reason, _refusal_of(exc), recipient=address)
        refused = await self.checks.at_rcpt(session, envelope, snapshot, parsed)
        if refused:
            return refused
        envelope.rcpt_tos.append(str(parsed))
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    # --- DATA ------------------------------------------------------------------------------------------

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content or b""
        txn: Transaction = envelope.txn
        refused, more, header = await self.checks.at_data(session, envelope, data)
        if refused:
            return refused
        added = "".join(txn.added_headers) + header
        check_record = self.checks.checks_of(session, envelope, more)
        if server.is_tls:
            check_record["tls"] = True
            ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
            if ssl_object is not None:
                check_record["tls_cipher"] = f"{ssl_object.version()} {ssl_object.cipher()[0]}"
        arrival = Arrival(
            client_ip=session.client_ip, client_name=await self.checks.client_name(session),
            helo=session.host_name or "", sender=envelope_sender(envelope), recipients=list(envelope.rcpt_tos),
            mail_options=[o for o in envelope.mail_options if o.upper().startswith(("BODY=", "SMTPUTF8"))],
            authenticated_as=getattr(session, "auth_user", "") or "", added_headers=added, checks=check_record)
        try:
            message = await self.writer.store(arrival, data)
        except (DatabaseError, InterfaceError, OSError) as exc:
            # Not stored means not accepted: the client keeps the message and tries again.
            log.error("could not store a message from %s: %s", session.client_ip, exc)
            return "451 4.3.0 Temporary local problem, please try again later"
        log.info("queued %s from <%s> to %d recipient(s), %d bytes", message.queue_id, arrival.sender,
                 len(arrival.recipients), len(data))
        auth = check_record.get("auth") or {}
        maillog.accepted(message.queue_id, client_name=arrival.client_name, client_ip=arrival.client_ip,
                         sender=arrival.sender, size=len(data), recipients=len(arrival.recipients),
                         message_id=getattr(message, "message_id", "") or "",
                         sasl_method=auth.get("mechanism", "") if arrival.authenticated_as else "",
                         sasl_username=arrival.authenticated_as)
        return f"250 2.0.0 Ok: queued as {message.queue_id}"

    async def handle_exception(self, error: Exception) -> str:
        log.exception("SMTP session error", exc_info=error)
        return "451 4.3.0 Local error in processing"
