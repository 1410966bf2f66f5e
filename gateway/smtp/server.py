"""The SMTP server (aiosmtpd). The handler stays thin: each command is checked against the policy
snapshot, refusals are logged, and DATA awaits one synchronous function that stores the message in
one transaction and enqueues its scan; `250` is answered only after that commit.

The SMTP-time checks (gateway.policy, docs/smtp-policy.md) run where their data arrives and are enforced
at RCPT TO, as Postfix does with smtpd_delay_reject: the DNS questions about the client start at connect,
about the HELO name at EHLO, about the sender at MAIL, all in the background while the client goes on;
each RCPT awaits them and refuses with the first one whose action refuses. So every refusal is logged with
its sender and recipient, and a client that mishandles a refused greeting or MAIL still gets a clean answer.
Exceptions: per-IP limits and early talkers (before the greeting), the message rate (at MAIL), DKIM and
DMARC (after DATA). Trusted networks and authenticated users skip the checks (not the size and syntax
rules); postmaster@ and abuse@ of our domains skip the RCPT-time refusals (RFC 5321 §4.5.1).

Three kinds of listener share one handler: the inbound MX port (STARTTLS offered, no AUTH), submission
(STARTTLS required, then AUTH required) and implicit TLS (AUTH required).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import signal
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Session, _AuthMechAttr, login_always_fail, make_loop
from aiosmtpd.smtp import Envelope as SMTPEnvelope
from django.conf import settings
from django.db import DatabaseError, InterfaceError

from gateway.auth.dns import TemporaryDNSError
from gateway.models import CheckAction, Domain, Message
from gateway.policy import checks
from gateway.policy.callahead import CallAhead
from gateway.policy.config import CheckConfig, defaults, dns_checks_enabled, dns_checks_state
from gateway.policy.dnscache import CachingResolver
from gateway.policy.greylist import Greylist
from gateway.policy.limits import ClientLimits
from gateway.policy.results import CheckResult, decide, total_score
from quarantine.lists import list_decision, sender_matches

from . import tls as tls_config
from .addresses import AddressError, parse_address
from .auth import check_login
from .data import read_message_data
from .intake import Envelope, Policy, PolicyCache, log_refusal
from .writer import IntakeWriter

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

MX, SUBMISSION, SMTPS = "mx", "submission", "smtps"

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


def envelope_sender(envelope: SMTPEnvelope | None) -> str:
    sender = (envelope.mail_from or "") if envelope is not None else ""
    return "" if sender == "<>" else sender


class Connection:
    """What the server knows about one TCP connection; it outlives the SMTP session a STARTTLS restarts."""

    def __init__(self, mode: str, client_ip: str | None, local_ip: str | None, implicit_tls: bool):
        self.mode = mode
        self.client_ip = client_ip
        self.local_ip = local_ip
        self.implicit_tls = implicit_tls
        self.trusted = False
        self.counted = False
        self.results: list[CheckResult] = []  # connection checks done (rate limit, early talker, DNSBL, FCrDNS)
        self.pending: list[asyncio.Task] = []  # connection checks running
        self.tasks: set[asyncio.Task] = set()  # everything started for this connection
        self.name_task: asyncio.Future | None = None
        self.extra: dict[str, Any] = {}  # entries of Message.checks that are not check results (auth, tls)

    def start(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()


class Transaction:
    """One MAIL transaction's checks (a fresh one per MAIL, RSET and end of DATA)."""

    def __init__(self):
        self.results: list[CheckResult] = []
        self.pending: list[asyncio.Task] = []
        self.spf = None  # gateway.auth.spf.SPFResult, for DMARC and Authentication-Results
        self.added_headers: list[str] = []
        self.extra: dict[str, Any] = {}
        self.exempt = False  # a trusted network or an authenticated user
        self.greylist: dict[str, str] = {}
        self.greylist_seconds = 0.0
        self.callahead: dict[str, str] = {}
        self.callahead_seconds = 0.0


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

    def __init__(self, handler: GatewayHandler, *, mode: str = MX, hostname: str, ident: str,
                 data_size_limit: int, timeout: float, tls_context: ssl.SSLContext | None = None,
                 require_starttls: bool = False):
        """What aiosmtpd's SMTP.__init__ sets up, for the options we use, without its per-connection
        introspection: it lists every member of the protocol and of the handler (inspect.getmembers,
        which also evaluates properties) for each new connection, and logs the AUTH mechanisms each time.
        The member names are the same for every connection, so they are found once per class and handler.
        tests/test_smtp_writer.py checks that both set the same attributes to the same values.

        AUTH is offered and required by our own rules (only over TLS, only on the submission ports):
        aiosmtpd's auth_require_tls cannot see implicit TLS.
        """
        self.gateway = handler
        self.mode = mode
        self.conn: Connection | None = None
        self.__ident__ = ident
        self.loop = make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
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
            if self.conn.client_ip:
                self.gateway.limits.connect(self.conn.client_ip)
                self.conn.counted = True
            self.conn.name_task = self.conn.start(self.gateway.reverse_name(self.conn.client_ip))
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
                self.gateway.limits.disconnect(self.conn.client_ip)
                self.conn.counted = False
            self.conn.cancel()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            greet = await self.gateway.before_greeting(self)
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
        try:
            data = await read_message_data(self._reader, size_limit=self.data_size_limit,
                                           line_limit=self.line_length_limit)
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
        self.envelope.content = self.envelope.original_content = data.content
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.offers_auth():
            if self.mode != MX:
                await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            else:
                await self.push("503 5.5.1 Authentication not enabled")
            return
        if self.gateway.too_many_auth_failures(self.conn.client_ip):
            reply = f"421 4.7.0 Too many failed authentications from [{self.conn.client_ip}], try again later"
            await self.gateway.refuse(self.session, self.envelope, Refusal.AUTH_FAILED, reply)
            await self.push(reply)
            return
        await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, _, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False)
        else:
            import base64
            import binascii

            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        try:
            _authzid, login, password = blob.split(b"\x00")
        except ValueError:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._credentials("PLAIN", login, password)

    async def auth_LOGIN(self, _, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if not isinstance(login, bytes):
                return AuthResult(success=False)
        else:
            import base64
            import binascii

            try:
                login = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False)
        return await self._credentials("LOGIN", login, password)

    async def _credentials(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        started = time.monotonic()
        name = login.decode("utf-8", "replace")
        # Password hashing takes a while on purpose: not on the event loop, not in the database threads.
        username = await asyncio.to_thread(check_login, name, password.decode("utf-8", "replace"))
        seconds = round(time.monotonic() - started, 4)
        if username:
            self.session.auth_user = username
            self.conn.extra["auth"] = {"result": "pass", "mechanism": mechanism, "user": username,
                                       "seconds": seconds}
            log.info("AUTH %s as %s from %s", mechanism, username, self.conn.client_ip)
            return AuthResult(success=True, auth_data=username)
        failures = self.gateway.limits.auth_failures.hit(self.conn.client_ip or "")
        reply = "535 5.7.8 Authentication credentials invalid"
        config = self.gateway.config()
        if config.auth_max_failures and failures >= config.auth_max_failures:
            reply = f"421 4.7.0 Too many failed authentications from [{self.conn.client_ip}], try again later"
        self.conn.extra["auth"] = {"result": "fail", "mechanism": mechanism, "login": name[:100],
                                   "failures": int(failures), "seconds": seconds}
        await self.gateway.refuse(self.session, self.envelope, Refusal.AUTH_FAILED, reply)
        return AuthResult(success=False, handled=False, message=reply)

    async def push(self, status) -> None:
        if isinstance(status, bytes):
            status = status.decode("utf-8", "replace")
        enhanced = with_enhanced_code(status)
        if enhanced.startswith("552 5.3.4"):
            await self.gateway.refuse(self.session, self.envelope, Refusal.OVER_SIZE, enhanced)
        elif enhanced.startswith("500 5.5.2 Line too long"):
            await self.gateway.refuse(self.session, self.envelope, Refusal.BAD_MESSAGE, enhanced)
        await super().push(enhanced)
        if enhanced.startswith("421") and self.transport is not None:
            # 421: the service closes the channel (RFC 5321 §4.2.2).
            self.transport.close()


class GatewayHandler:
    def __init__(self, *, policy: PolicyCache | None = None, pool: ThreadPoolExecutor | None = None):
        self.policy_cache = policy or PolicyCache()
        self.pool = pool or ThreadPoolExecutor(max_workers=settings.SMTP_DB_THREADS, thread_name_prefix="smtp-db")
        self.connections: set[GatewaySMTP] = set()
        self.transactions_in_flight = 0
        self.limits = ClientLimits()
        self.greylist = Greylist()
        self.callahead = CallAhead()
        self._resolver: CachingResolver | None = None
        self._resolver_key: tuple | None = None
        self._spf_cache: checks.ResultCache | None = None
        self._results: checks.ResultCache | None = None
        self.writer = IntakeWriter.for_database(self.run_sync)

    # --- shared pieces ---------------------------------------------------------------------------------

    @property
    def resolver(self) -> CachingResolver:
        """The caching resolver for the configured DNS (rebuilt when the DNS settings change)."""
        key = (tuple(settings.DNS_NAMESERVERS), int(settings.DNS_PORT), float(settings.DNS_TIMEOUT),
               float(settings.SMTP_DNS_CACHE_TTL))
        if self._resolver is None or key != self._resolver_key:
            self._resolver = CachingResolver(list(key[0]), key[1], key[2], ttl=key[3])
            self._spf_cache = checks.ResultCache(key[3])
            self._results = checks.ResultCache(key[3])
            self._resolver_key = key
        return self._resolver

    @property
    def spf_cache(self) -> checks.ResultCache:
        _ = self.resolver
        return self._spf_cache

    async def run_sync(self, func, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(func, *args, **kwargs))

    async def policy(self) -> Policy:
        # A snapshot younger than its TTL is used at once; an older one is reloaded in a thread.
        return self.policy_cache.fresh() or await self.run_sync(self.policy_cache.get)

    def config(self) -> CheckConfig:
        """The check configuration of the snapshot in hand (never waits on the database)."""
        policy = self.policy_cache.peek()
        return policy.checks if policy is not None else defaults()

    def our_names(self, policy: Policy | None) -> set[str]:
        names = {settings.SMTP_HOSTNAME.lower().rstrip("."), str(settings.NODE_NAME).lower().rstrip(".")}
        if policy is not None:
            names |= set(policy.domains)
        return names

    async def reverse_name(self, ip: str | None) -> str:
        if not ip or not settings.SMTP_REVERSE_DNS:
            return ""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return ""
        if address.is_loopback:
            return "localhost"
        try:
            names = await self.resolver.lookup_ptr(ip)
        except (TemporaryDNSError, ValueError, OSError):
            return ""
        return names[0] if names else ""

    async def client_name(self, session: Session) -> str:
        conn = getattr(session, "conn", None)
        if conn is not None:
            confirmed = next((r.detail.get("name") for r in conn.results if r.name == "fcrdns" and r.passed), None)
            if confirmed:
                return confirmed
        task = getattr(session, "reverse_name", None)
        if task is None:
            return ""
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout=5)
        except (TimeoutError, Exception):  # noqa: BLE001 - a name we could not learn is logged as unknown
            return ""

    def too_many_auth_failures(self, ip: str | None) -> bool:
        config = self.config()
        self.limits.auth_failure_window(config.auth_failure_window_minutes)
        return bool(config.auth_max_failures and ip and
                    self.limits.auth_failures.count(ip) >= config.auth_max_failures)

    def start_check(self, conn: Connection, name: str, reason: str, coro) -> asyncio.Task:
        return conn.start(self._guarded(name, reason, coro))

    def known(self, name: str, key, config: CheckConfig) -> CheckResult | None:
        """A result of this check for the same question, decided under the same configuration, less than
        SMTP_DNS_CACHE_TTL seconds ago: a busy MX hears from the same clients all the time."""
        _ = self.resolver
        entry = self._results.get((name, key))
        if entry is None or entry[0] != config.version:
            return None
        result = entry[1]
        return CheckResult(result.name, result.result, result.action, 0.0, {**result.detail, "cached": True},
                           result.reply, result.reason, result.score)

    def cached_check(self, conn: Connection, name: str, reason: str, key, config: CheckConfig, coro_factory):
        """The check's result from the cache, or a task that computes (and caches) it."""
        found = self.known(name, key, config)
        if found is not None:
            return found

        async def compute() -> CheckResult:
            result = await coro_factory()
            if result.result != "temperror" and result.result != "error":
                self._results.put((name, key), (config.version, result))
            return result

        return self.start_check(conn, name, reason, compute())
    @staticmethod
    async def _guarded(name: str, reason: str, coro) -> CheckResult:
        started = time.monotonic()
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken check defers the mail, it does not wave it through
            log.exception("the %s check failed", name)
            return CheckResult(name, "error", CheckAction.TEMPFAIL, time.monotonic() - started,
                               {"error": f"{type(exc).__name__}: {exc}"[:200]},
                               reply="451 4.3.0 Temporary local problem, please try again later", reason=reason)

    @staticmethod
    async def settle(pending: list[asyncio.Task], results: list[CheckResult]) -> None:
        while pending:
            results.append(await pending.pop(0))

    def checks_of(self, session: Session | None, envelope: SMTPEnvelope | None,
                  more: list[CheckResult] = ()) -> dict:
        """Message.checks: every check's result and time, the score they add, TLS, AUTH and relay notes."""
        conn = getattr(session, "conn", None)
        txn = getattr(envelope, "txn", None)
        results = list(conn.results if conn else []) + list(getattr(session, "helo_results", []) or [])
        if txn is not None:
            results += txn.results
        results += list(more)
        out: dict[str, Any] = {}
        for result in results:
            out[result.name] = result.record()
        if txn is not None:
            if txn.callahead:
                out["callahead"] = {"result": "pass" if all(v in ("exists", "unreachable (accepted)")
                                                            for v in txn.callahead.values()) else "fail",
                                    "recipients": dict(txn.callahead), "seconds": round(txn.callahead_seconds, 4)}
            if txn.greylist:
                states = set(txn.greylist.values())
                out["greylist"] = {"result": "pass" if states <= {"passed", "known", "allow-listed", "would defer"}
                                   else "deferred", "recipients": dict(txn.greylist),
                                   "seconds": round(txn.greylist_seconds, 4)}
            out.update(txn.extra)
        if conn is not None:
            out.update(conn.extra)
            if conn.mode == MX and not (txn is not None and txn.exempt):
                state = dns_checks_state()
                if state:
                    out["dns_checks"] = state
        score = total_score(results)
        if score:
            out["score"] = score
        return out

    async def refuse(self, session: Session, envelope: SMTPEnvelope | None, reason: str, reply: str,
                     recipient: str = "", *, recipients: list[str] | None = None, data: bytes | None = None,
                     more: list[CheckResult] = ()) -> str:
        """Log an attempt refused at SMTP time; a logging failure must not change the reply."""
        try:
            await self.run_sync(
                log_refusal, reason=reason, reply=reply, client_ip=getattr(session, "client_ip", None),
                client_name=await self.client_name(session), helo=session.host_name or "",
                sender=envelope_sender(envelope), recipient=recipient, recipients=recipients, data=data,
                authenticated_as=getattr(session, "auth_user", "") or "",
                checks=self.checks_of(session, envelope, more))
        except Exception:  # noqa: BLE001
            log.exception("could not log a refusal (%s)", reason)
        log.info("refused %s from %s: %s", reason, getattr(session, "client_ip", "?"), reply)
        return reply

    # --- before the greeting ---------------------------------------------------------------------------

    async def before_greeting(self, server: GatewaySMTP) -> bool:
        """Per-IP connection limit, the DNS questions about the client, the early-talker wait.
        False: the client was refused (and logged) and the connection closed."""
        conn = server.conn
        try:
            policy = await self.policy()
        except Exception:  # noqa: BLE001 - the database is down: the snapshot in hand, or the defaults
            policy = self.policy_cache.peek() or Policy()
        config = policy.checks
        ip = conn.client_ip
        conn.trusted = bool(ip) and policy.is_trusted(ip)
        if not ip or conn.trusted:
            return True
        limit = config.max_connections_per_ip
        count = self.limits.connections.get(ip, 0)
        if limit and count > limit and config.rate_limit_action != CheckAction.OFF:
            result = CheckResult("rate_limit", "exceeded", config.rate_limit_action,
                                 detail={"connections": count, "limit": limit}, reason=Refusal.RATE_LIMIT)
            if config.rate_limit_action != CheckAction.LOG:
                result.reply = f"421 4.7.0 Too many connections from [{ip}], try again later"
                return await self._refuse_connection(server, result)
            conn.results.append(result)
        if conn.mode == MX and dns_checks_enabled():
            resolver = self.resolver
            if config.fcrdns_action != CheckAction.OFF:
                self._collect(conn.pending, conn.results, self.cached_check(
                    conn, "fcrdns", Refusal.REVERSE_DNS, ip, config, lambda: checks.fcrdns(resolver, ip, config)))
            if config.zones:
                self._collect(conn.pending, conn.results, self.cached_check(
                    conn, "dnsbl", Refusal.RBL, ip, config, lambda: checks.dnsbl(resolver, ip, config)))
        action = config.early_talker_action
        if conn.mode == MX and action != CheckAction.OFF:
            started = time.monotonic()
            delay = float(settings.SMTP_GREET_DELAY)
            waited = delay > 0 and ip not in self.limits.greeted
            if waited:
                await asyncio.sleep(delay)
            if server.client_talked():
                result = decide("early_talker", "fail", action, seconds=time.monotonic() - started,
                                reason=Refusal.EARLY_TALKER, waited=delay if waited else 0,
                                reject="554 5.5.1 Protocol error: you talked before my greeting",
                                tempfail="421 4.7.0 Protocol error: you talked before my greeting")
                if result.refuses:
                    return await self._refuse_connection(server, result)
                conn.results.append(result)
            elif waited:
                self.limits.greeted.add(ip)
                conn.results.append(CheckResult("early_talker", "pass", seconds=time.monotonic() - started,
                                                detail={"waited": delay}))
        return True

    @staticmethod
    def _collect(pending: list, results: list, found) -> None:
        (results if isinstance(found, CheckResult) else pending).append(found)

    async def _refuse_connection(self, server: GatewaySMTP, result: CheckResult) -> bool:
        server.conn.results.append(result)
        await self.refuse(server.session, server.envelope, result.reason, result.reply)
        if server.transport is not None and not server.transport.is_closing():
            await server.push(result.reply)
            if server.transport is not None:
                server.transport.close()
        return False

    # --- HELO / EHLO -----------------------------------------------------------------------------------

    def _start_helo_checks(self, server: GatewaySMTP, session: Session, hostname: str) -> None:
        session.helo_results = []
        session.helo_pending = []
        conn = server.conn
        if conn.mode != MX or conn.trusted or not conn.client_ip:
            return
        policy = self.policy_cache.peek()
        config = policy.checks if policy is not None else defaults()
        if config.values.get("helo_impersonation_action", CheckAction.OFF) != CheckAction.OFF:
            session.helo_results.append(checks.helo_impersonation(
                hostname, conn.client_ip, conn.local_ip, self.our_names(policy), config))
        if config.values.get("helo_action", CheckAction.OFF) != CheckAction.OFF:
            resolver = self.resolver if dns_checks_enabled() else None
            self._collect(session.helo_pending, session.helo_results, self.cached_check(
                conn, "helo", Refusal.HELO, (hostname, conn.client_ip, resolver is not None), config,
                lambda: checks.helo(resolver, hostname, conn.client_ip, config)))

    async def handle_HELO(self, server, session, envelope, hostname):
        session.host_name = hostname
        self._start_helo_checks(server, session, hostname)
        return f"250 {server.hostname}"

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self._start_helo_checks(server, session, hostname)
        last = responses.pop()  # "250 HELP"
        offers_auth = server.offers_auth()
        responses = [line for line in responses if offers_auth or not line.startswith("250-AUTH")]
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]
        return responses

    # --- MAIL FROM -------------------------------------------------------------------------------------

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        conn: Connection = session.conn
        txn: Transaction = envelope.txn
        if conn.mode != MX and not session.authenticated:
            return await self.refuse(session, envelope, Refusal.AUTH_FAILED, "530 5.7.0 Authentication required")
        try:
            parsed = parse_address(address, allow_null=True)
        except AddressError as exc:
            reply = f"{'553' if exc.code.startswith('5.1') else '550'} {exc.code} {exc.text}"
            return await self.refuse(session, envelope, Refusal.BAD_SENDER, reply)
        if parsed.domain and "." not in parsed.domain:
            reply = f"550 5.1.8 Sender domain {parsed.domain} is not fully qualified"
            return await self.refuse(session, envelope, Refusal.BAD_SENDER, reply)
        policy = self.policy_cache.peek()
        config = policy.checks if policy is not None else defaults()
        ip = conn.client_ip
        txn.exempt = bool(session.authenticated or conn.trusted)
        limit = config.values.get("max_messages_per_minute", 0)
        if ip and not conn.trusted and limit and config.rate_limit_action != CheckAction.OFF:
            rate = self.limits.messages.hit(ip)
            if rate > limit:
                result = CheckResult("rate_limit", "exceeded", config.rate_limit_action, reason=Refusal.RATE_LIMIT,
                                     detail={"messages_per_minute": round(rate, 1), "limit": limit})
                if config.rate_limit_action != CheckAction.LOG:
                    result.reply = f"421 4.7.0 Too many messages from [{ip}], slow down and try again later"
                    return await self.refuse(session, envelope, Refusal.RATE_LIMIT, result.reply, more=[result])
                txn.results.append(result)
        # aiosmtpd takes an empty mail_from for "no MAIL yet": the null sender is kept as "<>".
        envelope.mail_from = str(parsed) or "<>"
        envelope.mail_options.extend(mail_options)
        if not txn.exempt and conn.mode == MX and ip and dns_checks_enabled():
            sender, resolver = str(parsed), self.resolver
            if parsed.domain and config.sender_domain_action != CheckAction.OFF:
                self._collect(txn.pending, txn.results, self.cached_check(
                    conn, "sender_domain", Refusal.CANT_RESOLVE, sender.lower(), config,
                    lambda: checks.sender_domain(resolver, sender, parsed.domain, config)))
            if any(config.values.get(f"spf_{r}_action") != CheckAction.OFF for r in checks.SPF_RESULT_NAMES):
                helo = session.host_name or ""
                found = self.spf_cache.get(checks.spf_key(ip, sender, helo))
                if found is not None:
                    txn.spf = found
                    txn.added_headers.append(found.header + "\r\n")
                    result = checks.spf_outcome(found, ip, sender, helo, config, 0.0)
                    result.detail["cached"] = True
                    txn.results.append(result)
                else:
                    txn.pending.append(self.start_check(conn, "spf", Refusal.SPF,
                                                        self._spf(txn, ip, sender, helo, config)))
        return "250 2.1.0 Sender OK"

    async def _spf(self, txn: Transaction, ip: str, sender: str, helo: str, config: CheckConfig) -> CheckResult:
        result, found = await checks.spf(self.resolver, ip, sender, helo, config, self.spf_cache)
        if found is not None:
            txn.spf = found
            txn.added_headers.append(found.header + "\r\n")
        return result

    # --- RCPT TO ---------------------------------------------------------------------------------------

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        policy = await self.policy()
        txn: Transaction = envelope.txn
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
        trusted = policy.is_trusted(session.client_ip)
        txn.exempt = bool(session.authenticated or trusted)
        if session.authenticated:
            txn.extra["relay"] = "authenticated"
        elif trusted:
            txn.extra["trusted"] = True
        local = policy.is_local_domain(parsed.domain)
        always = local and parsed.local.lower() in ("postmaster", "abuse")  # RFC 5321 §4.5.1, RFC 2142
        if local:
            mode = policy.domains[parsed.domain]
            if mode == Domain.RecipientCheck.LIST and not always and recipient.lower() not in policy.valid_recipients:
                return await self.refuse(session, envelope, Refusal.UNKNOWN_USER,
                                         f"550 5.1.1 <{recipient}>: Recipient address rejected: User unknown",
                                         recipient=recipient)
        elif session.authenticated:
            pass
        elif trusted:
            txn.extra["relay"] = "trusted network"
        else:
            return await self.refuse(session, envelope, Refusal.RELAY_DENIED,
                                     f"550 5.7.1 <{recipient}>: Relay access denied", recipient=recipient)
        allowed = False
        if local and not always and not txn.exempt:
            refused, allowed = await self._policy_refusal(session, envelope, policy.checks, recipient)
            if refused:
                return refused
        if local and not always and policy.domains[parsed.domain] == Domain.RecipientCheck.CALLAHEAD:
            refused = await self._callahead(session, envelope, policy, recipient, parsed.domain)
            if refused:
                return refused
        if local and not always and not txn.exempt and not allowed:
            refused = await self._greylist(session, envelope, policy.checks, recipient)
            if refused:
                return refused
        envelope.rcpt_tos.append(recipient)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def _policy_refusal(self, session, envelope, config: CheckConfig, recipient: str) -> tuple[str, bool]:
        """The block list, then the results of the connection, HELO and sender checks: (reply, allow-listed)."""
        conn: Connection = session.conn
        txn: Transaction = envelope.txn
        sender = envelope_sender(envelope)
        allowed = False
        if config.list_patterns and any(sender_matches(p, sender, conn.client_ip) for p in config.list_patterns):
            started = time.monotonic()
            entry = await self.run_sync(list_decision, sender, conn.client_ip, recipient)
            if entry is not None and entry.kind == entry.Kind.BLOCK:
                shown = sender or "<>"
                result = decide("blocked_sender", "blocked", config.blocked_sender_action,
                                seconds=time.monotonic() - started, reason=Refusal.BLOCKED_SENDER,
                                entry=f"{entry.scope} {entry.sender}",
                                reject=f"554 5.7.1 <{shown}>: Sender address rejected: Access denied",
                                tempfail=f"450 4.7.1 <{shown}>: Sender address rejected: Access denied")
                txn.results = [r for r in txn.results if r.name != "blocked_sender"] + [result]
                if result.refuses:
                    return await self.refuse(session, envelope, result.reason, result.reply, recipient), False
            elif entry is not None:
                allowed = True
                txn.extra["allow_listed"] = f"{entry.scope} {entry.sender}"
        await self.settle(conn.pending, conn.results)
        await self.settle(session.helo_pending, session.helo_results)
        await self.settle(txn.pending, txn.results)
        for result in (*conn.results, *session.helo_results, *txn.results):
            if result.refuses:
                return await self.refuse(session, envelope, result.reason, result.reply, recipient), allowed
        return "", allowed

    async def _callahead(self, session, envelope, policy: Policy, recipient: str, domain: str) -> str:
        txn: Transaction = envelope.txn
        route = await self.run_sync(_route_of, domain)
        if route is None:
            return ""
        config = policy.checks
        started = time.monotonic()
        answer = await asyncio.to_thread(self.callahead.verify, recipient, route[0], route[1],
                                         positive_hours=config.callahead_positive_hours,
                                         negative_minutes=config.callahead_negative_minutes)
        txn.callahead_seconds += time.monotonic() - started
        if answer.state == "unknown_user":
            txn.callahead[recipient] = "unknown user" + (" (remembered)" if answer.cached else "")
            return await self._refuse_recipient(session, envelope, txn.callahead, Refusal.UNKNOWN_USER,
                                                f"550 5.1.1 <{recipient}>: Recipient address rejected: User unknown",
                                                recipient)
        if answer.state == "unreachable":
            if config.callahead_unreachable_action == CheckAction.TEMPFAIL:
                txn.callahead[recipient] = f"unreachable: {answer.reply}"
                return await self._refuse_recipient(session, envelope, txn.callahead, Refusal.UNKNOWN_USER,
                                                    f"451 4.4.3 <{recipient}>: Recipient address rejected: "
                                                    "unverified address, try again later", recipient)
            txn.callahead[recipient] = "unreachable (accepted)"
            return ""
        txn.callahead[recipient] = "exists"
        return ""

    async def _greylist(self, session, envelope, config: CheckConfig, recipient: str) -> str:
        txn: Transaction = envelope.txn
        action = config.greylisting_action
        if action == CheckAction.OFF or not settings.SMTP_GREYLISTING or not session.client_ip:
            return ""
        started = time.monotonic()
        if self.greylist.known(session.client_ip, envelope_sender(envelope), recipient,
                               ipv4_prefix=config.greylist_ipv4_prefix, ipv6_prefix=config.greylist_ipv6_prefix):
            txn.greylist[recipient] = "known"
            txn.greylist_seconds += time.monotonic() - started
            return ""
        verdict = await self.run_sync(
            self.greylist.check, session.client_ip, envelope_sender(envelope), recipient,
            delay=config.greylist_delay, retry_window_hours=config.greylist_retry_window_hours,
            lifetime_days=config.greylist_lifetime_days, ipv4_prefix=config.greylist_ipv4_prefix,
            ipv6_prefix=config.greylist_ipv6_prefix)
        txn.greylist_seconds += time.monotonic() - started
        if verdict.passed:
            txn.greylist[recipient] = verdict.state
            return ""
        if action == CheckAction.LOG:
            txn.greylist[recipient] = "would defer"
            return ""
        txn.greylist[recipient] = verdict.state
        return await self._refuse_recipient(session, envelope, txn.greylist, Refusal.GREYLISTED,
                                            f"451 4.7.1 <{recipient}>: Recipient address rejected: Greylisted, "
                                            f"please try again in {verdict.wait} seconds", recipient)

    async def _refuse_recipient(self, session, envelope, states: dict, reason: str, reply: str, recipient: str) -> str:
        """Log the refusal of one recipient with its state, then forget the state: the message, if the other
        recipients make one, records only the recipients it has."""
        try:
            return await self.refuse(session, envelope, reason, reply, recipient=recipient)
        finally:
            states.pop(recipient, None)

    # --- DATA ------------------------------------------------------------------------------------------

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content or b""
        conn: Connection = session.conn
        txn: Transaction = envelope.txn
        added = ""
        more: list[CheckResult] = []
        if not txn.exempt and conn.mode == MX and dns_checks_enabled():
            config = self.config()
            await self.settle(txn.pending, txn.results)  # the SPF result, for DMARC
            wanted = any(config.values.get(f"{name}_action", CheckAction.OFF) != CheckAction.OFF
                         for name in ("dkim", "dmarc_reject", "dmarc_quarantine"))
            if wanted or txn.spf is not None:
                try:
                    more, header = await self._authenticate(data, txn, config)
                except Exception as exc:  # noqa: BLE001
                    log.exception("DKIM/DMARC failed")
                    more, header = [CheckResult("dmarc", "error", detail={"error": str(exc)[:200]})], ""
                for result in more:
                    if result.refuses:
                        return await self.refuse(session, envelope, result.reason, result.reply,
                                                 recipients=list(envelope.rcpt_tos), data=data, more=more)
                added += header
        added = "".join(txn.added_headers) + added
        check_record = self.checks_of(session, envelope, more)
        if server.is_tls:
            check_record["tls"] = True
            ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
            if ssl_object is not None:
                check_record["tls_cipher"] = f"{ssl_object.version()} {ssl_object.cipher()[0]}"
        intake = Envelope(
            client_ip=session.client_ip, client_name=await self.client_name(session),
            helo=session.host_name or "", sender=envelope_sender(envelope), recipients=list(envelope.rcpt_tos),
            mail_options=[o for o in envelope.mail_options if o.upper().startswith(("BODY=", "SMTPUTF8"))],
            authenticated_as=getattr(session, "auth_user", "") or "", added_headers=added, checks=check_record)
        try:
            message = await self.writer.store(intake, data)
        except (DatabaseError, InterfaceError, OSError) as exc:
            # Not stored means not accepted: the client keeps the message and tries again.
            log.error("could not store a message from %s: %s", session.client_ip, exc)
            return "451 4.3.0 Temporary local problem, please try again later"
        log.info("queued %s from <%s> to %d recipient(s), %d bytes", message.queue_id, intake.sender,
                 len(intake.recipients), len(data))
        return f"250 2.0.0 Ok: queued as {message.queue_id}"

    async def _authenticate(self, data: bytes, txn: Transaction, config: CheckConfig) -> tuple[list, str]:
        """DKIM and DMARC. An unsigned message whose DMARC records the resolver has (or can fetch here,
        without blocking) is judged on the event loop; a signed one (key lookups, RSA) in a thread."""
        resolver = self.resolver
        domains = checks.header_from_domains(data)
        inline = resolver.cache.ttl > 0 and not checks.is_signed(data)
        if inline:
            try:
                for domain in domains[:5]:
                    names = checks.dmarc_names(domain)
                    found = await resolver.lookup_txt(names[0])
                    if not any(r.replace(" ", "").startswith("v=DMARC1") for r in found) and len(names) > 1:
                        await resolver.lookup_txt(names[1])
            except TemporaryDNSError:
                inline = False  # not in the cache: the evaluation would block on DNS
        if inline:
            return checks.authenticate_message(data, txn.spf, resolver, config, settings.SMTP_HOSTNAME, domains)
        return await asyncio.to_thread(checks.authenticate_message, data, txn.spf, resolver, config,
                                       settings.SMTP_HOSTNAME, domains)

    async def handle_exception(self, error: Exception) -> str:
        log.exception("SMTP session error", exc_info=error)
        return "451 4.3.0 Local error in processing"


