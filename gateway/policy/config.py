"""The SMTP policy as the server enforces it: a snapshot of SMTPPolicy, the DNSBL zones and the patterns of
the allow/block lists, loaded with the rest of the server's policy (gateway.smtp.intake.load_policy)."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from functools import lru_cache

import dns.resolver
from django.conf import settings
from django.forms.models import model_to_dict

from gateway.models import CheckAction, DNSBLZone, SMTPPolicy

# Any 127.0.0.0/8 answer lists a client, except Spamhaus's error codes (127.255.255.252-255: "you ask
# through a public resolver", "over the free limit"): those must never block mail.
DEFAULT_LISTED = (ipaddress.ip_network("127.0.0.0/8"),)
NOT_LISTED = (ipaddress.ip_network("127.255.255.0/24"),)


@dataclass(frozen=True)
class Zone:
    zone: str
    action: str
    score: float
    answers: tuple = ()

    def lists(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if self.answers:
            return any(ip in network for network in self.answers)
        return any(ip in n for n in DEFAULT_LISTED) and not any(ip in n for n in NOT_LISTED)


@dataclass(frozen=True)
class CheckConfig:
    values: dict = field(default_factory=dict)  # SMTPPolicy's fields
    zones: tuple[Zone, ...] = ()
    list_patterns: tuple[str, ...] = ()  # sender patterns of all allow/block list entries
    version: str = ""  # a digest of all the above: results decided under an equal configuration are reusable

    def __getattr__(self, name: str):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def action(self, name: str) -> str:
        return self.values.get(f"{name}_action", CheckAction.OFF)

    def score(self, name: str) -> float:
        return float(self.values.get(f"{name}_score", 0.0))


def _version(values: dict, zones: tuple, patterns: tuple) -> str:
    text = repr((sorted((k, v) for k, v in values.items() if k != "id"), zones, patterns))
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def _config(values: dict, zones: tuple = (), patterns: tuple = ()) -> CheckConfig:
    return CheckConfig(values=values, zones=zones, list_patterns=patterns, version=_version(values, zones, patterns))


def defaults() -> CheckConfig:
    return _config(model_to_dict(SMTPPolicy()))


def load_check_config() -> CheckConfig:
    from quarantine.models import SenderListEntry

    values = model_to_dict(SMTPPolicy.load())
    zones = tuple(
        Zone(z.zone, z.action, z.score,
             tuple(ipaddress.ip_network(a, strict=False) for a in z.answers.replace(",", " ").split()))
        for z in DNSBLZone.objects.filter(enabled=True).exclude(action=CheckAction.OFF))
    patterns = tuple(sorted(set(SenderListEntry.objects.values_list("sender", flat=True))))
    return _config(values, zones, patterns)


@lru_cache(maxsize=1)
def _system_resolver_configured() -> bool:
    try:
        return bool(dns.resolver.Resolver().nameservers)
    except (dns.resolver.NoResolverConfiguration, OSError):
        return False


def dns_checks_enabled() -> bool:
    """SMTP_DNS_CHECKS: 'true', 'false', or 'auto' (on when a resolver is configured)."""
    value = str(settings.SMTP_DNS_CHECKS).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return bool(settings.DNS_NAMESERVERS) or _system_resolver_configured()


def dns_checks_state() -> str:
    """How the log says the DNS checks are off (empty when they are on)."""
    if dns_checks_enabled():
        return ""
    value = str(settings.SMTP_DNS_CHECKS).strip().lower()
    return "off: SMTP_DNS_CHECKS=false" if value not in ("auto", "") else "off: no DNS resolver is configured"
