"""DNS lookups for the mail checks, on dnspython.

Every check (reverse DNS, HELO, sender domain, SPF, DKIM keys, DMARC) resolves through this module, so one setting
decides where the questions go:

- ``settings.DNS_NAMESERVERS`` (a list of IP addresses): when non-empty, only these servers are asked, on
  ``settings.DNS_PORT``; when empty, the system resolver (``/etc/resolv.conf``) is used.
- ``settings.DNS_TIMEOUT`` (seconds): the longest one lookup may take against one server. A lookup's total
  lifetime is that times the number of servers, so a dead first server still leaves time for the second.

The answer to every lookup is one of three things, and callers must keep them apart:

- records (a non-empty list);
- a definite "no": NXDOMAIN or NOERROR without records of that type (an empty list, or ``False``);
- "don't know now": timeout, SERVFAIL, REFUSED, a malformed answer, no server reachable. This raises
  `TemporaryDNSError`, which the SMTP layer turns into ``451 4.4.3`` and a scan into a temperror result.
  A temporary failure is never read as "no records", or a forged sender would pass whenever DNS is slow.

Two resolvers share one configuration: `Resolver` (asyncio, for the SMTP server) and `SyncResolver` (blocking, for
Celery tasks and for pyspf/dkimpy callbacks). Both can be built with explicit ``nameservers``/``port``/``timeout``
(tests point them at ``tests/support/dnsstub.py``); `get_resolver()` / `get_sync_resolver()` return the ones
configured by settings. The module-level coroutines (`lookup_txt`, `lookup_a`, ... `fcrdns`, `domain_resolves`) use
`get_resolver()`.

Public API::

    class TemporaryDNSError(Exception)            # .name, .rdtype, .reason
    class MXRecord(preference: int, exchange: str)

    class Resolver(nameservers=None, port=None, timeout=None)      # async
        async lookup(name, rdtype) -> Lookup
        async lookup_txt(name) -> list[str]
        async lookup_txt_bytes(name) -> list[bytes]
        async lookup_a(name) -> list[str]
        async lookup_aaaa(name) -> list[str]
        async lookup_addresses(name) -> list[str]
        async lookup_mx(name) -> list[MXRecord]
        async lookup_ptr(ip) -> list[str]
        async fcrdns(ip) -> str | None
        async domain_resolves(domain) -> bool
        sync() -> SyncResolver
    class SyncResolver(...)                        # the same methods, blocking
    get_resolver() -> Resolver; get_sync_resolver() -> SyncResolver
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

__all__ = [
    "Lookup",
    "MXRecord",
    "Resolver",
    "SyncResolver",
    "TemporaryDNSError",
    "domain_resolves",
    "fcrdns",
    "get_resolver",
    "get_sync_resolver",
    "lookup_a",
    "lookup_aaaa",
    "lookup_addresses",
    "lookup_mx",
    "lookup_ptr",
    "lookup_txt",
]

# RFC 7208 §4.6.4 caps the names looked up for one PTR evaluation at 10; the same cap keeps a client with a
# hundred PTR records from making us do a hundred forward lookups.
MAX_PTR_NAMES = 10

# A DKIM key of 2048 bits does not fit the 512 bytes of plain DNS over UDP; EDNS0 with the payload size the DNS
# flag day 2020 recommends avoids a TCP retry for nearly every answer, and stays clear of IP fragmentation.
EDNS_PAYLOAD = 1232


class TemporaryDNSError(Exception):
    """A lookup could not be answered now (timeout, SERVFAIL, REFUSED, unreachable server, malformed answer).

    Not a "no": the caller must defer (SMTP ``451 4.4.3``) or record a temperror, never treat it as absent data.
    """

    def __init__(self, name: str, rdtype: str, reason: str) -> None:
        super().__init__(f"DNS {rdtype} lookup of {name} failed temporarily: {reason}")
        self.name = name
        self.rdtype = rdtype
        self.reason = reason


@dataclass(frozen=True, order=True)
class MXRecord:
    """One MX record. ``exchange`` has no trailing dot; a null MX (RFC 7505, ``0 .``) has ``exchange == ''``."""

    preference: int
    exchange: str


@dataclass(frozen=True)
class Lookup:
    """The raw outcome of one query: the records' rdata (possibly empty) and whether the name does not exist."""

    rdatas: tuple
    nxdomain: bool = False

    def __bool__(self) -> bool:
        return bool(self.rdatas)


