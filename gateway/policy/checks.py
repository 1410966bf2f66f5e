"""The DNS-based checks of the SMTP server. Each returns a `CheckResult` (never raises): what it found, the
configured action applied to it, and the time it took. DNS goes through the server's caching resolver
(gateway.mailauth.dns underneath); a lookup that fails temporarily is a 'temperror', which a refusing action
turns into 451 4.4.3.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Sequence

import dns.reversename

from gateway.mailauth import dkim as dkim_auth
from gateway.mailauth import dmarc as dmarc_auth
from gateway.mailauth.dns import Resolver, TemporaryDNSError
from gateway.mailauth.spf import SPFResult, check_spf
from gateway.mailbytes import header_section
from gateway.models import CheckAction, Message

from . import senders
from .config import CheckConfig
from .results import TEMPERROR, CheckResult, decide

log = logging.getLogger(__name__)
Refusal = Message.Refusal


def _plain(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _safe_text(text: str, limit: int = 200) -> str:
    """Text from someone's DNS, fit for our reply line: printable ASCII, no CR/LF, bounded."""
    return re.sub(r"[^\x20-\x7e]", "?", " ".join(str(text).split()))[:limit]


# --- client ------------------------------------------------------------------------------------------------

async def fcrdns(resolver: Resolver, ip: str, config: CheckConfig) -> CheckResult:
    """The client's IP has a PTR name whose A/AAAA records include the IP (forward-confirmed reverse DNS)."""
    started = time.monotonic()
    detail: dict = {}
    try:
        names = await resolver.lookup_ptr(ip)
        confirmed = await resolver.fcrdns(ip) if names else None
    except TemporaryDNSError as exc:
        result, detail["error"] = TEMPERROR, exc.reason
    except ValueError:
        result, detail["error"] = "fail", "not an IP address"
    else:
        if confirmed:
            result, detail["name"] = "pass", confirmed
        else:
            result = "fail"
            detail["why"] = "no PTR record" if not names else f"{names[0]} does not resolve back to {ip}"
            if names:
                detail["ptr"] = names[0]
    return decide("fcrdns", result, config.action("fcrdns"), score=config.score("fcrdns"),
                  seconds=time.monotonic() - started, reason=Refusal.REVERSE_DNS,
                  reject=f"550 5.7.25 Client host [{ip}] rejected: no forward-confirmed reverse DNS name",
                  tempfail=f"450 4.7.25 Client host [{ip}] rejected: cannot find your hostname",
                  temperror=f"451 4.4.3 Client host [{ip}]: reverse DNS lookup failed, try again later",
                  **detail)


def dnsbl_query_name(ip: str, zone: str) -> str | None:
    address = _plain(ip)
    if address is None:
        return None
    reverse = dns.reversename.from_address(str(address)).to_text(omit_final_dot=True)
    suffix = ".in-addr.arpa" if address.version == 4 else ".ip6.arpa"
    return reverse[: -len(suffix)] + "." + zone


