"""DMARC (RFC 7489) evaluation and the Authentication-Results header (RFC 8601).

Public API::

    evaluate(from_domain, *, spf=None, dkim=(), resolver=None, sample=random.random) -> DMARCResult
    async evaluate_async(from_domain, **same) -> DMARCResult
    parse_record(txt) -> DMARCRecord                  # raises DMARCRecordError
    organizational_domain(domain) -> str              # RFC 7489 §3.2, Public Suffix List
    is_aligned(identifier_domain, from_domain, mode) -> bool   # mode 'r' (relaxed) or 's' (strict)
    from_domains(message: bytes) -> list[str]         # the RFC5322.From domain(s) of a message
    authentication_results(authserv_id, spf=None, dkim=(), dmarc=None) -> str
    strip_authentication_results(message: bytes, authserv_id) -> bytes

``spf`` is a `gateway.mailauth.spf.SPFResult` (its ``result`` and ``domain``: the MAIL FROM domain, or the HELO name
for a null sender, as RFC 7489 §3.1.2 wants); ``dkim`` the `gateway.mailauth.dkim.DKIMSignatureResult` list. Anything
with ``.result`` and ``.domain`` attributes works.

`DMARCResult.result` is RFC 8601's word: ``pass`` (an aligned SPF or DKIM pass), ``fail``, ``none`` (no usable
policy record), ``temperror`` (the record lookup failed temporarily: defer), ``permerror`` (a broken record).
`DMARCResult.policy` is what to do: ``none`` / ``quarantine`` / ``reject``; it is the published ``p=`` (or ``sp=``
when the record was found at the organisational domain of a subdomain), lowered one step when the message fell
outside a ``pct=`` sample (§6.6.4), and ``none`` for anything but ``fail``.

The organisational domain comes from the Public Suffix List of the ``publicsuffixlist`` package (a copy ships in
the package; it is never fetched at run time), ICANN and private sections, as OpenDMARC uses it. Without that
package a short built-in list of two-label suffixes is used (documented fallback, less exact).
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.headerregistry import Address
from email.parser import BytesHeaderParser
from email.policy import SMTP as SMTP_POLICY
from email.utils import getaddresses
from functools import lru_cache
from typing import Any, Protocol

from gateway.mailauth.dns import Resolver, SyncResolver, TemporaryDNSError, get_sync_resolver
from gateway.mailbytes import header_fields

__all__ = [
    "DMARCRecord",
    "DMARCRecordError",
    "DMARCResult",
    "authentication_results",
    "evaluate",
    "evaluate_async",
    "from_domains",
    "is_aligned",
    "organizational_domain",
    "parse_record",
    "strip_authentication_results",
]

POLICIES = ("none", "quarantine", "reject")


class _Outcome(Protocol):
    result: str
    domain: str


class DMARCRecordError(ValueError):
    """A ``_dmarc`` TXT record that is not a usable DMARC policy."""


@dataclass(frozen=True)
class DMARCRecord:
    p: str
    sp: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: str = "0"
    ri: int = 86400
    raw: str = ""


@dataclass(frozen=True)
class DMARCResult:
    result: str  # pass | fail | none | temperror | permerror
    policy: str  # none | quarantine | reject: what to apply
    from_domain: str
    policy_domain: str | None = None  # where the record was found (the From domain or its organisational domain)
    record: DMARCRecord | None = None
    requested_policy: str | None = None  # p= or sp=, before pct sampling
    spf_aligned: bool = False
    dkim_aligned: bool = False
    dkim_domain: str | None = None  # the d= of the aligned passing signature
    sampled_out: bool = False  # outside pct=: policy lowered one step
    reason: str = ""


# --- organisational domain -------------------------------------------------------------------------------------

# Used only when the publicsuffixlist package is missing: common multi-label public suffixes.
_FALLBACK_SUFFIXES = frozenset({
    "co.uk", "org.uk", "ac.uk", "gov.uk", "ltd.uk", "plc.uk", "me.uk", "net.uk", "sch.uk", "nhs.uk",
    "com.au", "net.au", "org.au", "edu.au", "gov.au", "co.nz", "org.nz", "net.nz", "co.jp", "ne.jp", "or.jp",
    "ac.jp", "go.jp", "co.za", "org.za", "com.br", "net.br", "org.br", "com.cn", "net.cn", "org.cn", "com.mx",
    "com.ar", "com.tr", "co.in", "net.in", "org.in", "co.kr", "or.kr", "com.sg", "com.hk", "co.il", "com.tw",
    "github.io", "blogspot.com", "herokuapp.com", "appspot.com", "cloudfront.net", "azurewebsites.net",
})


@lru_cache(maxsize=1)
def _psl() -> Any:
    try:
        from publicsuffixlist import PublicSuffixList
    except ImportError:
        return None
    return PublicSuffixList()


def _normalise(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


@lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label (the domain itself when it is a public suffix)."""
    domain = _normalise(domain)
    psl = _psl()
    if psl is not None:
        return psl.privatesuffix(domain) or domain
    labels = domain.split(".")
    keep = 3 if ".".join(labels[-2:]) in _FALLBACK_SUFFIXES else 2
    return ".".join(labels[-keep:])


