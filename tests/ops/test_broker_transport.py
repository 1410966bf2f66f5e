"""The Redis transport of the task queue (appliance/redis_transport.py): kombu's, with one Redis client per
channel instead of one per publish and acknowledgement, and no copy of a running task kept in Redis
(ack emulation off; the rows are the truth, docs/decisions.md). Against a real Redis."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis
from kombu import Connection

from appliance.redis_transport import Channel, Transport
from tests.support.services import require

ROOT = Path(__file__).resolve().parents[2]


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


def last_line_printed(code: str, broker_url: str) -> str:
    """Run Python code in a new process of the product's, with this broker configured; its last line out."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "appliance.settings", "CELERY_BROKER_URL": broker_url,
           "CELERY_TASK_ALWAYS_EAGER": "false"}
    env.pop("CELERY_REDIS_ACK_EMULATION", None)
    done = subprocess.run([sys.executable, "-c", f"import django; django.setup(); {code}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    return (done.stdout.strip().splitlines() or [""])[-1]


def test_a_redis_broker_url_selects_it_and_others_keep_kombus_own():
    def transport_for(url: str) -> str:
        return last_line_printed("from appliance.celery import app; print(app.connection_for_write().transport_cls)",
                                 url)

    assert transport_for("redis://127.0.0.1:6379/15") == "appliance.redis_transport:Transport"
    assert transport_for("amqp://guest@127.0.0.1//") == "amqp"


def test_a_task_taken_leaves_no_copy_in_redis_and_a_closed_channel_puts_it_back():
    url = require("redis")
    queue_name = f"mailgate-unacked-{uuid.uuid4().hex[:8]}"
    options = {"visibility_timeout": 3600, "ack_emulation": False}  # what the settings give a redis:// broker
    client = redis.Redis.from_url(url)
    with Connection(url, transport=Transport, transport_options=options) as connection:
        queue = connection.SimpleQueue(queue_name)
        queue.put({"message_id": 7})
        message = queue.get(timeout=5)  # taken, not acknowledged: as a worker holds a task it runs
        channel = queue.channel
        assert message.payload == {"message_id": 7}
        assert not [v for v in client.hvals(channel.unacked_key) if queue_name.encode() in v]
        assert client.llen(queue_name) == 0
        queue.close()  # a clean stop: what was taken and not acknowledged goes back
    assert client.llen(queue_name) == 1
    client.delete(queue_name)


def test_a_worker_stopping_cleanly_puts_back_the_task_it_was_holding():
    """A scan retried later (countdown) waits in the worker's memory; on SIGTERM it goes back to Redis."""
    url = require("redis")
    queue_name = f"mailgate-restore-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "appliance.settings", "CELERY_BROKER_URL": url,
           "CELERY_TASK_ALWAYS_EAGER": "false"}
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "appliance", "worker", "-l", "info", "-Q",
                               queue_name, "--concurrency", "1", "-n", f"{queue_name}@%h", "--without-gossip",
                               "--without-mingle", "--without-heartbeat"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = redis.Redis.from_url(url)
    try:
        from appliance.celery import app

        with Connection(url, transport=Transport, transport_options={"ack_emulation": False}) as connection:
            # One that runs at once (a message that is not there: the task returns "gone")...
            app.send_task("gateway.tasks.scan_message", args=(424241,), queue=queue_name, connection=connection)
            # ... and one that waits.
            app.send_task("gateway.tasks.scan_message", args=(424242,), countdown=600, queue=queue_name,
                          connection=connection)
        deadline = time.monotonic() + 60
        while client.llen(queue_name) and time.monotonic() < deadline:  # the worker takes it
            time.sleep(0.1)
        assert client.llen(queue_name) == 0, "the worker did not take the task"
        time.sleep(1)
        # Nothing of it in Redis while it waits (with ack emulation, a copy would sit in the "unacked" hash).
        assert not [v for v in client.hvals("unacked") if queue_name.encode() in v]
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0, output
        # At -l info the worker does not add Celery's "received" / "succeeded" lines for every task.
        assert "ready." in output and " received" not in output and "succeeded" not in output, output
        back = [json.loads(m) for m in client.lrange(queue_name, 0, -1)]
        assert [m["headers"]["task"] for m in back] == ["gateway.tasks.scan_message"], output
        assert [m["headers"]["argsrepr"] for m in back] == ["(424242,)"]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        client.delete(queue_name)


def test_the_settings_turn_ack_emulation_off_for_redis_only():
    def options_for(url: str) -> str:
        return last_line_printed("from django.conf import settings; "
                                 "print(settings.CELERY_BROKER_TRANSPORT_OPTIONS.get('ack_emulation'))", url)

    assert options_for("redis://127.0.0.1:6379/15") == "False"
    assert options_for("amqp://guest@127.0.0.1//") == "None"


def take_published(client: redis.Redis, ids: list[int]) -> dict[int, tuple[dict, list]]:
    """The task messages in the `celery` list whose first argument is one of `ids`, taken out of it (other
    tests share the list): first argument -> (message, decoded body [args, kwargs, embed])."""
    taken = {}
    for raw in client.lrange("celery", 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        if body[0] and body[0][0] in ids:
            taken[body[0][0]] = (message, body)
            client.lrem("celery", 1, raw)
    return taken


# Run in the product's own process: it counts the writes that carry an LPUSH, and makes Celery's saferepr fail.
PUBLISH = """
import celery.app.amqp as amqp
import redis.connection as connection
from gateway.dispatch import enqueue

amqp.saferepr = lambda *a, **k: 1 / 0
writes = []
send = connection.AbstractConnection.send_packed_command
def counting(self, command, *args, **kwargs):
    if b"LPUSH" in (command if isinstance(command, bytes) else b"".join(command)):
        writes.append(1)
    return send(self, command, *args, **kwargs)
connection.AbstractConnection.send_packed_command = counting
enqueue.scans([{m}, {m1}, {m2}])
batch = len(writes)
enqueue.scan({m3})
enqueue.learn({m4}, True)
print(batch)
"""


def test_the_mail_path_publishes_its_tasks_batched_and_with_their_arguments_shown():
    """The scans of a group commit go to Redis in one write (one pipeline); every task message carries the
    argsrepr gateway.dispatch gives it (Celery's saferepr, cheaper to skip, fails here: a publish that fell
    back on it would not arrive); what a worker reads is an ordinary task."""
    url = require("redis")
    client = redis.Redis.from_url(url)
    m = 900_000_000 + int(uuid.uuid4().int % 1_000_000)
    ids = [m + k for k in range(5)]
    code = PUBLISH.format(m=ids[0], m1=ids[1], m2=ids[2], m3=ids[3], m4=ids[4])
    batch_writes = last_line_printed(f"exec({code!r})", url)
    published = {message["headers"]["argsrepr"]: (message["headers"]["task"], args, message["headers"]["kwargsrepr"])
                 for message, (args, _, _) in take_published(client, ids).values()}
    assert batch_writes == "1"
    assert published == {
        f"({ids[0]},)": ("gateway.tasks.scan_message", [ids[0]], "{}"),
        f"({ids[1]},)": ("gateway.tasks.scan_message", [ids[1]], "{}"),
        f"({ids[2]},)": ("gateway.tasks.scan_message", [ids[2]], "{}"),
        f"({ids[3]},)": ("gateway.tasks.scan_message", [ids[3]], "{}"),
        f"({ids[4]}, True)": ("gateway.tasks.learn_message", [ids[4], True], "{}"),
    }


# The SMTP server's way (gateway.dispatch.scans.ScanSender, from an event loop) and Celery's own, from the
# task itself, in one process.
SEND_BOTH = """
import asyncio
from gateway import tasks
from gateway.dispatch.scans import ScanSender

async def send():
    sender = ScanSender(run_sync=None)  # never falls back here: a redis:// broker
    await sender.send([{m}, {m1}, {m2}])
    await sender.close()

asyncio.run(send())
tasks.scan_message.apply_async(args=({m3},), argsrepr=repr(({m3},)), kwargsrepr="{{}}")
print("sent")
"""


def lpush_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0))