async def dnsbl(resolver: Resolver, ip: str, config: CheckConfig) -> CheckResult:
    """Ask every enabled zone at once; the strictest action of a zone that lists the client applies."""
    started = time.monotonic()
    zones = config.zones
    if not zones:
        return CheckResult("dnsbl", "skipped", detail={"why": "no zone enabled"})

    async def ask(zone) -> tuple:
        name = dnsbl_query_name(ip, zone.zone)
        if name is None:
            return zone, "not listed", []
        try:
            answers = await resolver.lookup_a(name)
        except TemporaryDNSError as exc:
            return zone, TEMPERROR, [exc.reason]
        listed = [a for a in answers if zone.lists(a)]
        return zone, ("listed" if listed else "not listed"), listed or answers

    outcomes = await asyncio.gather(*(ask(zone) for zone in zones))
    seconds = time.monotonic() - started
    per_zone = {zone.zone: (result if result != "listed" else f"listed ({', '.join(answers)})")
                for zone, result, answers in outcomes}
    rank = {CheckAction.REJECT: 0, CheckAction.TEMPFAIL: 1, CheckAction.SCORE: 2, CheckAction.LOG: 3}
    decided = []
    for zone, result, _answers in outcomes:
        if result == "not listed":
            continue
        decided.append(decide(
            "dnsbl", result, zone.action, score=zone.score, seconds=seconds, reason=Refusal.RBL,
            reject=f"554 5.7.1 Service unavailable; client [{ip}] blocked using {zone.zone}",
            tempfail=f"450 4.7.1 Service unavailable; client [{ip}] blocked using {zone.zone}",
            temperror=f"451 4.4.3 Client host [{ip}]: DNSBL lookup of {zone.zone} failed, try again later",
            zones=per_zone))
    if not decided:
        return CheckResult("dnsbl", "not listed", seconds=seconds, detail={"zones": per_zone})
    # A refusal first (a listing before a lookup failure), then the scores of all the listings added up.
    decided.sort(key=lambda r: (not r.refuses, r.result == TEMPERROR, rank.get(r.action, 9)))
    chosen = decided[0]
    chosen.score = round(sum(r.score for r in decided), 3)
    chosen.result = "listed" if any(r.result == "listed" for r in decided) else chosen.result
    return chosen


# --- HELO --------------------------------------------------------------------------------------------------

def _literal(name: str) -> str | None:
    """The address inside an address literal ([192.0.2.1], [IPv6:2001:db8::1]), or None."""
    if not (name.startswith("[") and name.endswith("]")):
        return None
    inner = name[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    return inner


def helo_impersonation(name: str, client_ip: str, local_ip: str | None, our_names: set[str],
                       config: CheckConfig) -> CheckResult:
    """HELO must not claim to be us: our host name, one of our domains, or our address."""
    started = time.monotonic()
    lowered = name.strip().rstrip(".").lower()
    why = ""
    literal = _literal(lowered)
    client, local = _plain(client_ip or ""), _plain(local_ip or "")
    if literal is not None:
        address = _plain(literal)
        if address is not None and address == local and address != client:
            why = "our address"
    elif lowered in our_names:
        why = "our name"
    elif lowered in ("localhost", "localhost.localdomain") and not (client and client.is_loopback):
        why = "localhost"
    result = "fail" if why else "pass"
    return decide("helo_impersonation", result, config.action("helo_impersonation"),
                  score=config.score("helo_impersonation"), seconds=time.monotonic() - started,
                  reason=Refusal.HELO, **({"why": why} if why else {}),
                  reject=f"550 5.7.1 <{_safe_text(name, 100)}>: Helo command rejected: You are not me",
                  tempfail=f"450 4.7.1 <{_safe_text(name, 100)}>: Helo command rejected: You are not me")


_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9-]{1,63}$")


async def helo(resolver: Resolver | None, name: str, client_ip: str, config: CheckConfig) -> CheckResult:
    """A fully qualified name that resolves (A/AAAA/MX), or an address literal of the client's own address.

    Without `resolver` (DNS checks off) only the syntax is judged.
    """
    started = time.monotonic()
    shown = _safe_text(name, 100)
    lowered = name.strip().rstrip(".").lower()
    literal = _literal(lowered)
    why, result = "", "pass"
    if literal is not None:
        if _plain(literal) is None:
            result, why = "fail", "invalid address literal"
        elif _plain(literal) != _plain(client_ip or ""):
            result, why = "fail", "address literal is not your address"
    elif _plain(lowered) is not None:
        result, why = "fail", "a bare IP address (an address literal needs brackets)"
    elif not _HOSTNAME.match(lowered) or "." not in lowered or lowered.rsplit(".", 1)[-1].isdigit():
        result, why = "fail", "need fully-qualified hostname"
    elif resolver is not None:
        try:
            found = await resolver.lookup_a(lowered) or await resolver.lookup_aaaa(lowered) \
                or await resolver.lookup_mx(lowered)
        except TemporaryDNSError as exc:
            result, why = TEMPERROR, exc.reason
        else:
            if not found:
                result, why = "fail", "Host not found"
    else:
        result = "pass"
    detail = {"why": why} if why else {}
    return decide("helo", result, config.action("helo"), score=config.score("helo"),
                  seconds=time.monotonic() - started, reason=Refusal.HELO,
                  reject=f"550 5.7.1 <{shown}>: Helo command rejected: {why}",
                  tempfail=f"450 4.7.1 <{shown}>: Helo command rejected: {why}",
                  temperror=f"451 4.4.3 <{shown}>: Helo command rejected: DNS lookup failed, try again later",
                  **detail)