def _qname(name: str) -> dns.name.Name | None:
    """Absolute DNS name for ``name``, or None when it cannot exist in DNS (label over 63 octets, empty label)."""
    try:
        # IDNA 2008 encoding of a U-label domain; a plain ASCII name passes through unchanged.
        return dns.name.from_text(name.rstrip(".") + ".") if name.strip(".") else None
    except (dns.name.LabelTooLong, dns.name.EmptyLabel, dns.name.NameTooLong, dns.name.IDNAException):
        return None
    except (dns.exception.SyntaxError, UnicodeError, ValueError):
        return None


def _name_text(name: dns.name.Name) -> str:
    # The root name (a null MX's exchange) becomes "", every other name its text without the final dot.
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True)


def _outcome(answer: dns.resolver.Answer) -> Lookup:
    return Lookup(tuple(answer.rrset) if answer.rrset is not None else ())


def _temporary(name: str, rdtype: str, exc: Exception) -> TemporaryDNSError:
    if isinstance(exc, dns.exception.Timeout):
        reason = "timeout"
    elif isinstance(exc, dns.resolver.NoNameservers):
        # SERVFAIL, REFUSED or a malformed answer from every server.
        reason = "no server answered (SERVFAIL, REFUSED or malformed answer)"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return TemporaryDNSError(name, rdtype, reason)


def _txt_bytes(lookup: Lookup) -> list[bytes]:
    # A TXT record may hold several character-strings: RFC 7208 §3.3 and RFC 6376 §3.6.2.2 both join them
    # with nothing in between.
    return [b"".join(rdata.strings) for rdata in lookup.rdatas]


def _txt_text(lookup: Lookup) -> list[str]:
    # SPF, DKIM and DMARC records are ASCII; anything else is decoded leniently so one odd record in a name's
    # TXT set cannot hide the records next to it.
    return [raw.decode("utf-8", errors="replace") for raw in _txt_bytes(lookup)]


def _addresses(lookup: Lookup) -> list[str]:
    return [rdata.address for rdata in lookup.rdatas]


def _mx(lookup: Lookup) -> list[MXRecord]:
    return sorted(MXRecord(rdata.preference, _name_text(rdata.exchange)) for rdata in lookup.rdatas)


def _targets(lookup: Lookup) -> list[str]:
    return [_name_text(rdata.target) for rdata in lookup.rdatas]


def _reverse_name(ip: str) -> tuple[str, str]:
    """(reverse name, address family record type) for an IP address; ValueError if it is not one."""
    address = _plain_ip(ip)
    rdtype = "A" if address.version == 4 else "AAAA"
    return dns.reversename.from_address(str(address)).to_text(), rdtype


def _plain_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # An IPv4 client seen through a dual-stack socket: ::ffff:192.0.2.1 is 192.0.2.1.
        return address.ipv4_mapped
    return address


def _same_ip(a: str, b: str) -> bool:
    try:
        return _plain_ip(a) == _plain_ip(b)
    except ValueError:
        return False


class _Configured:
    """Holds the configuration shared by the async and the sync resolver."""

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        port: int | None = None,
        timeout: float | None = None,
    ) -> None:
        if nameservers is None or port is None or timeout is None:
            from django.conf import settings

            nameservers = list(settings.DNS_NAMESERVERS) if nameservers is None else nameservers
            port = int(settings.DNS_PORT) if port is None else port
            timeout = float(settings.DNS_TIMEOUT) if timeout is None else timeout
        self.nameservers: tuple[str, ...] = tuple(nameservers)
        self.port = int(port)
        self.timeout = float(timeout)

    def _configure(self, resolver: dns.resolver.BaseResolver) -> None:
        if self.nameservers:
            resolver.nameservers = list(self.nameservers)
            resolver.port = self.port
        resolver.timeout = self.timeout
        resolver.lifetime = self.timeout * max(1, len(resolver.nameservers))
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        # The stub resolver must never append a search domain: "example" must not become "example.corp.lan".
        resolver.use_search_by_default = False

    def _build(self, cls: type[dns.resolver.BaseResolver]) -> dns.resolver.BaseResolver:
        if self.nameservers:
            # configure=False: never read /etc/resolv.conf when nameservers are configured, so a test (or an
            # appliance with its own resolver) cannot leak a question to the system's servers.
            resolver = cls(configure=False)
        else:
            try:
                resolver = cls()
            except dns.resolver.NoResolverConfiguration:
                # No /etc/resolv.conf: every lookup then fails as temporary, which is the truth.
                resolver = cls(configure=False)
        self._configure(resolver)
        return resolver

    def __repr__(self) -> str:
        servers = ",".join(self.nameservers) or "system"
        return f"<{type(self).__name__} {servers} port={self.port} timeout={self.timeout}>"


