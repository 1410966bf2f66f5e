"""The SMTP server (aiosmtpd). The handler stays thin: each command is checked against the policy
snapshot, refusals are logged, and DATA awaits one synchronous function that stores the message in
one transaction and enqueues its scan; `250` is answered only after that commit."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SMTPEnvelope
from django.conf import settings
from django.db import DatabaseError, InterfaceError

from gateway.models import Message

from .addresses import AddressError, parse_address
from .intake import Envelope, PolicyCache, log_refusal, store_message

log = logging.getLogger(__name__)
Refusal = Message.Refusal

# aiosmtpd's own replies carry no enhanced status code (RFC 3463); ours always do.
_AIOSMTPD_REPLIES = [
    (re.compile(r"^552 Error: (message size exceeds.*)$"), "552 5.3.4 Message size exceeds the fixed maximum"),
    (re.compile(r"^552 Error: Too much mail data$"), "552 5.3.4 Message too big"),
    (re.compile(r"^500 Line too long.*$"), "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"),
    (re.compile(r"^503 Error: need MAIL command$"), "503 5.5.1 Need MAIL command first"),
    (re.compile(r"^503 Error: need RCPT command$"), "503 5.5.1 Need RCPT command first"),
    (re.compile(r"^503 Error: nested MAIL command$"), "503 5.5.1 Sender already given"),
    (re.compile(r"^503 Error: send HELO first$"), "503 5.5.1 Send EHLO or HELO first"),
]
_DEFAULT_DETAIL = {"2": "2.0.0", "4": "4.0.0", "5": "5.5.2"}
_SPECIFIC = {"221": "2.0.0", "250": "2.0.0", "421": "4.3.2", "451": "4.3.0", "500": "5.5.2", "501": "5.5.4",
             "502": "5.5.1", "503": "5.5.1", "504": "5.5.4", "530": "5.7.0", "535": "5.7.8", "552": "5.3.4",
             "553": "5.1.3", "554": "5.6.0", "555": "5.5.4"}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}\b")


def with_enhanced_code(status: str) -> str:
    """Give a reply an enhanced status code if it has none (the greeting and EHLO lines excepted)."""
    for pattern, replacement in _AIOSMTPD_REPLIES:
        if pattern.match(status):
            return replacement
    if len(status) < 4 or not status[:3].isdigit() or _HAS_ENHANCED.match(status) or status[:3] in ("220", "354"):
        return status
    if status.startswith("250") and (status[3] == "-" or status == "250 HELP"):
        return status  # EHLO keyword lines
    code, sep, text = status[:3], status[3], status[4:]
    detail = _SPECIFIC.get(code, _DEFAULT_DETAIL.get(code[0], ""))
    if text.startswith("Error: "):
        text = text[7:]
    return f"{code}{sep}{detail} {text}" if detail else status


def envelope_sender(envelope: SMTPEnvelope | None) -> str:
    sender = (envelope.mail_from or "") if envelope is not None else ""
    return "" if sender == "<>" else sender


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with enhanced status codes, a connection limit and a reverse DNS look-up."""

    # RFC 5321 caps a line at 1000 octets, but real mail (HTML from some clients, long base64 lines)
    # breaks it; like Postfix we accept long lines rather than refuse such mail. Commands keep their limit.
    line_length_limit = 1024 * 1024

    def __init__(self, handler: GatewayHandler, **kwargs):
        super().__init__(handler, **kwargs)
        self.gateway = handler

    def connection_made(self, transport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            return
        self.gateway.connections.add(self)
        peer = self.session.peer
        self.session.client_ip = peer[0] if isinstance(peer, tuple) else None
        self.session.reverse_name = asyncio.ensure_future(self.gateway.reverse_name(self.session.client_ip))
        self.session.checks = {}
        if len(self.gateway.connections) > settings.SMTP_MAX_CONNECTIONS:
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
            transport.close()

    def _getaddr(self, arg: str):
        stripped = arg.lstrip()
        if stripped.startswith("<>"):
            # The null reverse-path of bounces and DSNs (RFC 5321 §4.5.5): aiosmtpd calls it a syntax error.
            return "<>", stripped[2:].strip()
        address, rest = super()._getaddr(arg)
        if address is None and stripped:
            # Unparseable: the handler refuses it with a clear reply and logs the attempt.
            raw, _, rest = stripped.partition(">" if stripped.startswith("<") else " ")
            return raw.lstrip("<") or stripped, rest.strip()
        return address, rest

    async def smtp_DATA(self, arg: str) -> None:
        # From DATA to our reply the client has handed us a message: a shutdown waits for it.
        self.gateway.transactions_in_flight += 1
        try:
            await super().smtp_DATA(arg)
        finally:
            self.gateway.transactions_in_flight -= 1

    def connection_lost(self, error) -> None:
        self.gateway.connections.discard(self)
        super().connection_lost(error)

    async def push(self, status) -> None:
        if isinstance(status, bytes):
            status = status.decode("utf-8", "replace")
        enhanced = with_enhanced_code(status)
        if enhanced.startswith("552 5.3.4"):
            await self.gateway.refuse(self.session, self.envelope, Refusal.OVER_SIZE, enhanced)
        elif enhanced.startswith("500 5.5.2 Line too long"):
            await self.gateway.refuse(self.session, self.envelope, Refusal.BAD_MESSAGE, enhanced)
        await super().push(enhanced)


class GatewayHandler:
    def __init__(self, *, policy: PolicyCache | None = None, pool: ThreadPoolExecutor | None = None):
        self.policy_cache = policy or PolicyCache()
        self.pool = pool or ThreadPoolExecutor(max_workers=settings.SMTP_DB_THREADS, thread_name_prefix="smtp-db")
        self.connections: set[GatewaySMTP] = set()
        self.transactions_in_flight = 0
        self.resolver = self._make_resolver()

    @staticmethod
    def _make_resolver() -> dns.asyncresolver.Resolver | None:
        if not settings.SMTP_REVERSE_DNS:
            return None
        try:
            if settings.DNS_NAMESERVERS:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = settings.DNS_NAMESERVERS
                resolver.port = settings.DNS_PORT
            else:
                resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            return None
        resolver.lifetime = min(settings.DNS_TIMEOUT, 5.0)
        return resolver

    async def run_sync(self, func, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(func, *args, **kwargs))

    async def policy(self):
        return await self.run_sync(self.policy_cache.get)

    async def reverse_name(self, ip: str | None) -> str:
        if not ip or self.resolver is None:
            return ""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return ""
        if address.is_loopback:
            return "localhost"
        try:
            answer = await self.resolver.resolve(dns.reversename.from_address(ip), "PTR")
            return str(answer[0].target).rstrip(".")
        except (dns.exception.DNSException, OSError):
            return ""

    @staticmethod
    async def client_name(session: Session) -> str:
        task = getattr(session, "reverse_name", None)
        if task is None:
            return ""
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout=5)
        except (TimeoutError, Exception):  # noqa: BLE001 - a name we could not learn is logged as unknown
            return ""

    async def refuse(self, session: Session, envelope: SMTPEnvelope | None, reason: str, reply: str,
                     recipient: str = "") -> str:
        """Log an attempt refused at SMTP time; a logging failure must not change the reply."""
        try:
            await self.run_sync(
                log_refusal, reason=reason, reply=reply, client_ip=getattr(session, "client_ip", None),
                client_name=await self.client_name(session), helo=session.host_name or "",
                sender=envelope_sender(envelope), recipient=recipient,
                checks=dict(getattr(session, "checks", {}) or {}))
        except Exception:  # noqa: BLE001
            log.exception("could not log a refusal (%s)", reason)
        log.info("refused %s from %s: %s", reason, getattr(session, "client_ip", "?"), reply)
        return reply

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        last = responses.pop()  # "250 HELP"
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        try:
            parsed = parse_address(address, allow_null=True)
        except AddressError as exc:
            reply = f"{'553' if exc.code.startswith('5.1') else '550'} {exc.code} {exc.text}"
            return await self.refuse(session, envelope, Refusal.BAD_SENDER, reply)
        if parsed.domain and "." not in parsed.domain:
            reply = f"550 5.1.8 Sender domain {parsed.domain} is not fully qualified"
            return await self.refuse(session, envelope, Refusal.BAD_SENDER, reply)
        # aiosmtpd takes an empty mail_from for "no MAIL yet": the null sender is kept as "<>".
        envelope.mail_from = str(parsed) or "<>"
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        policy = await self.policy()
        if len(envelope.rcpt_tos) >= policy.max_recipients:
            return await self.refuse(session, envelope, Refusal.TOO_MANY_RECIPIENTS,
                                     "452 4.5.3 Too many recipients", recipient=address)
        try:
            parsed = parse_address(address)
        except AddressError as exc:
            reply = f"{'553' if exc.code.startswith('5.1') else '550'} {exc.code} {exc.text}"
            reason = Refusal.RELAY_DENIED if exc.code == "5.7.1" else Refusal.BAD_RECIPIENT
            return await self.refuse(session, envelope, reason, reply, recipient=address)
        recipient = str(parsed)
        if policy.is_local_domain(parsed.domain):
            mode = policy.domains[parsed.domain]
            always = parsed.local.lower() in ("postmaster", "abuse")  # RFC 5321 §4.5.1, RFC 2142
            if mode == "list" and not always and recipient.lower() not in policy.valid_recipients:
                return await self.refuse(session, envelope, Refusal.UNKNOWN_USER,
                                         f"550 5.1.1 <{recipient}>: Recipient address rejected: User unknown",
                                         recipient=recipient)
        elif policy.is_trusted(session.client_ip):
            session.checks["relay"] = "trusted network"
        else:
            return await self.refuse(session, envelope, Refusal.RELAY_DENIED,
                                     f"550 5.7.1 <{recipient}>: Relay access denied", recipient=recipient)
        envelope.rcpt_tos.append(recipient)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content or b""
        intake = Envelope(
            client_ip=session.client_ip, client_name=await self.client_name(session),
            helo=session.host_name or "", sender=envelope_sender(envelope), recipients=list(envelope.rcpt_tos),
            mail_options=[o for o in envelope.mail_options if o.upper().startswith(("BODY=", "SMTPUTF8"))],
            checks={**session.checks, **({"tls": True} if session.ssl else {})})
        try:
            message = await self.run_sync(store_message, intake, data)
        except (DatabaseError, InterfaceError, OSError) as exc:
            # Not stored means not accepted: the client keeps the message and tries again.
            log.error("could not store a message from %s: %s", session.client_ip, exc)
            return "451 4.3.0 Temporary local problem, please try again later"
        log.info("queued %s from <%s> to %d recipient(s), %d bytes", message.queue_id, intake.sender,
                 len(intake.recipients), len(data))
        return f"250 2.0.0 Ok: queued as {message.queue_id}"

    async def handle_exception(self, error: Exception) -> str:
        log.exception("SMTP session error", exc_info=error)
        return "451 4.3.0 Local error in processing"