# --- MAIL FROM ---------------------------------------------------------------------------------------------

async def sender_domain(resolver: Resolver, sender: str, domain: str, config: CheckConfig) -> CheckResult:
    """The sender domain can receive a reply: an MX (not a null MX), or an A/AAAA record."""
    started = time.monotonic()
    detail: dict = {"domain": domain}
    try:
        result = "pass" if await resolver.domain_resolves(domain) else "fail"
    except TemporaryDNSError as exc:
        result, detail["error"] = TEMPERROR, exc.reason
    shown = _safe_text(sender, 200)
    return decide("sender_domain", result, config.action("sender_domain"), score=config.score("sender_domain"),
                  seconds=time.monotonic() - started, reason=Refusal.CANT_RESOLVE,
                  reject=f"550 5.1.8 <{shown}>: Sender address rejected: Domain not found",
                  tempfail=f"450 4.1.8 <{shown}>: Sender address rejected: Domain not found",
                  temperror=f"451 4.4.3 <{shown}>: Sender address rejected: DNS lookup of {domain} failed, "
                            "try again later", **detail)


class ResultCache:
    """SPF results by (client IP, sender, HELO), for `ttl` seconds (temperrors are not kept)."""

    def __init__(self, ttl: float, size: int = 20_000):
        self.ttl, self.size = ttl, size
        self._data: dict = {}
        self._lock = threading.Lock()

    def get(self, key):
        if self.ttl <= 0:
            return None
        with self._lock:
            entry = self._data.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key, value) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._data) >= self.size:
                self._data.clear()
            self._data[key] = (time.monotonic() + self.ttl, value)


SPF_RESULT_NAMES = ("fail", "softfail", "neutral", "permerror", "temperror")


async def spf(resolver: Resolver, ip: str, sender: str, helo_name: str, config: CheckConfig,
              cache: ResultCache | None = None) -> tuple[CheckResult, SPFResult | None]:
    """RFC 7208 with pyspf (in a thread); the action is chosen per result."""
    started = time.monotonic()
    key = spf_key(ip, sender, helo_name)
    found: SPFResult | None = cache.get(key) if cache else None
    if found is None:
        try:
            found = await asyncio.to_thread(check_spf, ip, sender, helo_name, resolver)
        except Exception as exc:  # noqa: BLE001 - pyspf on a hostile record: recorded as a temporary error
            log.exception("SPF check of <%s> from %s failed", sender, ip)
            return decide("spf", TEMPERROR, config.spf_temperror_action, seconds=time.monotonic() - started,
                          reason=Refusal.SPF, reject="", tempfail="", error=str(exc)[:200],
                          temperror="451 4.4.3 SPF check failed temporarily, try again later"), None
        if cache and found.result != "temperror":
            cache.put(key, found)
    return spf_outcome(found, ip, sender, helo_name, config, time.monotonic() - started), found


def spf_key(ip: str, sender: str, helo_name: str) -> tuple:
    return ip, sender.lower(), helo_name.lower()