def _route_of(domain: str) -> tuple[str, int] | None:
    from django.db import close_old_connections

    close_old_connections()
    found = Domain.objects.filter(name=domain, active=True).select_related("route").first()
    return (found.route.host, found.route.port) if found else None


def make_server_factory(handler: GatewayHandler, *, tls_context=None, max_size: int | None = None, mode: str = MX,
                        require_starttls: bool = False):
    def factory() -> GatewaySMTP:
        # Only the snapshot in hand: the event loop never waits on the database (handle_RCPT reloads it).
        policy = handler.policy_cache.peek()
        size = policy.max_message_size if policy else (max_size or 25 * 1024 * 1024)
        return GatewaySMTP(handler, mode=mode, hostname=settings.SMTP_HOSTNAME, ident="Mailgate ESMTP",
                           data_size_limit=size, timeout=settings.SMTP_DATA_TIMEOUT, tls_context=tls_context,
                           require_starttls=require_starttls)

    return factory


async def serve(host: str, port: int, *, submission: tuple[str, int] | None = None,
                smtps: tuple[str, int] | None = None, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None, grace: float = 30.0) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`), then finish the transactions in flight and return.

    `host`/`port`: the inbound (MX) listener; `submission`: STARTTLS + AUTH (587); `smtps`: implicit TLS +
    AUTH (465).
    """
    loop = asyncio.get_running_loop()
    handler = GatewayHandler()
    await handler.policy()  # fail early, with a clear error, when the database is unreachable at start
    context = None
    if settings.SMTP_STARTTLS or submission or smtps:
        try:
            context = await loop.run_in_executor(None, tls_config.server_context)
        except (OSError, ssl.SSLError, ValueError) as exc:
            if submission or smtps:
                raise RuntimeError(f"TLS is needed for submission, and the certificate is unusable: {exc}") from exc
            log.error("STARTTLS is off: the certificate is unusable: %s", exc)
    servers = [await loop.create_server(
        make_server_factory(handler, tls_context=context if settings.SMTP_STARTTLS else None, mode=MX),
        host=host, port=port, reuse_address=True)]
    if submission:
        servers.append(await loop.create_server(
            make_server_factory(handler, tls_context=context, mode=SUBMISSION, require_starttls=True),
            host=submission[0], port=submission[1], reuse_address=True))
    if smtps:
        servers.append(await loop.create_server(make_server_factory(handler, mode=SMTPS), host=smtps[0],
                                                port=smtps[1], reuse_address=True, ssl=context))
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    log.info("SMTP listening on %s:%s as %s%s", host, port, settings.SMTP_HOSTNAME,
             " (STARTTLS)" if context is not None and settings.SMTP_STARTTLS else "")
    if submission:
        log.info("submission (STARTTLS, AUTH) on %s:%s", *submission)
    if smtps:
        log.info("submission over implicit TLS (AUTH) on %s:%s", *smtps)
    state = dns_checks_state()
    if state:
        log.warning("DNS-based checks are %s", state)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping: no new connections; finishing %d transaction(s) in flight", handler.transactions_in_flight)
    for server in servers:
        server.close()
    deadline = loop.time() + grace
    while handler.transactions_in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for connection in list(handler.connections):
        if connection.transport is not None:
            connection.transport.write(b"421 4.3.2 Service shutting down\r\n")
            connection.transport.close()
    for server in servers:
        await server.wait_closed()
    await handler.writer.close()
    close_pool_connections(handler.pool)
    log.info("SMTP stopped")


def close_pool_connections(pool: ThreadPoolExecutor) -> None:
    """Close the database connection of every pool thread, then the pool.

    Connections are per thread; a barrier makes each of the pool's threads take exactly one of the
    closing jobs, so none is left open (a database being dropped or failed over waits for them).
    """
    from django.db import connections

    size = pool._max_workers
    barrier = threading.Barrier(size, timeout=5)

    def close() -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        connections.close_all()

    for _ in range(size):
        pool.submit(close)
    pool.shutdown(wait=True)
