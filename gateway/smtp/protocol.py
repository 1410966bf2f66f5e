"""The SMTP protocol as the server speaks it: aiosmtpd's SMTP with enhanced status codes on every reply
(RFC 3463), the connection limits and the checks before the greeting, the message data read up to its
end in as few reads as the client sent it, and AUTH offered and required by our own rules (only over TLS,
only on the submission ports). The handler (gateway.smtp.handler) answers each command."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, _AuthMechAttr, login_always_fail, make_loop
from aiosmtpd.smtp import Envelope as SMTPEnvelope
from django.conf import settings

from gateway import metrics
from gateway.models import Message
from gateway.policy.state import MX, Connection, Transaction

from . import login
from .data import Spool, read_message_data

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

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(rf"[ \t]*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*([^ \t(].*)?\Z",
                         re.DOTALL)


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


@dataclass(frozen=True)
class _Members:
    commands: tuple[tuple[str, str], ...]  # (SMTP verb, method name)
    auth: tuple[tuple[str, str, bool], ...]  # (mechanism, method name, defined on the protocol)
    hooks: dict[str, Any]  # handler hooks, bound: the handler is shared by all connections


def _members(cls: type, handler: Any) -> _Members:
    """The smtp_*, auth_* and handle_* members, named as aiosmtpd's SMTP.__init__ names them; kept on the
    handler (per protocol class), whose lifetime is theirs."""
    cache = handler.__dict__.setdefault("_protocol_members", {})
    found = cache.get(cls)
    if found is None:
        auth = tuple(
            (getattr(getattr(owner, name), "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-")),
             name, owner is cls)
            for owner in (cls, type(handler)) for name in dir(owner) if name.startswith("auth_"))
        found = cache[cls] = _Members(
            commands=tuple((name.replace("smtp_", ""), name) for name in dir(cls) if name.startswith("smtp_")),
            auth=auth,
            hooks={name.replace("handle_", ""): getattr(handler, name) for name in dir(handler)
                   if name.startswith("handle_")})
    return found


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with enhanced status codes, connection limits, the pre-greeting checks and AUTH."""

    # RFC 5321 caps a line at 1000 octets, but real mail (HTML from some clients, long base64 lines)
    # breaks it; like Postfix we accept long lines rather than refuse such mail. Commands keep their limit.
    line_length_limit = 1024 * 1024
    # The stream reader's buffer: what a connection may hold of what its client sent before it is read
    # (twice this, then the transport pauses). Commands are short and the data is read in pieces of at most
    # this (gateway.smtp.data), so a connection costs little memory however long its lines are.
    read_limit = 64 * 1024

    def __init__(self, handler, *, mode: str = MX, hostname: str, ident: str,
                 data_size_limit: int, timeout: float, tls_context: ssl.SSLContext | None = None,
                 require_starttls: bool = False):
        """What aiosmtpd's SMTP.__init__ sets up, for the options we use, without its per-connection
        introspection: it lists every member of the protocol and of the handler (inspect.getmembers,
        which also evaluates properties) for each new connection, and logs the AUTH mechanisms each time.
        The member names are the same for every connection, so they are found once per class and handler.
        tests/smtp/test_smtp_writer.py checks that both set the same attributes to the same values.

        AUTH is offered and required by our own rules (only over TLS, only on the submission ports):
        aiosmtpd's auth_require_tls cannot see implicit TLS.
        """
        self.gateway = handler
        self.mode = mode
        self.conn: Connection | None = None
        self.__ident__ = ident
        self.loop = make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=self.read_limit),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.command_size_limits.clear()
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = tls_context and require_starttls
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = False
        self._proxy_timeout = None
        self._auth_callback = login_always_fail
        self._authenticator = None
        self._auth_required = False
        members = _members(type(self), handler)
        self._auth_methods = {mechanism: _AuthMechAttr(getattr(self if builtin else handler, name), builtin)
                              for mechanism, name, builtin in members.auth}
        self._handle_hooks = members.hooks
        self._ehlo_hook_ver = "new" if "EHLO" in members.hooks else None
        self._smtp_methods = {command: getattr(self, name) for command, name in members.commands}
        self._enforce_call_limit = False

    # --- connection ------------------------------------------------------------------------------------

    def _create_envelope(self) -> SMTPEnvelope:
        envelope = super()._create_envelope()
        envelope.txn = Transaction()
        return envelope

    def connection_made(self, transport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            peer = self.session.peer
            sockname = transport.get_extra_info("sockname")
            self.conn = Connection(
                self.mode, peer[0] if isinstance(peer, tuple) else None,
                sockname[0] if isinstance(sockname, tuple) else None,
                transport.get_extra_info("ssl_object") is not None)
            self.gateway.connections.add(self)
            metrics.count("mailgate_smtp_connections")
            if self.conn.client_ip:
                self.gateway.checks.limits.connect(self.conn.client_ip)
                self.conn.counted = True
            self.conn.name_task = self.conn.start(self.gateway.checks.reverse_name(self.conn.client_ip))
        self._attach_session()
        if first and len(self.gateway.connections) > settings.SMTP_MAX_CONNECTIONS:
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
            transport.close()

    def _attach_session(self) -> None:
        # STARTTLS starts a new session (RFC 3207 §4.2: forget what the client said); the connection stays.
        session = self.session
        session.conn = self.conn
        session.client_ip = self.conn.client_ip
        session.reverse_name = self.conn.name_task
        session.checks = self.conn.extra
        session.helo_results = []
        session.helo_pending = []
        session.auth_user = ""

    def connection_lost(self, error) -> None:
        self.gateway.connections.discard(self)
        if self.conn is not None:
            if self.conn.counted and self.conn.client_ip:
                self.gateway.checks.limits.disconnect(self.conn.client_ip)
                self.conn.counted = False
            self.gateway.checks.connection_closed(self.conn)
            self.conn.cancel()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            greet = await self.gateway.checks.before_greeting(self)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a check that broke must not leave the client without a greeting
            log.exception("checks before the greeting failed")
            greet = True
        if greet and self.transport is not None and not self.transport.is_closing():
            await super()._handle_client()

    def client_talked(self) -> bool:
        """Did the client send anything yet (before our greeting, that is a protocol violation)?"""
        return bool(getattr(self._reader, "_buffer", b""))

    @property
    def is_tls(self) -> bool:
        return bool(self.conn and (self.conn.implicit_tls or self._tls_protocol is not None))

    def offers_auth(self) -> bool:
        return self.mode != MX and self.is_tls

    # --- commands --------------------------------------------------------------------------------------

    def _getaddr(self, arg: str):
        plain = _PLAIN_PATH.match(arg)
        if plain is not None and not self.local_part_limit:
            # <dot-atom@domain>, nearly every address: what aiosmtpd's RFC 5322 parser would return, at a
            # tenth of its cost. Anything else (quoting, comments, literals, UTF-8) goes to the parser.
            return plain.group(1), plain.group(2) or ""
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
            await self._data(arg)
        finally:
            self.gateway.transactions_in_flight -= 1

    async def _data(self, arg: str) -> None:
        """aiosmtpd's DATA, with the data read by gateway.smtp.data (in as few reads as the client sent it,
        not a line at a time) instead of its line loop; the checks, replies and hooks are aiosmtpd's."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        spool = Spool(threshold=settings.SMTP_DATA_SPOOL_THRESHOLD, directory=self.gateway.spool_directory)
        try:
            try:
                data = await read_message_data(self._reader, size_limit=self.data_size_limit,
                                               line_limit=self.line_length_limit, spool=spool)
            except asyncio.IncompleteReadError:  # the client went away in the middle of its data
                self._writer.close()
                return
            except asyncio.CancelledError:
                log.info("Connection lost during DATA")
                self._writer.close()
                raise
            if data.error:
                await self.push(data.error)
                self._set_post_data_state()
                return
            # In memory only while it is checked and stored, within the server's budget (and what the
            # database driver copies of it while it is sent: twice its size).
            async with self.gateway.data_memory.reserve(2 * data.size):
                self.envelope.content = self.envelope.original_content = data.content
                status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
                self._set_post_data_state()
                data.close()
        finally:
            spool.close()
        await self.push("250 OK" if status is MISSING else status)

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.offers_auth():
            if self.mode != MX:
                await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            else:
                await self.push("503 5.5.1 Authentication not enabled")
            return
        if await self.gateway.checks.too_many_auth_failures(self.conn.client_ip):
            reply = login.throttled_reply(self.conn.client_ip)
            await self.gateway.checks.refuse(self.session, self.envelope, Refusal.AUTH_FAILED, reply, command="AUTH")
            await self.push(reply)
            return
        await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, _, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        try:
            _authzid, user, password = blob.split(b"\x00")
        except ValueError:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await login.verify(self.gateway.checks, self, "PLAIN", user, password)

    async def auth_LOGIN(self, _, args: list[str]) -> AuthResult:
        if len(args) == 1:
            user = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if not isinstance(user, bytes):
                return AuthResult(success=False)
        else:
            try:
                user = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False)
        return await login.verify(self.gateway.checks, self, "LOGIN", user, password)

    async def push(self, status) -> None:
        if isinstance(status, bytes):
            status = status.decode("utf-8", "replace")
        enhanced = with_enhanced_code(status)
        if enhanced.startswith("552 5.3.4"):
            await self.gateway.checks.refuse(self.session, self.envelope, Refusal.OVER_SIZE, enhanced)
        elif enhanced.startswith("500 5.5.2 Line too long"):
            await self.gateway.checks.refuse(self.session, self.envelope, Refusal.BAD_MESSAGE, enhanced)
        await super().push(enhanced)
        if enhanced.startswith("421") and self.transport is not None:
            # 421: the service closes the channel (RFC 5321 §4.2.2).
            self.transport.close()