def spf_outcome(found: SPFResult, ip: str, sender: str, helo_name: str, config: CheckConfig,
                seconds: float) -> CheckResult:
    """The configured action for an SPF result."""
    result = found.result
    action = config.values.get(f"spf_{result}_action", CheckAction.LOG) if result in SPF_RESULT_NAMES \
        else CheckAction.LOG
    score = config.values.get(f"spf_{result}_score", 0.0) if result in SPF_RESULT_NAMES else 0.0
    domain = found.domain or (sender.rpartition("@")[2] if sender else helo_name)
    explanation = _safe_text(found.explanation or "", 200)
    detail = {"domain": domain, "identity": found.identity}
    if found.mechanism:
        detail["mechanism"] = found.mechanism
    if found.problem:
        detail["problem"] = _safe_text(found.problem, 200)
    if result == "fail":
        # The domain's own explanation (exp=) when it gives one; pyspf's stock text says less than ours.
        own = f" ({explanation})" if explanation and explanation != "SPF fail - not authorized" else ""
        reject = f"550 5.7.23 SPF check failed: {domain} does not designate {ip} as permitted sender{own}"
        tempfail = "451 4.7.23" + reject[10:]
    elif result == "permerror":
        reject = f"550 5.7.24 SPF record of {domain} is invalid: {_safe_text(found.problem or '', 120)}"
        tempfail = "451 4.7.24" + reject[10:]
    else:
        reject = f"550 5.7.23 SPF check {result} for {domain}: {ip} is not permitted"
        tempfail = "451 4.7.23" + reject[10:]
    return decide("spf", result, action, score=score, seconds=seconds,
                  reason=Refusal.SPF, reject=reject, tempfail=tempfail,
                  temperror=f"451 4.4.3 SPF check of {domain} failed temporarily (DNS), try again later",
                  **detail)


# --- DATA --------------------------------------------------------------------------------------------------

def _dkim_result(signatures) -> str:
    if not signatures:
        return "none"
    if any(s.passed for s in signatures):
        return "pass"
    for result in ("fail", "permerror", "temperror", "neutral"):
        if any(s.result == result for s in signatures):
            return result
    return signatures[0].result


def is_signed(data: bytes) -> bool:
    return b"dkim-signature:" in header_section(data).lower()


