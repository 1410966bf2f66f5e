"""The SMTP server's resolver: gateway.mailauth.dns, with a short in-process cache.

A busy MX asks about the same client networks, HELO names and sender domains again and again; each answer
(records, NXDOMAIN or NODATA) is kept `SMTP_DNS_CACHE_TTL` seconds. A temporary failure is never kept: the
next question goes out again. The async resolver and its blocking twin (for pyspf, dkimpy, DMARC, which run
in threads) share one cache.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from gateway.mailauth.dns import Lookup, Resolver, SyncResolver

MAX_ENTRIES = 50_000


class LookupCache:
    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES):
        self.ttl = ttl
        self.max_entries = max_entries
        self._data: OrderedDict[tuple[str, str], tuple[float, Lookup]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, rdtype: str) -> Lookup | None:
        if self.ttl <= 0:
            return None
        key = (name.lower().rstrip("."), rdtype)
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry[0] < time.monotonic():
                del self._data[key]
                return None
            return entry[1]

    def put(self, name: str, rdtype: str, lookup: Lookup) -> None:
        if self.ttl <= 0:
            return
        key = (name.lower().rstrip("."), rdtype)
        with self._lock:
            self._data[key] = (time.monotonic() + self.ttl, lookup)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


class CachingSyncResolver(SyncResolver):
    def __init__(self, nameservers, port, timeout, cache: LookupCache):
        super().__init__(nameservers, port, timeout)
        self.cache = cache

    def lookup(self, name: str, rdtype: str, *, lifetime: float | None = None) -> Lookup:
        found = self.cache.get(name, rdtype)
        if found is None:
            found = super().lookup(name, rdtype, lifetime=lifetime)  # TemporaryDNSError passes through
            self.cache.put(name, rdtype, found)
        return found


class CachingResolver(Resolver):
    def __init__(self, nameservers=None, port=None, timeout=None, *, ttl: float = 60.0):
        super().__init__(nameservers, port, timeout)
        self.cache = LookupCache(ttl)

    def sync(self) -> CachingSyncResolver:
        if self._sync is None:
            self._sync = CachingSyncResolver(self.nameservers, self.port, self.timeout, self.cache)
        return self._sync

    async def lookup(self, name: str, rdtype: str) -> Lookup:
        found = self.cache.get(name, rdtype)
        if found is None:
            found = await super().lookup(name, rdtype)
            self.cache.put(name, rdtype, found)
        return found
