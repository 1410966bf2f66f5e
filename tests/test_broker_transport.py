"""The Redis transport of the task queue (appliance/redis_transport.py): kombu's, with one Redis client per
channel instead of one per publish and acknowledgement. Against a real Redis."""

import os
import subprocess
import sys
from pathlib import Path

from kombu import Connection

from appliance.redis_transport import Channel, Transport
from tests.services import require

ROOT = Path(__file__).resolve().parent.parent


def test_messages_go_through_and_the_channel_makes_one_client(monkeypatch):
    url = require("redis")
    made = []
    create = Channel._create_client

    def counting(self, asynchronous=False):
        client = create(self, asynchronous)
        if not asynchronous:
            made.append(client)
        return client

    monkeypatch.setattr(Channel, "_create_client", counting)
    with Connection(url, transport=Transport) as connection:
        queue = connection.SimpleQueue("mailgate-transport-test")
        queue.clear()
        for n in range(20):
            queue.put({"message_id": n})
        received = []
        for _ in range(20):
            message = queue.get(timeout=5)
            received.append(message.payload["message_id"])
            message.ack()
        channel = queue.channel
        unacked = channel.client.hlen(channel.unacked_key)
        queue.close()
    assert received == list(range(20))
    assert unacked == 0  # every acknowledgement was recorded
    assert len(made) == 1  # 20 publishes, 20 deliveries and 20 acknowledgements over one client


def test_a_new_pool_gets_a_new_client():
    url = require("redis")
    with Connection(url, transport=Transport) as connection:
        channel = connection.channel()
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as again:
            assert first is again and first.connection_pool is channel.pool
        channel._disconnect_pools()  # as after a fork: kombu drops the pool
        with channel.conn_or_acquire() as after:
            assert after is not first and after.connection_pool is channel.pool
            assert after.ping()
        channel.close()


def test_a_redis_broker_url_selects_it_and_others_keep_kombus_own():
    def transport_for(url: str) -> str:
        code = ("import django; django.setup(); from appliance.celery import app; "
                "print(app.connection_for_write().transport_cls)")
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "appliance.settings", "CELERY_BROKER_URL": url}
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60, check=True)
        return done.stdout.strip().splitlines()[-1]

    assert transport_for("redis://127.0.0.1:6379/15") == "appliance.redis_transport:Transport"
    assert transport_for("amqp://guest@127.0.0.1//") == "amqp"