def test_scans_sent_from_the_event_loop_are_the_messages_celery_sends():
    """What the SMTP server writes to Redis for the scans of a group commit (one LPUSH for all of them)
    is, field for field, what Celery writes for the same task, but for the task id, the argument and
    kombu's delivery tag; the worker reads them as it reads Celery's (the end-to-end tests run them)."""
    url = require("redis")
    client = redis.Redis.from_url(url)
    m = 910_000_000 + int(uuid.uuid4().int % 1_000_000)
    ids = [m + k for k in range(4)]
    before = lpush_calls(client)
    assert last_line_printed(f"exec({SEND_BOTH.format(m=ids[0], m1=ids[1], m2=ids[2], m3=ids[3])!r})", url) == "sent"
    assert lpush_calls(client) - before == 2  # one for the three scans of the event loop, one for Celery's
    sent = {first: (message, kwargs, embed)
            for first, (message, (_, kwargs, embed)) in take_published(client, ids).items()}
    assert sorted(sent) == ids
    celerys, celery_kwargs, celery_embed = sent[ids[3]]
    per_task = {"headers": {"id", "root_id", "argsrepr"}, "properties": {"correlation_id", "delivery_tag", "argsrepr"}}
    task_ids = set()
    for message_id in ids[:3]:
        ours, kwargs, embed = sent[message_id]
        assert (kwargs, embed) == (celery_kwargs, celery_embed)
        assert ours.keys() == celerys.keys()
        assert {k: v for k, v in ours.items() if k not in ("body", "headers", "properties")} == \
            {k: v for k, v in celerys.items() if k not in ("body", "headers", "properties")}
        for part, varying in per_task.items():
            assert ours[part].keys() == celerys[part].keys()
            assert {k: v for k, v in ours[part].items() if k not in varying} == \
                {k: v for k, v in celerys[part].items() if k not in varying}
        headers = ours["headers"]
        assert headers["task"] == "gateway.tasks.scan_message" and headers["argsrepr"] == f"({message_id},)"
        assert headers["id"] == headers["root_id"] == ours["properties"]["correlation_id"]
        assert ours["properties"]["delivery_tag"] != celerys["properties"]["delivery_tag"]
        task_ids.add(headers["id"])
    assert len(task_ids) == 3


def test_routes_a_plain_lpush_cannot_follow_go_through_celery(monkeypatch):
    from appliance.celery import app
    from gateway.dispatch import enqueue
    from gateway.dispatch.scans import task_template

    assert task_template(enqueue.SCAN).key == "celery"
    send = app.send_task
    for options in ({"priority": 5}, {"exchange": "mailgate-named", "routing_key": "scan"}, {"expires": 3600}):
        monkeypatch.setattr(app, "send_task",
                            lambda *args, options=options, **kwargs: send(*args, **kwargs, **options))
        assert task_template(enqueue.SCAN) is None, options


def test_a_broker_that_does_not_answer_leaves_the_scans_to_the_sweeper(settings, caplog):
    import asyncio

    from gateway.dispatch.scans import ScanSender

    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    settings.CELERY_TASK_ALWAYS_EAGER = False

    async def send() -> None:
        sender = ScanSender(run_sync=None)
        await sender.send([1, 2])
        await sender.close()

    asyncio.run(send())  # no exception: the messages are committed, the client gets its 250
    assert "could not enqueue the scans of 2 messages; the sweeper will pick them up" in caplog.text
