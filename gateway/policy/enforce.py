"""The SMTP-time checks as the server enforces them, command by command (docs/smtp-policy.md).

The checks run where their data arrives and are enforced at RCPT TO, as Postfix does with
smtpd_delay_reject: the DNS questions about the client start at connect, about the HELO name at EHLO, about
the sender at MAIL, all in the background while the client goes on; each RCPT awaits them and refuses with
the first one whose action refuses. So every refusal is logged with its sender and recipient, and a client
that mishandles a refused greeting or MAIL still gets a clean answer. Exceptions: per-IP limits and early
talkers (before the greeting), the message rate (at MAIL), DKIM, DMARC and the protected-sender check
(after DATA). Trusted networks and authenticated users skip the checks (not the size and syntax rules);
authenticated mail is held to its login's addresses instead (gateway.policy.senders: the envelope sender at
MAIL, the header From and Sender after DATA). postmaster@ and abuse@ of our domains skip the RCPT-time
refusals (RFC 5321 §4.5.1).

`Enforcer` is shared by every connection of one SMTP server; the per-connection and per-transaction state
lives in gateway.policy.state. Every refusal is logged (gateway.intake.store.log_refusal) before it is
answered.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.conf import settings
from django.db import close_old_connections

from gateway import maillog
from gateway.access import SenderRights
from gateway.directory.recipients import DirectoryRecipients
from gateway.intake.store import log_refusal
from gateway.mailauth.dns import TemporaryDNSError
from gateway.models import CheckAction, Directory, Domain, Message

from . import checks, senders
from .callahead import CallAhead
from .config import CheckConfig, ServerConfig, ServerConfigCache, defaults, dns_checks_enabled, dns_checks_state
from .dnscache import CachingResolver
from .greylist import Greylist
from .limits import ClientLimits, shared_counts
from .lists import list_decision, sender_matches
from .results import CheckResult, decide, total_score
from .state import MX, Connection, Transaction, envelope_sender

log = logging.getLogger(__name__)
Refusal = Message.Refusal


class Enforcer:
    def __init__(self, config_cache: ServerConfigCache, run_sync: Callable[..., Awaitable]):
        self.config_cache = config_cache
        self.run_sync = run_sync
        # Shared with every node through Redis when configured (SMTP_SHARED_LIMITS_URL), else this node's own.
        self.limits = ClientLimits(shared=shared_counts(settings.SMTP_SHARED_LIMITS_URL,
                                                        settings.SMTP_SHARED_LIMITS_TIMEOUT))
        self._background: set[asyncio.Task] = set()
        self.greylist = Greylist()
        self.callahead = CallAhead()
        self.directory = DirectoryRecipients()
        self._directory_threads: ThreadPoolExecutor | None = None
        self._resolver: CachingResolver | None = None
        self._resolver_key: tuple | None = None
        self._spf_cache: checks.ResultCache | None = None
        self._results: checks.ResultCache | None = None

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

    async def server_config(self) -> ServerConfig:
        # A snapshot younger than its TTL is used at once; an older one is reloaded in a thread.
        return self.config_cache.fresh() or await self.run_sync(self.config_cache.get)

    def config(self) -> CheckConfig:
        """The check configuration of the snapshot in hand (never waits on the database)."""
        snapshot = self.config_cache.peek()
        return snapshot.checks if snapshot is not None else defaults()

    def our_names(self, snapshot: ServerConfig | None) -> set[str]:
        names = {settings.SMTP_HOSTNAME.lower().rstrip("."), str(settings.NODE_NAME).lower().rstrip(".")}
        if snapshot is not None:
            names |= set(snapshot.domains)
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

    async def client_name(self, session) -> str:
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

    @staticmethod
    def _collect(pending: list, results: list, found) -> None:
        (results if isinstance(found, CheckResult) else pending).append(found)

    def checks_of(self, session, envelope, more: list[CheckResult] = ()) -> dict:
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
            if txn.directory:
                out["directory"] = {"result": "pass" if all(v.startswith(("found", "unreachable (accepted)"))
                                                            for v in txn.directory.values()) else "fail",
                                    "recipients": dict(txn.directory), "seconds": round(txn.directory_seconds, 4)}
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

    async def refuse(self, session, envelope, reason: str, reply: str, recipient: str = "", *,
                     recipients: list[str] | None = None, data: bytes | None = None,
                     more: list[CheckResult] = (), sender: str | None = None, command: str = "") -> str:
        """Log an attempt refused at SMTP time; a logging failure must not change the reply. `sender`: the
        envelope sender to log when the envelope does not hold it yet (a refused MAIL). `command`: the SMTP
        command refused, for the Postfix-style line (CONNECT, MAIL, RCPT, DATA, AUTH), when not the one the
        other arguments say; "SASL" for failed credentials, which have a line of their own (gateway.smtp.login)."""
        name = await self.client_name(session)
        if not command:
            command = ("DATA" if recipients is not None or data is not None else "RCPT" if recipient
                       else "MAIL" if sender is not None else "CONNECT")
        if command != "SASL":
            logged_sender = envelope_sender(envelope) if sender is None else sender
            maillog.rejected(command, client_name=name, client_ip=getattr(session, "client_ip", None), reply=reply,
                             sender=None if command == "CONNECT" else logged_sender,
                             recipients=[recipient] if recipient else list(recipients or []),
                             helo=session.host_name or "")
        try:
            await self.run_sync(
                log_refusal, reason=reason, reply=reply, client_ip=getattr(session, "client_ip", None),
                client_name=name, helo=session.host_name or "",
                sender=envelope_sender(envelope) if sender is None else sender, recipient=recipient,
                recipients=recipients, data=data,
                authenticated_as=getattr(session, "auth_user", "") or "",
                checks=self.checks_of(session, envelope, more))
        except Exception:  # noqa: BLE001
            log.exception("could not log a refusal (%s)", reason)
        log.info("refused %s from %s: %s", reason, getattr(session, "client_ip", "?"), reply)
        return reply

    # --- before the greeting ---------------------------------------------------------------------------

    async def before_greeting(self, server) -> bool:
        """Per-IP connection limit, the DNS questions about the client, the early-talker wait.
        False: the client was refused (and logged) and the connection closed."""
        conn = server.conn
        try:
            snapshot = await self.server_config()
        except Exception:  # noqa: BLE001 - the database is down: the snapshot in hand, or the defaults
            snapshot = self.config_cache.peek() or ServerConfig()
        config = snapshot.checks
        ip = conn.client_ip
        conn.trusted = bool(ip) and snapshot.is_trusted(ip)
        if not ip or conn.trusted:
            return True
        limit = config.max_connections_per_ip
        count = self.limits.connections.get(ip, 0)
        if limit and config.rate_limit_action != CheckAction.OFF:
            member = self.limits.shared.connection_member(id(conn)) if self.limits.shared is not None else ""
            count, shared = await self.limits.connection_count(ip, member)
            conn.shared_member = member if shared else ""
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

    async def _refuse_connection(self, server, result: CheckResult) -> bool:
        server.conn.results.append(result)
        await self.refuse(server.session, server.envelope, result.reason, result.reply)
        if server.transport is not None and not server.transport.is_closing():
            await server.push(result.reply)
            if server.transport is not None:
                server.transport.close()
        return False

    # --- HELO / EHLO -----------------------------------------------------------------------------------

    def at_helo(self, conn: Connection, session, hostname: str) -> None:
        """Start the checks of the HELO name (their results are awaited at RCPT)."""
        session.helo_results = []
        session.helo_pending = []
        if conn.mode != MX or conn.trusted or not conn.client_ip:
            return
        snapshot = self.config_cache.peek()
        config = snapshot.checks if snapshot is not None else defaults()
        if config.values.get("helo_impersonation_action", CheckAction.OFF) != CheckAction.OFF:
            session.helo_results.append(checks.helo_impersonation(
                hostname, conn.client_ip, conn.local_ip, self.our_names(snapshot), config))
        if config.values.get("helo_action", CheckAction.OFF) != CheckAction.OFF:
            resolver = self.resolver if dns_checks_enabled() else None
            self._collect(session.helo_pending, session.helo_results, self.cached_check(
                conn, "helo", Refusal.HELO, (hostname, conn.client_ip, resolver is not None), config,
                lambda: checks.helo(resolver, hostname, conn.client_ip, config)))

    # --- MAIL FROM -------------------------------------------------------------------------------------

    async def at_mail(self, session, envelope, sender: str) -> str:
        """The message rate of the client, and for authenticated mail whether its login owns the envelope
        sender (`sender`, parsed; '' for the null sender): a refusal reply (logged), or '' to go on."""
        conn: Connection = session.conn
        txn: Transaction = envelope.txn
        config = self.config()
        ip = conn.client_ip
        txn.exempt = bool(session.authenticated or conn.trusted)
        limit = config.values.get("max_messages_per_minute", 0)
        if ip and not conn.trusted and limit and config.rate_limit_action != CheckAction.OFF:
            rate = await self.limits.message(ip)
            if rate > limit:
                result = CheckResult("rate_limit", "exceeded", config.rate_limit_action, reason=Refusal.RATE_LIMIT,
                                     detail={"messages_per_minute": round(rate, 1), "limit": limit})
                if config.rate_limit_action != CheckAction.LOG:
                    result.reply = f"421 4.7.0 Too many messages from [{ip}], slow down and try again later"
                    return await self.refuse(session, envelope, Refusal.RATE_LIMIT, result.reply, more=[result],
                                             sender=sender)
                txn.results.append(result)
        if session.authenticated:
            return await self._sender_not_owned(session, envelope, sender)
        return ""

    async def sender_rights(self, session) -> SenderRights:
        """What the session's login may send as: read once per session, in the thread pool."""
        username = getattr(session, "auth_user", "") or ""
        held = getattr(session, "sender_rights", None)
        if held is None or held.username != username:
            held = session.sender_rights = await self.run_sync(senders.load_rights, username)
        return held

    async def _sender_not_owned(self, session, envelope, sender: str) -> str:
        try:
            rights = await self.sender_rights(session)
        except Exception:  # noqa: BLE001 - without the login's addresses nothing is owned: defer, do not guess
            log.exception("could not read the addresses of login %s", getattr(session, "auth_user", ""))
            return await self.refuse(session, envelope, Refusal.SENDER_NOT_OWNED,
                                     "451 4.3.0 Temporary local problem, please try again later", sender=sender)
        result = senders.envelope_sender_check(rights, sender)
        if result is None:
            return ""
        return await self.refuse(session, envelope, result.reason, result.reply, sender=sender, more=[result])

    def start_sender_checks(self, session, envelope, sender: str, sender_domain: str) -> None:
        """Start the checks of the envelope sender (its domain, SPF); their results are awaited at RCPT."""
        conn: Connection = session.conn
        txn: Transaction = envelope.txn
        ip = conn.client_ip
        if txn.exempt or conn.mode != MX or not ip or not dns_checks_enabled():
            return
        config = self.config()
        resolver = self.resolver
        if sender_domain and config.sender_domain_action != CheckAction.OFF:
            self._collect(txn.pending, txn.results, self.cached_check(
                conn, "sender_domain", Refusal.CANT_RESOLVE, sender.lower(), config,
                lambda: checks.sender_domain(resolver, sender, sender_domain, config)))
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

    async def _spf(self, txn: Transaction, ip: str, sender: str, helo: str, config: CheckConfig) -> CheckResult:
        result, found = await checks.spf(self.resolver, ip, sender, helo, config, self.spf_cache)
        if found is not None:
            txn.spf = found
            txn.added_headers.append(found.header + "\r\n")
        return result

    # --- RCPT TO ---------------------------------------------------------------------------------------

    async def at_rcpt(self, session, envelope, snapshot: ServerConfig, recipient) -> str:
        """Whether this (parsed) recipient is taken: relaying, the recipient check of our domains, the
        results of the connection, HELO and sender checks, the block list, the call-ahead, greylisting.
        A refusal reply (logged), or '' to accept it."""
        txn: Transaction = envelope.txn
        address, domain = str(recipient), recipient.domain
        trusted = snapshot.is_trusted(session.client_ip)
        txn.exempt = bool(session.authenticated or trusted)
        if session.authenticated:
            txn.extra["relay"] = "authenticated"
        elif trusted:
            txn.extra["trusted"] = True
        local = snapshot.is_local_domain(domain)
        always = local and recipient.local.lower() in ("postmaster", "abuse")  # RFC 5321 §4.5.1, RFC 2142
        if local:
            mode = snapshot.domains[domain]
            if mode == Domain.RecipientCheck.LIST and not always and address.lower() not in snapshot.valid_recipients:
                return await self.refuse(session, envelope, Refusal.UNKNOWN_USER,
                                         f"550 5.1.1 <{address}>: Recipient address rejected: User unknown",
                                         recipient=address)
        elif session.authenticated:
            pass
        elif trusted:
            txn.extra["relay"] = "trusted network"
        else:
            return await self.refuse(session, envelope, Refusal.RELAY_DENIED,
                                     f"550 5.7.1 <{address}>: Relay access denied", recipient=address)
        allowed = False
        if local and not always and not txn.exempt:
            refused, allowed = await self._policy_refusal(session, envelope, snapshot.checks, address)
            if refused:
                return refused
        if local and not always and snapshot.domains[domain] == Domain.RecipientCheck.CALLAHEAD:
            refused = await self._callahead(session, envelope, snapshot, address, domain)
            if refused:
                return refused
        if local and not always and snapshot.domains[domain] == Domain.RecipientCheck.LDAP:
            refused = await self._in_directory(session, envelope, address, domain)
            if refused:
                return refused
        if local and not always and not txn.exempt and not allowed:
            refused = await self._greylist(session, envelope, snapshot.checks, address)
            if refused:
                return refused
        return ""

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

    async def _callahead(self, session, envelope, snapshot: ServerConfig, recipient: str, domain: str) -> str:
        txn: Transaction = envelope.txn
        route = await self.run_sync(_route_of, domain)
        if route is None:
            return ""
        config = snapshot.checks
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

    async def _in_directory(self, session, envelope, recipient: str, domain: str) -> str:
        """The recipient check of a domain whose check is "ldap": 550 5.1.1 for an address its directory does
        not hold, 451 4.4.3 (or accepted, as the directory says) when the directory cannot be asked."""
        txn: Transaction = envelope.txn
        started = time.monotonic()
        if self._directory_threads is None:
            self._directory_threads = ThreadPoolExecutor(max_workers=max(1, int(settings.SMTP_DIRECTORY_THREADS)),
                                                         thread_name_prefix="directory")
        # Threads of its own: a directory that answers slowly holds these, not those of the other checks.
        answer = await asyncio.get_running_loop().run_in_executor(self._directory_threads, self.directory.verify,
                                                                  recipient, domain)
        txn.directory_seconds += time.monotonic() - started
        remembered = " (remembered)" if answer.cached else ""
        if answer.state == "unknown_user":
            txn.directory[recipient] = f"not in {answer.directory}{remembered}"
            return await self._refuse_recipient(session, envelope, txn.directory, Refusal.UNKNOWN_USER,
                                                f"550 5.1.1 <{recipient}>: Recipient address rejected: User unknown",
                                                recipient)
        if answer.state == "unreachable":
            log.warning("recipient check of <%s>: %s", recipient, answer.detail)
            if answer.unreachable_action == Directory.Unreachable.ACCEPT:
                txn.directory[recipient] = f"unreachable (accepted): {answer.detail}"
                return ""
            txn.directory[recipient] = f"unreachable: {answer.detail}"
            return await self._refuse_recipient(session, envelope, txn.directory, Refusal.UNKNOWN_USER,
                                                f"451 4.4.3 <{recipient}>: Recipient address rejected: the "
                                                "directory cannot be asked, try again later", recipient)
        txn.directory[recipient] = f"found in {answer.directory}{remembered}"
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

    async def at_data(self, session, envelope, data: bytes) -> tuple[str, list[CheckResult], str]:
        """After DATA: for authenticated mail, whether its login owns the header From and Sender (and may use
        the null sender); for mail from outside, DKIM, DMARC and the protected-sender check. (A refusal reply,
        logged, or ''; their results; the header they add.)"""
        conn: Connection = session.conn
        txn: Transaction = envelope.txn
        owned: list[CheckResult] = []
        if session.authenticated:
            refused, result = await self._headers_not_owned(session, envelope, data)
            if refused:
                return refused, [result] if result else [], ""
            owned.append(result)
        if txn.exempt or conn.mode != MX or not dns_checks_enabled():
            return "", owned, ""
        config = self.config()
        await self.settle(txn.pending, txn.results)  # the SPF result, for DMARC
        wanted = any(config.values.get(f"{name}_action", CheckAction.OFF) != CheckAction.OFF
                     for name in ("dkim", "dmarc_reject", "dmarc_quarantine"))
        protecting = config.action("protected_sender") != CheckAction.OFF
        if not wanted and txn.spf is None and not protecting:
            return "", owned, ""
        try:
            domains = checks.header_from_domains(data)
        except Exception:  # noqa: BLE001 - a From no parser can read names no domain (DMARC: none)
            log.exception("could not read the From domains")
            domains = []
        protected: list[str] = []
        if protecting:
            snapshot = self.config_cache.peek()
            protected = senders.claimed_protected_domains(
                envelope_sender(envelope), domains, snapshot.domains if snapshot is not None else ())
        if not wanted and txn.spf is None and not protected:
            return "", owned, ""
        try:
            more, header = await self._authenticate(data, txn, config, domains, protected, session.client_ip)
        except Exception as exc:  # noqa: BLE001
            log.exception("DKIM/DMARC failed")
            more, header = [CheckResult("dmarc", "error", detail={"error": str(exc)[:200]})], ""
            if protected:  # a claim of our domain that could not be checked is deferred where the action refuses
                more.append(senders.protected_sender_unchecked(protected, config, str(exc)))
        more = owned + more
        for result in more:
            if result.refuses:
                return await self.refuse(session, envelope, result.reason, result.reply,
                                         recipients=list(envelope.rcpt_tos), data=data, more=more), more, header
        return "", more, header

    async def _headers_not_owned(self, session, envelope, data: bytes) -> tuple[str, CheckResult | None]:
        """The header From and Sender of authenticated mail, and its null sender: (a refusal, logged, or ''; the
        result for Message.checks)."""
        try:
            rights = await self.sender_rights(session)
        except Exception:  # noqa: BLE001 - without the login's addresses nothing is owned: defer, do not guess
            log.exception("could not read the addresses of login %s", getattr(session, "auth_user", ""))
            reply = "451 4.3.0 Temporary local problem, please try again later"
            return await self.refuse(session, envelope, Refusal.SENDER_NOT_OWNED, reply,
                                     recipients=list(envelope.rcpt_tos), data=data), None
        result = senders.header_check(rights, envelope_sender(envelope), data)
        if result.refuses:
            return await self.refuse(session, envelope, result.reason, result.reply,
                                     recipients=list(envelope.rcpt_tos), data=data, more=[result]), result
        return "", result

    async def _authenticate(self, data: bytes, txn: Transaction, config: CheckConfig, domains: list[str],
                            protected: list[str], client_ip: str | None) -> tuple[list, str]:
        """DKIM, DMARC and the protected-sender check. An unsigned message whose DMARC records the resolver
        has (or can fetch here, without blocking) is judged on the event loop; a signed one (key lookups, RSA)
        in a thread."""
        resolver = self.resolver
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
            return checks.authenticate_message(data, txn.spf, resolver, config, settings.SMTP_HOSTNAME, domains,
                                               protected=protected, client_ip=client_ip)
        return await asyncio.to_thread(checks.authenticate_message, data, txn.spf, resolver, config,
                                       settings.SMTP_HOSTNAME, domains, protected=protected, client_ip=client_ip)

    # --- SMTP AUTH -------------------------------------------------------------------------------------

    async def too_many_auth_failures(self, ip: str | None) -> bool:
        config = self.config()
        self.limits.auth_failure_window(config.auth_failure_window_minutes)
        return bool(config.auth_max_failures and ip and
                    await self.limits.auth_failure_count(ip) >= config.auth_max_failures)

    async def auth_failed(self, ip: str) -> float:
        """Count a failed AUTH from `ip` (every node's, when shared): its failures in the window."""
        self.limits.auth_failure_window(self.config().auth_failure_window_minutes)
        return await self.limits.auth_failure(ip)

    def connection_closed(self, conn: Connection) -> None:
        """The connection is gone: its entry in the shared counts goes too (a task: connection_lost is not async)."""
        if conn.shared_member and conn.client_ip:
            task = asyncio.get_running_loop().create_task(
                self.limits.forget_connection(conn.client_ip, conn.shared_member))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            conn.shared_member = ""


def _route_of(domain: str) -> tuple[str, int] | None:
    close_old_connections()
    found = Domain.objects.filter(name=domain, active=True).select_related("route").first()
    return (found.route.host, found.route.port) if found else None
