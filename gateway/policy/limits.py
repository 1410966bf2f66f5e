"""Per-client-IP counters: open connections, messages per minute and failed AUTH per window.

Each node counts in memory (the hot path asks no database for them). With Redis configured
(SMTP_SHARED_LIMITS_URL, by default the Celery broker when it is Redis) the same counts are kept there too,
for every node together, and the limits are enforced on those: N nodes behind one MX name allow the limit
once, not N times. Redis that does not answer (within SHARED_LIMITS_TIMEOUT) leaves each node enforcing the
limits on its own counts, with a warning: the mail goes on, the limits hold per node, as before.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import OrderedDict, defaultdict

log = logging.getLogger(__name__)


class SlidingCounter:
    """Events per window per key, by two fixed buckets (the current one and the previous one weighted by
    how much of it still lies in the window): O(1) memory per key, accurate to a few percent."""

    def __init__(self, window: float = 60.0, clock=time.monotonic):
        self.window = window
        self.clock = clock
        self._buckets: dict[str, tuple[int, int, int]] = {}  # key → (bucket index, current, previous)
        self._calls = 0

    def _rate(self, key: str, now: float, add: int) -> float:
        index = int(now // self.window)
        bucket, current, previous = self._buckets.get(key, (index, 0, 0))
        if bucket != index:
            previous = current if bucket == index - 1 else 0
            current = 0
        current += add
        self._buckets[key] = (index, current, previous)
        elapsed = (now % self.window) / self.window
        return current + previous * (1.0 - elapsed)

    def hit(self, key: str) -> float:
        """Count one event; the number in the last window, this one included."""
        self._calls += 1
        now = self.clock()
        if self._calls % 10_000 == 0:
            self._expire(now)
        return self._rate(key, now, 1)

    def count(self, key: str) -> float:
        return self._rate(key, self.clock(), 0) if key in self._buckets else 0.0

    def reset(self, key: str) -> None:
        self._buckets.pop(key, None)

    def _expire(self, now: float) -> None:
        index = int(now // self.window)
        for key in [k for k, (bucket, _, _) in self._buckets.items() if bucket < index - 1]:
            del self._buckets[key]


class ExpiringSet:
    """Keys remembered for `ttl` seconds, at most `size` of them (the oldest forgotten first)."""

    def __init__(self, ttl: float, size: int = 100_000, clock=time.monotonic):
        self.ttl, self.size, self.clock = ttl, size, clock
        self._data: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        expires = self._data.get(key)
        if expires is None:
            return False
        if expires < self.clock():
            del self._data[key]
            return False
        return True

    def add(self, key: str, ttl: float | None = None) -> None:
        self._data[key] = self.clock() + (self.ttl if ttl is None else ttl)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def discard(self, key: str) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()


class SharedCounts:
    """The per-IP counts of every node, in Redis (asyncio client: the event loop never blocks on it).

    - Open connections: a sorted set per IP, one member per connection (node, process, connection), scored
      with the time it opened; a member older than CONNECTION_LIFETIME is not counted and is dropped (what
      a node that died left behind ages out).
    - Messages and AUTH failures: the two fixed buckets of SlidingCounter, as two keys per IP and window
      (INCR, EXPIRE), read with the same weighting: the rate of the last window, accurate to a few percent.
    """

    PREFIX = "mailgate:limits"
    # Longer than any SMTP session lives in practice (SMTP_TIMEOUT is per command); a longer one is no
    # longer counted after this, rather than a dead node's connections being counted for ever.
    CONNECTION_LIFETIME = 3600.0

    def __init__(self, url: str, timeout: float = 0.5, clock=time.time):
        import redis.asyncio as aioredis

        self.url = url
        self.clock = clock
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.process = f"{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def connection_member(self, connection_id: int) -> str:
        return f"{self.process}:{connection_id}"

    async def connection_opened(self, ip: str, member: str) -> int:
        key, now = f"{self.PREFIX}:conn:{ip}", self.clock()
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", now - self.CONNECTION_LIFETIME)
            pipe.zadd(key, {member: now})
            pipe.zcard(key)
            pipe.expire(key, int(self.CONNECTION_LIFETIME))
            _, _, count, _ = await pipe.execute()
        return int(count)

    async def connection_closed(self, ip: str, member: str) -> None:
        await self.client.zrem(f"{self.PREFIX}:conn:{ip}", member)

    async def hit(self, kind: str, ip: str, window: float) -> float:
        return await self._rate(kind, ip, window, 1)

    async def count(self, kind: str, ip: str, window: float) -> float:
        return await self._rate(kind, ip, window, 0)

    async def _rate(self, kind: str, ip: str, window: float, add: int) -> float:
        now = self.clock()
        index = int(now // window)
        current, previous = (f"{self.PREFIX}:{kind}:{int(window)}:{ip}:{i}" for i in (index, index - 1))
        async with self.client.pipeline(transaction=True) as pipe:
            if add:
                pipe.incrby(current, add)
                pipe.expire(current, int(2 * window) + 1)
            else:
                pipe.get(current)
            pipe.get(previous)
            found = await pipe.execute()
        count, before = int(found[0] or 0), int(found[-1] or 0)
        elapsed = (now % window) / window
        return count + before * (1.0 - elapsed)

    async def close(self) -> None:
        await self.client.aclose()


class ClientLimits:
    """What the SMTP server counts per client IP: on this node, and for all nodes in `shared` when given."""

    def __init__(self, clock=time.monotonic, shared: SharedCounts | None = None):
        self.connections: dict[str, int] = defaultdict(int)
        self.messages = SlidingCounter(60.0, clock)
        self.auth_failures = SlidingCounter(60.0, clock)
        self.greeted = ExpiringSet(24 * 3600, clock=clock)  # clients that waited for the greeting
        self.shared = shared
        self._warned_at = 0.0

    def connect(self, ip: str) -> int:
        self.connections[ip] += 1
        return self.connections[ip]

    def disconnect(self, ip: str) -> None:
        count = self.connections.get(ip, 0) - 1
        if count > 0:
            self.connections[ip] = count
        else:
            self.connections.pop(ip, None)

    def auth_failure_window(self, minutes: int) -> None:
        window = max(1, minutes) * 60.0
        if self.auth_failures.window != window:
            self.auth_failures = SlidingCounter(window, self.auth_failures.clock)

    # --- the counts that are enforced: every node's when shared, else this node's ---------------------

    async def connection_count(self, ip: str, member: str) -> tuple[int, bool]:
        """The open connections of `ip` (this one, already counted here, included), and whether `member` was
        counted in Redis too (then `forget_connection` must take it out again)."""
        local = self.connections.get(ip, 0)
        if self.shared is not None:
            try:
                return max(local, await self.shared.connection_opened(ip, member)), True
            except Exception as exc:  # noqa: BLE001 - Redis down: this node's count, not no limit
                self._unshared(exc)
        return local, False

    async def forget_connection(self, ip: str, member: str) -> None:
        if self.shared is not None:
            try:
                await self.shared.connection_closed(ip, member)
            except Exception as exc:  # noqa: BLE001 - it ages out (CONNECTION_LIFETIME)
                self._unshared(exc)

    async def message(self, ip: str) -> float:
        """Count a message of `ip`; its rate per minute, this one included."""
        return await self._with_shared(self.messages.hit(ip), lambda: self.shared.hit("msg", ip, self.messages.window))

    async def auth_failure(self, ip: str) -> float:
        """Count a failed AUTH of `ip`; its failures in the window, this one included."""
        return await self._with_shared(self.auth_failures.hit(ip),
                                       lambda: self.shared.hit("auth", ip, self.auth_failures.window))

    async def auth_failure_count(self, ip: str) -> float:
        return await self._with_shared(self.auth_failures.count(ip),
                                       lambda: self.shared.count("auth", ip, self.auth_failures.window))

    async def _with_shared(self, local: float, ask) -> float:
        """The larger of this node's count and every node's (Redis); this node's alone while Redis fails."""
        if self.shared is not None:
            try:
                return max(local, await ask())
            except Exception as exc:  # noqa: BLE001 - any failure of the shared store: count alone meanwhile
                self._unshared(exc)
        return local

    def _unshared(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at > 60:  # once a minute, not once a connection
            self._warned_at = now
            log.warning("shared limits: Redis (%s) does not answer (%s); each node enforces its own counts",
                        self.shared.url.split("@")[-1], exc)


def shared_counts(url: str, timeout: float) -> SharedCounts | None:
    """The Redis counts of SMTP_SHARED_LIMITS_URL, or None when it is empty."""
    if not url:
        return None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"SMTP_SHARED_LIMITS_URL: a redis:// URL, not {url.split('@')[-1]!r}")
    return SharedCounts(url, timeout)