_FROM_FIELD = re.compile(rb"^from[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def header_from_domains(data: bytes) -> list[str]:
    """The distinct domains of the header From addresses (RFC 7489 §6.6.1), read quickly: the fields are
    unfolded and split with email.utils (the full RFC 5322 parser costs ten times more per message)."""
    from email.utils import getaddresses

    values = [" ".join(m.group(1).decode("utf-8", "replace").split()) for m in _FROM_FIELD.finditer(
        header_section(data))]
    domains: list[str] = []
    for _, address in getaddresses(values):
        if "@" in address:
            domain = address.rpartition("@")[2].strip().rstrip(".").lower()
            if domain and domain not in domains:
                domains.append(domain)
    return domains


def dmarc_names(domain: str) -> list[str]:
    """The names DMARC policy discovery may ask for ``domain``: _dmarc.<domain>, then its organisational one."""
    names = [f"_dmarc.{domain}"]
    org = dmarc_auth.organizational_domain(domain)
    if org != domain:
        names.append(f"_dmarc.{org}")
    return names


def authenticate_message(data: bytes, spf_result: SPFResult | None, resolver: Resolver, config: CheckConfig,
                         authserv_id: str, from_domains: list[str] | None = None, *, protected: Sequence[str] = (),
                         client_ip: str | None = None) -> tuple[list[CheckResult], str]:
    """DKIM (every signature), DMARC and, when the message claims some of our domains (`protected`, see
    gateway.policy.senders), the protected-sender check; the Authentication-Results header field.

    Blocking (DNS, RSA): the SMTP server runs it in a thread, or inline when the message is unsigned and the
    DMARC records are in the resolver's cache.
    """
    results: list[CheckResult] = []
    signatures = []
    started = time.monotonic()
    if is_signed(data) and (config.action("dkim") != CheckAction.OFF or
                            config.action("dmarc_reject") != CheckAction.OFF or
                            config.action("dmarc_quarantine") != CheckAction.OFF or
                            (protected and config.action("protected_sender") != CheckAction.OFF)):
        try:
            signatures = dkim_auth.verify(data, resolver)
        except Exception as exc:  # noqa: BLE001 - a message dkimpy cannot parse has no usable signature
            log.warning("DKIM verification raised %s", exc)
            signatures = []
    if config.action("dkim") != CheckAction.OFF:
        result = _dkim_result(signatures)
        # A signature that cannot be checked now (temperror) scores nothing: it is not a finding.
        action = config.action("dkim") if result in ("fail", "permerror", "neutral") else CheckAction.LOG
        outcome = decide("dkim", "fail" if result in ("fail", "permerror", "neutral") else result, action,
                         score=config.score("dkim"), seconds=time.monotonic() - started, reason="", reject="",
                         tempfail="",
                         signatures=[{"d": s.domain, "s": s.selector, "a": s.algorithm, "result": s.result,
                                      **({"reason": s.reason} if s.reason else {})} for s in signatures])
        if signatures:
            outcome.result = result
        results.append(outcome)

    chosen = None
    if config.action("dmarc_reject") != CheckAction.OFF or config.action("dmarc_quarantine") != CheckAction.OFF:
        started = time.monotonic()
        if from_domains is None:
            try:
                from_domains = header_from_domains(data)
            except Exception:  # noqa: BLE001
                from_domains = []
        domains = from_domains
        evaluated = []
        for domain in domains[:5]:
            try:
                evaluated.append(dmarc_auth.evaluate(domain, spf=spf_result, dkim=signatures, resolver=resolver))
            except Exception as exc:  # noqa: BLE001
                log.warning("DMARC evaluation of %s raised %s", domain, exc)
                evaluated.append(dmarc_auth.DMARCResult("temperror", "none", domain, reason=str(exc)[:200]))
        order = {"reject": 0, "quarantine": 1, "none": 2}
        failing = sorted((r for r in evaluated if r.result == "fail"), key=lambda r: order.get(r.policy, 3))
        chosen = (failing[0] if failing else
                  next((r for r in evaluated if r.result == "temperror"), None) or
                  next((r for r in evaluated if r.result == "pass"), None) or
                  (evaluated[0] if evaluated else None))
        seconds = time.monotonic() - started
        if chosen is None:
            results.append(CheckResult("dmarc", "none", seconds=seconds, detail={"why": "no From domain"}))
        else:
            detail = {"domain": chosen.from_domain, "policy": chosen.policy}
            if chosen.requested_policy:
                detail["requested"] = chosen.requested_policy
            if chosen.reason:
                detail["why"] = chosen.reason
            if chosen.result == "fail" and chosen.policy in ("reject", "quarantine"):
                name = f"dmarc_{chosen.policy}"
                action, score = config.action(name), config.score(name)
            elif chosen.result == TEMPERROR:
                action, score = config.dmarc_temperror_action, 0.0
            else:
                action, score = CheckAction.LOG, 0.0
            domain = chosen.from_domain
            results.append(decide(
                "dmarc", chosen.result if chosen.result in ("fail", TEMPERROR) else
                ("pass" if chosen.result == "pass" else "none"), action, score=score, seconds=seconds,
                reason=Refusal.DMARC,
                reject=f"550 5.7.1 Email rejected per DMARC policy for {domain}",
                tempfail=f"451 4.7.1 Email deferred per DMARC policy for {domain}",
                temperror=f"451 4.4.3 DMARC policy of {domain} could not be looked up, try again later",
                **detail))
            if chosen.result == "permerror":
                results[-1].result = "permerror"
    if protected and config.action("protected_sender") != CheckAction.OFF:
        results.append(senders.protected_sender(protected, spf_result, signatures, client_ip, config))
    header = ""
    if spf_result is not None or signatures or chosen is not None:
        header = "Authentication-Results: " + dmarc_auth.authentication_results(
            authserv_id, spf=spf_result, dkim=signatures, dmarc=chosen) + "\r\n"
    return results, header