def is_aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment (§3.1): strict means the same name, relaxed the same organisational domain."""
    identifier, from_domain = _normalise(identifier), _normalise(from_domain)
    if not identifier or not from_domain:
        return False
    if mode == "s":
        return identifier == from_domain
    return organizational_domain(identifier) == organizational_domain(from_domain)


# --- the record --------------------------------------------------------------------------------------------------


def _uris(value: str) -> tuple[str, ...]:
    return tuple(uri.strip() for uri in value.split(",") if uri.strip())


def _valid_uri(uri: str) -> bool:
    # RFC 7489 §6.2: a URI, optionally followed by "!" and a size limit; mailto: is the one in use.
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:[^!\s]+(![0-9]+[kmgt]?)?$", uri))


def parse_record(txt: str) -> DMARCRecord:
    """Parse a DMARC record (§6.3). Lenient where the RFC is: unknown tags are ignored, bad optional values fall
    back to their defaults, and a missing or bad ``p=`` (or bad ``sp=``) with a valid ``rua=`` reads as
    ``p=none`` (§6.6.3 step 6). Raises DMARCRecordError otherwise."""
    parts = [part.strip() for part in txt.split(";")]
    tags: dict[str, str] = {}
    for part in parts:
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise DMARCRecordError(f"not a tag=value pair: {part!r}")
        tags.setdefault(name.strip().lower(), value.strip())
    if not parts or parts[0].replace(" ", "") != "v=DMARC1":
        raise DMARCRecordError("the record does not start with v=DMARC1")
    rua = tuple(uri for uri in _uris(tags.get("rua", "")) if _valid_uri(uri))
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower() or None
    if p not in POLICIES or (sp is not None and sp not in POLICIES):
        if not rua:
            raise DMARCRecordError(f"invalid or missing policy: p={tags.get('p')!r} sp={tags.get('sp')!r}")
        p, sp = "none", None
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    try:
        pct = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    try:
        ri = int(tags.get("ri", "86400"))
    except ValueError:
        ri = 86400
    return DMARCRecord(
        p=p,
        sp=sp,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        pct=pct,
        rua=rua,
        ruf=tuple(uri for uri in _uris(tags.get("ruf", "")) if _valid_uri(uri)),
        fo=tags.get("fo", "0"),
        ri=ri,
        raw=txt,
    )


def _discover(domain: str, resolver: SyncResolver) -> tuple[str, list[str]]:
    """The v=DMARC1 records at ``_dmarc.<domain>``."""
    records = [txt for txt in resolver.lookup_txt(f"_dmarc.{domain}") if txt.replace(" ", "").startswith("v=DMARC1")]
    return domain, records


# --- evaluation -------------------------------------------------------------------------------------------------


def evaluate(
    from_domain: str,
    *,
    spf: _Outcome | None = None,
    dkim: Iterable[_Outcome] = (),
    resolver: Resolver | SyncResolver | None = None,
    sample: Callable[[], float] = random.random,
) -> DMARCResult:
    """Evaluate DMARC for a message whose RFC5322.From domain is ``from_domain`` (§6.6).

    ``sample`` draws the pct= sample (a float in [0, 1)); tests pass a fixed one. Blocks on DNS.
    """
    from_domain = _normalise(from_domain)
    sync_resolver = (resolver or get_sync_resolver()).sync()
    if not from_domain:
        return DMARCResult("permerror", "none", from_domain, reason="no RFC5322.From domain")

    # Policy discovery (§6.6.3): the From domain first, then its organisational domain.
    org = organizational_domain(from_domain)
    try:
        policy_domain, records = _discover(from_domain, sync_resolver)
        if not records and org != from_domain:
            policy_domain, records = _discover(org, sync_resolver)
    except TemporaryDNSError as exc:
        return DMARCResult("temperror", "none", from_domain, reason=f"policy lookup failed: {exc.reason}")
    if not records:
        return DMARCResult("none", "none", from_domain, reason="no DMARC record")
    if len(records) > 1:
        # §6.6.3 step 5: several records mean no DMARC processing at all.
        return DMARCResult("none", "none", from_domain, policy_domain, reason="more than one DMARC record")
    try:
        record = parse_record(records[0])
    except DMARCRecordError as exc:
        return DMARCResult("permerror", "none", from_domain, policy_domain, reason=str(exc))

    dkim_domain = next(
        (_normalise(r.domain) for r in dkim if r.result == "pass" and is_aligned(r.domain, from_domain, record.adkim)),
        None,
    )
    spf_aligned = bool(spf and spf.result == "pass" and is_aligned(spf.domain, from_domain, record.aspf))
    # sp= applies when the policy came from the organisational domain of a subdomain (§6.6.3 step 3).
    requested = (record.sp or record.p) if policy_domain != from_domain else record.p
    common = {
        "from_domain": from_domain,
        "policy_domain": policy_domain,
        "record": record,
        "requested_policy": requested,
        "spf_aligned": spf_aligned,
        "dkim_aligned": dkim_domain is not None,
        "dkim_domain": dkim_domain,
    }
    if spf_aligned or dkim_domain is not None:
        return DMARCResult("pass", "none", reason="aligned " + ("DKIM" if dkim_domain else "SPF") + " pass",
                           **common)
    policy, sampled_out = requested, False
    if record.pct < 100 and sample() * 100 >= record.pct:
        # §6.6.4: outside the sample, apply the next less strict policy.
        policy, sampled_out = {"reject": "quarantine", "quarantine": "none"}.get(requested, "none"), True
    return DMARCResult("fail", policy, sampled_out=sampled_out, reason="no aligned SPF or DKIM pass", **common)


async def evaluate_async(from_domain: str, **options: Any) -> DMARCResult:
    """`evaluate` in a worker thread."""
    return await asyncio.to_thread(evaluate, from_domain, **options)


def from_domains(message: bytes) -> list[str]:
    """The distinct domains of the addresses in the message's From header fields (lowercase, in order).

    DMARC needs exactly one (§6.6.1): a caller finding none or several should treat the message as permerror
    (or evaluate each, and apply the strictest policy).
    """
    headers = BytesHeaderParser(policy=SMTP_POLICY).parsebytes(message, headersonly=True)
    values = [str(value) for value in headers.get_all("From", [])]
    domains: list[str] = []
    for _, address in getaddresses(values):
        if "@" not in address:
            continue
        try:
            domain = Address(addr_spec=address).domain
        except (ValueError, IndexError):
            domain = address.rpartition("@")[2]
        domain = _normalise(domain)
        if domain and domain not in domains:
            domains.append(domain)
    return domains


# --- Authentication-Results (RFC 8601) ------------------------------------------------------------------------

_TOKEN = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")  # RFC 2045 token: no tspecials, no spaces
_ADDRESS = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]*@?[A-Za-z0-9.\-]+$")  # [local-part] "@" domain-name


def _pvalue(value: str) -> str:
    if _TOKEN.match(value) or _ADDRESS.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    return "(" + re.sub(r"[()\\\x00-\x1f\x7f-\U0010ffff]", "?", text) + ")"


def authentication_results(
    authserv_id: str,
    spf: Any | None = None,
    dkim: Sequence[Any] = (),
    dmarc: DMARCResult | None = None,
) -> str:
    """One Authentication-Results field value (without the ``Authentication-Results:`` name).

    ``spf``: an SPFResult (``smtp.mailfrom``, or ``smtp.helo`` for a null sender); ``dkim``: DKIMSignatureResults
    (``header.d``, ``header.i``, ``header.s``, ``header.a``, ``header.b``); ``dmarc``: a DMARCResult
    (``header.from``, the policy in a comment). With no results at all the value is ``<authserv-id>; none``.
    """
    results: list[str] = []
    if spf is not None:
        if getattr(spf, "identity", "mailfrom") == "helo":
            prop = f"smtp.helo={_pvalue(spf.helo or spf.domain)}"
        else:
            prop = f"smtp.mailfrom={_pvalue(getattr(spf, 'sender', '') or spf.domain)}"
        results.append(f"spf={spf.result} {prop}")
    for signature in dkim:
        parts = [f"dkim={signature.result}"]
        if signature.result != "pass" and signature.reason:
            parts.append(f"reason={_pvalue(signature.reason)}")
        elif signature.key_bits:
            parts.append(_comment(f"{signature.key_bits}-bit key"))
        for ptype, value in (("header.d", signature.domain), ("header.i", signature.identity),
                             ("header.s", signature.selector), ("header.a", signature.algorithm),
                             ("header.b", signature.header_b)):
            if value:
                parts.append(f"{ptype}={_pvalue(value)}")
        results.append(" ".join(parts))
    if dmarc is not None:
        parts = [f"dmarc={dmarc.result}"]
        if dmarc.record is not None:
            policy = f"p={dmarc.record.p}" + (f" sp={dmarc.record.sp}" if dmarc.record.sp else "")
            parts.append(_comment(f"{policy} dis={dmarc.policy}"))
        elif dmarc.reason:
            parts.append(_comment(dmarc.reason))
        if dmarc.from_domain:
            parts.append(f"header.from={_pvalue(dmarc.from_domain)}")
        results.append(" ".join(parts))
    return f"{authserv_id}; " + (";\r\n\t".join(results) if results else "none")


_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def _authserv_id(value: bytes) -> str:
    text = value.decode("utf-8", errors="replace")
    # Comments may stand before the authserv-id (RFC 8601 §2.2): drop them (not nested; good enough here).
    text = re.sub(r"\([^()]*\)", " ", text)
    return text.split(";", 1)[0].strip().split()[0].lower() if text.strip() else ""


def strip_authentication_results(message: bytes, authserv_id: str) -> bytes:
    """Remove every Authentication-Results field claiming ``authserv_id`` (RFC 8601 §5: a forged one could
    otherwise pass for ours). Other fields and the body are left byte for byte."""
    ours = authserv_id.lower()
    newline = b"\r\n" if b"\r\n" in message else b"\n"
    head, separator, body = message.partition(newline + newline)
    if not separator:
        head, body = message, b""
    kept = []
    for lines_of_field in header_fields(head, newline):
        match = _FIELD_NAME.match(lines_of_field[0])
        if match and match.group(1).lower() == b"authentication-results":
            value = b" ".join(line.strip() for line in lines_of_field)[match.end():]
            if _authserv_id(value) == ours:
                continue
        kept.append(newline.join(lines_of_field))
    return newline.join(kept) + (newline + newline + body if separator else b"")
