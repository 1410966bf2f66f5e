"""kombu's Redis transport, with one Redis client per channel instead of one per command.

kombu's Redis channel makes a new `redis.Redis` client for every publish and every acknowledgement
(`Channel.conn_or_acquire`), and redis-py builds a case-insensitive table of ~170 reply parsers in each
client's `__init__`: about 0.06 ms of CPU each time, once per mail message in the SMTP server (the scan's
publish), and twice more per task in the worker when ack emulation is on (the task's copy in the unacked
set, its acknowledgement; off by default, docs/decisions.md). A `redis.Redis` over a connection pool is
safe to share between threads (each command takes a connection from the pool), so the channel keeps one.

Used for `redis://` brokers (appliance/settings.py sets CELERY_BROKER_TRANSPORT); anything else gets
kombu's own transport for its scheme.
"""

from __future__ import annotations

from contextlib import contextmanager

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client = None

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
            return
        shared = self._shared_client
        # A new pool after a fork or a reconnection (kombu drops the old one): a new client over it.
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared


class Transport(kombu_redis.Transport):
    Channel = Channel