class Resolver(_Configured):
    """Asyncio resolver (dnspython's ``dns.asyncresolver``) for the SMTP server."""

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        port: int | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(nameservers, port, timeout)
        self._resolver = self._build(dns.asyncresolver.Resolver)
        self._sync: SyncResolver | None = None

    def sync(self) -> SyncResolver:
        """A blocking resolver with the same configuration (for pyspf and dkimpy, which block)."""
        if self._sync is None:
            self._sync = SyncResolver(self.nameservers, self.port, self.timeout)
        return self._sync

    async def lookup(self, name: str, rdtype: str) -> Lookup:
        """Records of ``rdtype`` at ``name`` (CNAMEs followed); raises `TemporaryDNSError`."""
        qname = _qname(name)
        if qname is None:
            return Lookup((), nxdomain=True)
        try:
            answer = await self._resolver.resolve(qname, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return Lookup((), nxdomain=True)
        except dns.resolver.YXDOMAIN:
            return Lookup((), nxdomain=True)
        except dns.exception.DNSException as exc:
            raise _temporary(name, rdtype, exc) from exc
        return _outcome(answer)

    async def lookup_txt(self, name: str) -> list[str]:
        """TXT records of ``name``, each one's character-strings joined."""
        return _txt_text(await self.lookup(name, "TXT"))

    async def lookup_txt_bytes(self, name: str) -> list[bytes]:
        """TXT records of ``name`` as bytes, each one's character-strings joined."""
        return _txt_bytes(await self.lookup(name, "TXT"))

    async def lookup_a(self, name: str) -> list[str]:
        return _addresses(await self.lookup(name, "A"))

    async def lookup_aaaa(self, name: str) -> list[str]:
        return _addresses(await self.lookup(name, "AAAA"))

    async def lookup_addresses(self, name: str) -> list[str]:
        """IPv4 and IPv6 addresses of ``name``."""
        return await self.lookup_a(name) + await self.lookup_aaaa(name)

    async def lookup_mx(self, name: str) -> list[MXRecord]:
        """MX records of ``name``, lowest preference first (no implicit MX here: see `domain_resolves`)."""
        return _mx(await self.lookup(name, "MX"))

    async def lookup_ptr(self, ip: str) -> list[str]:
        """PTR names of an IP address (ValueError if ``ip`` is not one)."""
        reverse, _ = _reverse_name(ip)
        return _targets(await self.lookup(reverse, "PTR"))

    async def fcrdns(self, ip: str) -> str | None:
        """Forward-confirmed reverse DNS: the first PTR name of ``ip`` whose A/AAAA records include ``ip``.

        None when there is no PTR or no name resolves back; `TemporaryDNSError` when the PTR lookup fails, or
        when no name confirmed and at least one forward lookup failed temporarily.
        """
        _, rdtype = _reverse_name(ip)
        failure: TemporaryDNSError | None = None
        for name in (await self.lookup_ptr(ip))[:MAX_PTR_NAMES]:
            try:
                addresses = _addresses(await self.lookup(name, rdtype))
            except TemporaryDNSError as exc:
                failure = failure or exc
                continue
            if any(_same_ip(ip, address) for address in addresses):
                return name
        if failure is not None:
            raise failure
        return None

    async def domain_resolves(self, domain: str) -> bool:
        """Can mail be sent back to ``domain``? True if it has MX records, or (implicit MX, RFC 5321 §5.1)
        no MX but an A or AAAA record. A null MX (RFC 7505) answers False: the domain accepts no mail."""
        mx = await self.lookup(domain, "MX")
        if mx.nxdomain:
            return False
        if mx:
            return not all(record.exchange == "" for record in _mx(mx))
        if await self.lookup(domain, "A"):
            return True
        return bool(await self.lookup(domain, "AAAA"))


class SyncResolver(_Configured):
    """Blocking resolver (dnspython's ``dns.resolver``) for Celery tasks and library callbacks."""

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        port: int | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(nameservers, port, timeout)
        self._resolver = self._build(dns.resolver.Resolver)

    def sync(self) -> SyncResolver:
        """Itself: lets code that blocks take either kind of resolver."""
        return self

    def lookup(self, name: str, rdtype: str, *, lifetime: float | None = None) -> Lookup:
        """Records of ``rdtype`` at ``name`` (CNAMEs followed); raises `TemporaryDNSError`.

        ``lifetime`` can shorten this one lookup (pyspf passes what is left of its overall budget), never
        lengthen it past the configured timeout.
        """
        qname = _qname(name)
        if qname is None:
            return Lookup((), nxdomain=True)
        if lifetime is not None:
            lifetime = min(lifetime, self._resolver.lifetime)
        try:
            answer = self._resolver.resolve(
                qname, rdtype, raise_on_no_answer=False, search=False, lifetime=lifetime
            )
        except dns.resolver.NXDOMAIN:
            return Lookup((), nxdomain=True)
        except dns.resolver.YXDOMAIN:
            return Lookup((), nxdomain=True)
        except dns.exception.DNSException as exc:
            raise _temporary(name, rdtype, exc) from exc
        return _outcome(answer)

    def lookup_txt(self, name: str) -> list[str]:
        return _txt_text(self.lookup(name, "TXT"))

    def lookup_txt_bytes(self, name: str) -> list[bytes]:
        return _txt_bytes(self.lookup(name, "TXT"))

    def lookup_a(self, name: str) -> list[str]:
        return _addresses(self.lookup(name, "A"))

    def lookup_aaaa(self, name: str) -> list[str]:
        return _addresses(self.lookup(name, "AAAA"))

    def lookup_addresses(self, name: str) -> list[str]:
        return self.lookup_a(name) + self.lookup_aaaa(name)

    def lookup_mx(self, name: str) -> list[MXRecord]:
        return _mx(self.lookup(name, "MX"))

    def lookup_ptr(self, ip: str) -> list[str]:
        reverse, _ = _reverse_name(ip)
        return _targets(self.lookup(reverse, "PTR"))

    def fcrdns(self, ip: str) -> str | None:
        """See `Resolver.fcrdns`."""
        _, rdtype = _reverse_name(ip)
        failure: TemporaryDNSError | None = None
        for name in self.lookup_ptr(ip)[:MAX_PTR_NAMES]:
            try:
                addresses = _addresses(self.lookup(name, rdtype))
            except TemporaryDNSError as exc:
                failure = failure or exc
                continue
            if any(_same_ip(ip, address) for address in addresses):
                return name
        if failure is not None:
            raise failure
        return None

    def domain_resolves(self, domain: str) -> bool:
        """See `Resolver.domain_resolves`."""
        mx = self.lookup(domain, "MX")
        if mx.nxdomain:
            return False
        if mx:
            return not all(record.exchange == "" for record in _mx(mx))
        if self.lookup(domain, "A"):
            return True
        return bool(self.lookup(domain, "AAAA"))


def _settings_key() -> tuple[tuple[str, ...], int, float]:
    from django.conf import settings

    return tuple(settings.DNS_NAMESERVERS), int(settings.DNS_PORT), float(settings.DNS_TIMEOUT)


@lru_cache(maxsize=8)
def _resolver_for(key: tuple[tuple[str, ...], int, float]) -> Resolver:
    return Resolver(*key)


@lru_cache(maxsize=8)
def _sync_resolver_for(key: tuple[tuple[str, ...], int, float]) -> SyncResolver:
    return SyncResolver(*key)


def get_resolver() -> Resolver:
    """The asyncio resolver configured by settings (rebuilt when the DNS settings change, e.g. in tests)."""
    return _resolver_for(_settings_key())


def get_sync_resolver() -> SyncResolver:
    """The blocking resolver configured by settings."""
    return _sync_resolver_for(_settings_key())


async def lookup_txt(name: str) -> list[str]:
    return await get_resolver().lookup_txt(name)


async def lookup_a(name: str) -> list[str]:
    return await get_resolver().lookup_a(name)


async def lookup_aaaa(name: str) -> list[str]:
    return await get_resolver().lookup_aaaa(name)


async def lookup_addresses(name: str) -> list[str]:
    return await get_resolver().lookup_addresses(name)


async def lookup_mx(name: str) -> list[MXRecord]:
    return await get_resolver().lookup_mx(name)


async def lookup_ptr(ip: str) -> list[str]:
    return await get_resolver().lookup_ptr(ip)


async def fcrdns(ip: str) -> str | None:
    return await get_resolver().fcrdns(ip)


async def domain_resolves(domain: str) -> bool:
    return await get_resolver().domain_resolves(domain)