def make_server_factory(handler: GatewayHandler, *, tls_context=None, max_size: int | None = None):
    def factory() -> GatewaySMTP:
        # Only the snapshot in hand: the event loop never waits on the database (handle_RCPT reloads it).
        policy = handler.policy_cache.peek()
        size = policy.max_message_size if policy else (max_size or 25 * 1024 * 1024)
        return GatewaySMTP(handler, hostname=settings.SMTP_HOSTNAME, ident="Mailgate ESMTP",
                           data_size_limit=size, enable_SMTPUTF8=True, decode_data=False,
                           timeout=settings.SMTP_DATA_TIMEOUT, tls_context=tls_context)

    return factory


async def serve(host: str, port: int, *, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None, grace: float = 30.0) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`), then finish the transactions in flight and return."""
    loop = asyncio.get_running_loop()
    handler = GatewayHandler()
    await handler.policy()  # fail early, with a clear error, when the database is unreachable at start
    server = await loop.create_server(make_server_factory(handler), host=host, port=port, reuse_address=True)
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    log.info("SMTP listening on %s:%s as %s", host, port, settings.SMTP_HOSTNAME)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping: no new connections; finishing %d transaction(s) in flight", handler.transactions_in_flight)
    server.close()
    deadline = loop.time() + grace
    while handler.transactions_in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for connection in list(handler.connections):
        if connection.transport is not None:
            connection.transport.write(b"421 4.3.2 Service shutting down\r\n")
            connection.transport.close()
    await server.wait_closed()
    handler.pool.shutdown(wait=True)
    log.info("SMTP stopped")
