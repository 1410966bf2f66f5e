"""Greylisting (as postgrey): a triplet (client network, envelope sender, recipient) seen for the first time
is refused with 451 4.7.1; a retry after the delay and within the retry window passes, and the triplet then
passes at once for as long as it is used at least every `greylist_lifetime_days` days.

The triplets are rows (every node sees the same ones); a node remembers the ones that passed for an hour, so
a known correspondent costs no database work on the hot path.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from datetime import timedelta

from django.db import IntegrityError, close_old_connections, transaction
from django.utils import timezone

from gateway.models import GreylistEntry

from .limits import ExpiringSet

PASSED_CACHE_SECONDS = 3600


@dataclass(frozen=True)
class Verdict:
    passed: bool
    state: str  # new | early | passed | known | restarted
    wait: int = 0  # seconds until a retry can pass


def client_network(ip: str, ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> str:
    """The network a client's retries may come from (big senders retry from another host of a pool)."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def triplet_key(network: str, sender: str, recipient: str) -> str:
    return hashlib.sha256(f"{network}\0{sender.lower()}\0{recipient.lower()}".encode()).hexdigest()


class Greylist:
    def __init__(self):
        self.passed = ExpiringSet(PASSED_CACHE_SECONDS, size=200_000)

    def known(self, ip: str, sender: str, recipient: str, *, ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> bool:
        """Did this triplet pass on this node within the hour? (No database: safe on the event loop.)"""
        return triplet_key(client_network(ip, ipv4_prefix, ipv6_prefix), sender, recipient) in self.passed

    def check(self, ip: str, sender: str, recipient: str, *, delay: int, retry_window_hours: int,
              lifetime_days: int, ipv4_prefix: int = 24, ipv6_prefix: int = 64, now=None) -> Verdict:
        """The verdict for one attempt, recorded. Synchronous (database): run it in the thread pool."""
        network = client_network(ip, ipv4_prefix, ipv6_prefix)
        key = triplet_key(network, sender, recipient)
        if key in self.passed:
            return Verdict(True, "known")
        close_old_connections()
        verdict = self._check_row(key, network, sender.lower(), recipient.lower(), delay=delay,
                                  retry_window=timedelta(hours=retry_window_hours),
                                  lifetime=timedelta(days=lifetime_days), now=now or timezone.now())
        if verdict.passed:
            self.passed.add(key)
        return verdict

    @staticmethod
    def _check_row(key, network, sender, recipient, *, delay, retry_window, lifetime, now) -> Verdict:
        entry = GreylistEntry.objects.filter(key=key).first()
        if entry is None:
            try:
                with transaction.atomic():
                    GreylistEntry.objects.create(key=key, client_network=network, sender=sender[:320],
                                                 recipient=recipient[:320], first_seen=now, last_seen=now)
                return Verdict(False, "new", delay)
            except IntegrityError:  # another node or session created it a moment ago
                entry = GreylistEntry.objects.get(key=key)
        if entry.passed_at is not None:
            if now - entry.last_seen <= lifetime:
                GreylistEntry.objects.filter(pk=entry.pk).update(last_seen=now, attempts=entry.attempts + 1)
                return Verdict(True, "passed")
            # Unused for longer than the lifetime: a stranger again.
            GreylistEntry.objects.filter(pk=entry.pk).update(first_seen=now, last_seen=now, passed_at=None,
                                                             attempts=1)
            return Verdict(False, "restarted", delay)
        waited = (now - entry.first_seen).total_seconds()
        if waited < delay:
            GreylistEntry.objects.filter(pk=entry.pk).update(last_seen=now, attempts=entry.attempts + 1)
            return Verdict(False, "early", int(delay - waited) + 1)
        if now - entry.first_seen > timedelta(seconds=delay) + retry_window:
            GreylistEntry.objects.filter(pk=entry.pk).update(first_seen=now, last_seen=now, attempts=1)
            return Verdict(False, "restarted", delay)
        GreylistEntry.objects.filter(pk=entry.pk).update(passed_at=now, last_seen=now, attempts=entry.attempts + 1)
        return Verdict(True, "passed")


def purge(*, retry_window_hours: int, lifetime_days: int, now=None, batch: int = 5000) -> int:
    """Forget triplets that never passed within the retry window, and passed ones unused for the lifetime."""
    now = now or timezone.now()
    stale_new = GreylistEntry.objects.filter(passed_at__isnull=True,
                                             last_seen__lt=now - timedelta(hours=retry_window_hours) -
                                             timedelta(days=1))
    stale_passed = GreylistEntry.objects.filter(passed_at__isnull=False,
                                                last_seen__lt=now - timedelta(days=lifetime_days))
    removed = 0
    for queryset in (stale_new, stale_passed):
        while True:
            ids = list(queryset.values_list("pk", flat=True)[:batch])
            if not ids:
                break
            removed += GreylistEntry.objects.filter(pk__in=ids).delete()[0]
    return removed
