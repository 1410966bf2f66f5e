"""SPF (RFC 7208) on pyspf, resolving through `gateway.mailauth.dns`.

pyspf does its own DNS through the module-level function ``spf.DNSLookup(name, qtype, strict, timeout)``, which by
default asks dnspython's *system* resolver. Importing this module replaces that function, once, with a dispatcher
that asks the resolver of the check in progress (held in a context variable, so concurrent checks in threads or
asyncio tasks each use their own), or the resolver configured by settings when pyspf is called from elsewhere.
So pyspf never reaches the system resolver when ``DNS_NAMESERVERS`` is set, and a timeout or SERVFAIL becomes
pyspf's ``TempError`` (result ``temperror``) instead of an empty answer.

Public API::

    check_spf(ip, mail_from, helo, resolver=None, *, receiver=None, timeout=20.0, strict=True,
              default_explanation=None) -> SPFResult
    async check_spf_async(...same...) -> SPFResult      # runs the blocking check in a worker thread

    SPFResult.result          'pass' | 'fail' | 'softfail' | 'neutral' | 'none' | 'temperror' | 'permerror'
    SPFResult.explanation     the exp= text (or the default explanation) for fail; pyspf's text otherwise
    SPFResult.received_spf    the Received-SPF field value (RFC 7208 §9.1)
    SPFResult.header          "Received-SPF: <value>"
    SPFResult.duration        seconds the check took
    SPFResult.domain, .identity ('mailfrom' or 'helo'), .sender, .helo, .mechanism, .problem, .smtp_code

With an empty MAIL FROM (a bounce) the HELO identity is checked as ``postmaster@<helo>`` (RFC 7208 §2.4).
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import time
from dataclasses import dataclass

import spf as pyspf

from gateway.mailauth.dns import Resolver, SyncResolver, TemporaryDNSError, get_sync_resolver

__all__ = ["RESULTS", "SPFResult", "check_spf", "check_spf_async"]

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

# RFC 7208 §4.6.4: an SPF evaluation may be aborted after at least 20 seconds; pyspf enforces it as "querytime".
DEFAULT_TIMEOUT = 20.0

_current_resolver: contextvars.ContextVar[SyncResolver | None] = contextvars.ContextVar(
    "spf_resolver", default=None
)


def _dns_lookup(name: str, qtype: str, strict: bool | int = True, timeout: float | None = None) -> list:
    """pyspf's DNS hook: ``[((name, qtype), value), ...]`` in the shapes pyspf's dnspython driver returns."""
    resolver = _current_resolver.get() or get_sync_resolver()
    try:
        lookup = resolver.lookup(name, qtype, lifetime=timeout if timeout and timeout > 0 else None)
    except TemporaryDNSError as exc:
        raise pyspf.TempError(f"DNS {exc.reason}") from exc
    results = []
    for rdata in lookup.rdatas:
        if qtype in ("A", "AAAA"):
            value = rdata.address
        elif qtype == "MX":
            value = (rdata.preference, rdata.exchange.to_text(omit_final_dot=True))
        elif qtype in ("PTR", "CNAME"):
            value = rdata.target.to_text(omit_final_dot=True)
        elif qtype in ("TXT", "SPF"):
            value = tuple(rdata.strings)
        else:
            continue
        results.append(((name, qtype), value))
    return results


# Installed once, at import: every pyspf query in this process then resolves through gateway.mailauth.dns.
pyspf.DNSLookup = _dns_lookup


class _Query(pyspf.query):
    """pyspf's query with RFC 7208 §5.5's error rule for PTR validation.

    "If a DNS error occurs while doing an A RR lookup, then that domain name is skipped and the search continues."
    pyspf lets the TempError of one PTR name's forward lookup end the whole evaluation as temperror (its own test
    driver never shows it: its fake DNS returns CNAME loops as data, which pyspf then cuts short). This applies to
    the ``ptr`` mechanism and the %{p} macro alike, both of which use ``validated_ptrs``.
    """

    def validated_ptrs(self) -> list[str]:
        if self.strict > 1:
            # pyspf's "harsh" mode adds ambiguity warnings about the PTR set; keep its behaviour there.
            return super().validated_ptrs()
        limit = pyspf.MAX_PTR if self.strict else pyspf.MAX_PTR * 4
        validated = []
        for name in self.dns_ptr(self.i)[:limit]:
            try:
                if self.cidrmatch(self.dns_a(name, self.A), self.cidrmax):
                    validated.append(name)
            except pyspf.TempError:
                continue
        return validated


@dataclass(frozen=True)
class SPFResult:
    result: str
    explanation: str
    received_spf: str
    duration: float
    domain: str
    identity: str
    mechanism: str | None = None
    problem: str | None = None
    smtp_code: int = 250
    sender: str = ""  # the identity checked: MAIL FROM, or postmaster@<helo> for a null sender
    helo: str = ""

    @property
    def header(self) -> str:
        """The whole header field, ``Received-SPF: <value>``, to prepend to the message."""
        return f"Received-SPF: {self.received_spf}"


_UNSAFE_COMMENT = re.compile(r"[()\\\x00-\x1f\x7f-\U0010ffff]")


def _comment_text(text: str) -> str:
    # A header comment may not hold unbalanced parentheses, backslashes or control characters, and the header
    # must stay ASCII: explanation and problem texts come from the sender's DNS, so they are scrubbed.
    return _UNSAFE_COMMENT.sub("?", text)


def _received_spf(query: pyspf.query, result: str, receiver: str) -> str:
    """RFC 7208 §9.1: ``result (comment) key=value; ...``, the result in lower case as the ABNF shows it."""
    comment = _comment_text(f"{receiver}: {query.get_header_comment(result)}")
    pairs = [("client-ip", query.c)]
    if query.ident == "mailfrom":
        pairs.append(("envelope-from", query.s))
    pairs += [("helo", query.h), ("receiver", receiver)]
    if result == "permerror" and query.mech:
        pairs.append(("problem", _comment_text(" ".join(query.mech))))
    if query.mechanism:
        pairs.append(("mechanism", query.mechanism))
    pairs.append(("identity", query.ident))
    fields = "; ".join(f"{key}={pyspf.quote_value(value)}" for key, value in pairs if value is not None)
    return f"{result} ({comment}) {fields}"


def check_spf(
    ip: str,
    mail_from: str,
    helo: str,
    resolver: Resolver | SyncResolver | None = None,
    *,
    receiver: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    strict: bool | int = True,
    default_explanation: str | None = None,
) -> SPFResult:
    """Evaluate SPF for a client ``ip`` sending ``MAIL FROM:<mail_from>`` after ``HELO helo``.

    ``resolver`` defaults to the one configured by settings; ``receiver`` (our name in the header and in the %{r}
    macro) to ``settings.SMTP_HOSTNAME``. ``timeout`` bounds the whole evaluation. ``strict`` is pyspf's: True
    follows RFC 7208, 2 adds its "harsh" checks. Blocks: from asyncio use `check_spf_async`.
    Raises ValueError when ``ip`` is not an IP address.
    """
    if receiver is None:
        from django.conf import settings

        receiver = settings.SMTP_HOSTNAME
    sync_resolver = (resolver or get_sync_resolver()).sync()
    started = time.monotonic()
    token = _current_resolver.set(sync_resolver)
    try:
        try:
            query = _Query(
                i=ip, s=mail_from or "", h=helo or "", receiver=receiver, strict=strict,
                timeout=timeout, querytime=timeout,
            )
        except pyspf.PermError as exc:
            raise ValueError(f"not an IP address: {ip!r}") from exc
        if default_explanation is not None:
            query.set_default_explanation(default_explanation)
        result, code, explanation = query.check()
        # pyspf still knows the RFC 4408 names in some paths.
        result = {"unknown": "permerror", "error": "temperror"}.get(result, result)
        header = _received_spf(query, result, receiver)
    finally:
        _current_resolver.reset(token)
    return SPFResult(
        result=result,
        explanation=explanation,
        received_spf=header,
        duration=time.monotonic() - started,
        domain=query.o,
        identity=query.ident,
        mechanism=query.mechanism,
        problem=getattr(query, "prob", None) if result in ("permerror", "temperror") else None,
        smtp_code=code,
        sender=query.s,
        helo=query.h,
    )


async def check_spf_async(
    ip: str,
    mail_from: str,
    helo: str,
    resolver: Resolver | SyncResolver | None = None,
    **options: object,
) -> SPFResult:
    """`check_spf` in a worker thread, so the SMTP server's event loop is not blocked by pyspf's DNS."""
    return await asyncio.to_thread(check_spf, ip, mail_from, helo, resolver, **options)
