"""What the SMTP server enforces, as a snapshot it reloads every SMTP_POLICY_TTL seconds: `ServerConfig`
(our domains and their recipient check, valid recipients, trusted networks, limits) with its `CheckConfig`
(SMTPPolicy's actions and scores, the DNSBL zones, the patterns of the allow/block lists); and the switch
of the DNS-based checks."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache

import dns.resolver
from django.conf import settings
from django.db import close_old_connections
from django.forms.models import model_to_dict

from gateway.models import (
    CheckAction,
    DNSBLZone,
    Domain,
    MailFlowSettings,
    SenderListEntry,
    SMTPPolicy,
    TrustedNetwork,
    ValidRecipient,
)

log = logging.getLogger(__name__)

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
    values = model_to_dict(SMTPPolicy.load())
    zones = tuple(
        Zone(z.zone, z.action, z.score,
             tuple(ipaddress.ip_network(a, strict=False) for a in z.answers.replace(",", " ").split()))
        for z in DNSBLZone.objects.filter(enabled=True).exclude(action=CheckAction.OFF))
    patterns = tuple(sorted(set(SenderListEntry.objects.values_list("sender", flat=True))))
    return _config(values, zones, patterns)


@dataclass
class ServerConfig:
    """A snapshot of the configuration the SMTP server checks every command against: our domains and
    their recipient check, the valid recipients, the trusted networks, the limits, and the checks."""

    domains: dict[str, str] = field(default_factory=dict)  # name → recipient check mode
    valid_recipients: frozenset[str] = frozenset()
    trusted: tuple = ()
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    checks: CheckConfig = field(default_factory=defaults)  # SMTPPolicy, DNSBL zones, list patterns
    loaded_at: float = 0.0

    def is_trusted(self, ip: str | None) -> bool:
        if not ip:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.domains


def load_server_config() -> ServerConfig:
    close_old_connections()
    try:
        config = MailFlowSettings.load()
        domains = dict(Domain.objects.filter(active=True).values_list("name", "recipient_check"))
        listed = [d for d, mode in domains.items() if mode == Domain.RecipientCheck.LIST]
        valid = frozenset(ValidRecipient.objects.filter(domain__name__in=listed).values_list("address", flat=True))
        trusted = tuple(ipaddress.ip_network(n) for n in TrustedNetwork.objects.values_list("network", flat=True))
        return ServerConfig(domains=domains, valid_recipients=valid, trusted=trusted,
                            max_message_size=config.max_message_size, max_recipients=config.max_recipients,
                            checks=load_check_config(), loaded_at=time.monotonic())
    finally:
        close_old_connections()


class ServerConfigCache:
    """The server configuration, reloaded from the database at most every `ttl` seconds (in the background)."""

    def __init__(self, ttl: float | None = None):
        self.ttl = settings.SMTP_POLICY_TTL if ttl is None else ttl
        self._config: ServerConfig | None = None
        self._lock = threading.Lock()

    def peek(self) -> ServerConfig | None:
        """The snapshot in hand, without touching the database (safe on the event loop)."""
        return self._config

    def fresh(self) -> ServerConfig | None:
        """The snapshot in hand if it is younger than the TTL: the caller need not go to a thread for it."""
        config = self._config
        if config is not None and time.monotonic() - config.loaded_at < self.ttl:
            return config
        return None

    def get(self) -> ServerConfig:
        with self._lock:
            config = self._config
        if config is None or time.monotonic() - config.loaded_at >= self.ttl:
            try:
                config = load_server_config()
            except Exception:
                if self._config is None:
                    raise
                log.exception("could not reload the SMTP server's configuration; keeping the previous one")
                return self._config
            with self._lock:
                self._config = config
        return config




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
