"""Where mail for a recipient's domain goes: the domain's route (our domains), else the outbound relay,
else the domain's MX hosts (RFC 5321 §5.1)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.mailauth.dns import get_sync_resolver
from gateway.models import Domain, MailFlowSettings, Route, parse_host_port
from gateway.snapshot import Snapshot


class NoRoute(Exception):
    """No mail server is known for a domain (no route, no MX): a permanent failure."""


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    require_tls: bool = False
    via_mx: bool = False

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def mx_hosts(domain: str) -> list[str]:
    """The domain's MX hosts by preference, or the domain itself (RFC 5321 §5.1 implicit MX).

    Raises NoRoute for a domain that does not exist or accepts no mail (null MX, RFC 7505), and
    TemporaryDNSError when the look-up fails (the delivery is deferred).
    """
    lookup = get_sync_resolver().lookup(domain, "MX")
    if lookup.nxdomain:
        raise NoRoute(f"domain {domain} does not exist")
    records = sorted((r.preference, str(r.exchange).rstrip(".")) for r in lookup.rdatas)
    if not records:
        return [domain]
    hosts = [host for _, host in records]
    if hosts == [""]:
        raise NoRoute(f"domain {domain} accepts no mail (null MX)")
    return hosts


def _read_routes() -> dict[str, Domain]:
    return {d.name: d for d in Domain.objects.filter(active=True).select_related("route")}


# The active domains with their routes: a look-up on the path of every message otherwise.
_routes = Snapshot(_read_routes).clear_on_change(Domain, Route)


def active_routes() -> dict[str, Domain]:
    """The active domains with their routes, as read at most CONFIG_CACHE_SECONDS ago (at once after a
    change saved in this process)."""
    return _routes.get()


def destination_for(domain: str, config: MailFlowSettings, routes: dict[str, Domain]) -> list[Destination]:
    """Where mail for a domain goes: its route, else the outbound relay, else its MX hosts."""
    local = routes.get(domain)
    if local is not None:
        return [Destination(local.route.host, local.route.port, local.route.require_tls)]
    if config.outbound_relay:
        host, port = parse_host_port(config.outbound_relay, default_port=25)
        return [Destination(host, port)]
    return [Destination(host, 25, via_mx=True) for host in mx_hosts(domain)]
