"""Scans sent from the SMTP server's event loop, straight to the broker's Redis list.

Each message the SMTP server commits needs its scan task sent before `250`; through Celery (a synchronous
Redis client, so from a thread) that was a third of all the server spends on a message. `ScanSender`
writes the task messages itself, over an asyncio Redis client, all of a group commit in one LPUSH: each is
the message Celery makes for the scan task, captured once (`task_template`), with its own task id and
argument. Where a plain LPUSH could not stand in for kombu's publish, it goes through `enqueue`.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property

from django.conf import settings

from . import enqueue

log = logging.getLogger(__name__)

BROKER_TIMEOUT = 5.0  # seconds the SMTP server waits on Redis for a publish before leaving it to the sweeper

_TEMPLATE_TASK_ID = "00000000-0000-4000-8000-0000000d1ce5"
_TEMPLATE_ARGUMENT = 987_654_321_012_345


@dataclass(frozen=True)
class TaskTemplate:
    """The Redis message of one task, as Celery and kombu write it, with the places its task id and its
    arguments go: each message for another id is that message with those places filled in."""

    key: str  # the Redis list the worker reads
    envelope: dict  # the message, without its body, headers and properties
    headers: dict
    properties: dict
    kwargs: dict
    embed: dict  # the body's third part (callbacks, errbacks, chain, chord)
    id_places: tuple[tuple[str, str], ...]  # ("headers" | "properties", key) holding the task id
    repr_places: tuple[tuple[str, str], ...]  # ... holding the arguments' repr

    def message(self, message_id: int) -> bytes:
        task_id, argsrepr = str(uuid.uuid4()), repr((message_id,))
        parts = {"headers": dict(self.headers), "properties": dict(self.properties)}
        for section, key in self.id_places:
            parts[section][key] = task_id
        for section, key in self.repr_places:
            parts[section][key] = argsrepr
        parts["properties"]["delivery_tag"] = str(uuid.uuid4())
        body = json.dumps([[message_id], self.kwargs, self.embed], separators=(",", ":"))
        return json.dumps({**self.envelope, "body": base64.b64encode(body.encode()).decode("ascii"), **parts},
                          separators=(",", ":")).encode()


def task_template(name: str) -> TaskTemplate | None:
    """The template of the messages of the task called `name`, captured by sending one through Celery's
    own code (its router, headers and options, as `enqueue` sends it) to kombu's in-memory transport,
    which makes the message exactly as kombu's Redis transport does. None when a plain LPUSH could not
    stand in for kombu's publish: a named exchange (the list depends on its bindings), a priority (another
    list), a queue with an expiry, a task with a default expiry (a time computed at each publish)."""
    from kombu import Connection

    app = enqueue.celery_app()
    argsrepr = repr((_TEMPLATE_ARGUMENT,))
    with Connection("memory://") as connection:
        app.send_task(name, args=(_TEMPLATE_ARGUMENT,), task_id=_TEMPLATE_TASK_ID, argsrepr=argsrepr,
                      kwargsrepr="{}", connection=connection, **enqueue.SEND_OPTIONS)
        sent = None
        for waiting in list(connection.default_channel.queues.values()):  # kombu keeps them per process
            others = []
            while not waiting.empty():
                candidate = waiting.get_nowait()
                if candidate.get("headers", {}).get("id") == _TEMPLATE_TASK_ID:
                    sent = candidate
                else:
                    others.append(candidate)
            for other in others:  # anything else in there is someone else's
                waiting.put(other)
    if sent is None:
        return None
    properties, headers = sent.get("properties", {}), sent.get("headers", {})
    delivery = properties.get("delivery_info", {})
    queue = app.amqp.queues.get(delivery.get("routing_key"))
    if (delivery.get("exchange") != "" or properties.get("priority") or properties.get("body_encoding") != "base64"
            or sent.get("content-type") != "application/json" or queue is None
            or headers.get("eta") or headers.get("expires") or properties.get("expiration")  # times of the publish
            or getattr(queue, "expires", None) or getattr(queue, "message_ttl", None)
            or getattr(queue, "max_priority", None)):
        return None
    try:
        args, kwargs, embed = json.loads(base64.b64decode(sent["body"]))
    except (ValueError, TypeError, KeyError):
        return None
    if args != [_TEMPLATE_ARGUMENT] or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        return None
    places = [(section, key, value) for section, part in (("headers", headers), ("properties", properties))
              for key, value in part.items()]
    id_places = tuple((s, k) for s, k, v in places if v == _TEMPLATE_TASK_ID)
    repr_places = tuple((s, k) for s, k, v in places if v == argsrepr)
    rest = json.dumps([[v for s, k, v in places if (s, k) not in id_places + repr_places]], default=str)
    if ("headers", "id") not in id_places or _TEMPLATE_TASK_ID in rest or str(_TEMPLATE_ARGUMENT) in rest:
        return None  # the id or the arguments are somewhere else too: do not guess
    prefix = (app.conf.broker_transport_options or {}).get("global_keyprefix", "")
    envelope = {k: v for k, v in sent.items() if k not in ("body", "headers", "properties")}
    return TaskTemplate(key=f"{prefix}{delivery['routing_key']}", envelope=envelope, headers=headers,
                        properties=properties, kwargs=kwargs, embed=embed, id_places=id_places,
                        repr_places=repr_places)


class ScanSender:
    """Sends the scans of the messages the SMTP server has just committed, from its event loop.

    With a Redis broker, the task messages go straight to the queue's Redis list, all of a group commit in
    one LPUSH, over an asyncio Redis client: each is the message Celery makes for the scan task (captured
    once, see `task_template`) with its own task id and argument. Going through Celery instead costs the
    SMTP server ~1.3 ms of CPU per message at a few hundred messages per second (Celery's and kombu's
    publish, ~0.55 ms, and the hop to a thread and back for their synchronous client): a third of all it
    spends on a message. Other brokers, and routes a plain LPUSH cannot follow, go through Celery.
    A broker that does not answer changes nothing for the client (its message is committed): the
    sweeper sends the scan later.
    """

    def __init__(self, run_sync: Callable[..., Awaitable]):
        self.run_sync = run_sync
        self._client = None

    @cached_property
    def template(self) -> TaskTemplate | None:
        """The scan task's message to fill in, or None: through Celery (looked at on the first send)."""
        url, template = settings.CELERY_BROKER_URL, None
        if url.startswith("redis://") and ";" not in url and not settings.CELERY_TASK_ALWAYS_EAGER:
            try:
                template = task_template(enqueue.SCAN)
            except Exception:  # noqa: BLE001 - Celery's own path still works
                log.exception("scan tasks go through Celery: their message could not be prepared")
        if template is None:
            log.info("scan tasks are sent through Celery")
        return template

    async def send(self, message_ids: list[int]) -> None:
        template = self.template
        if template is None:
            await self.run_sync(enqueue.scans, message_ids)
            return
        try:
            if self._client is None:
                import redis.asyncio

                self._client = redis.asyncio.Redis.from_url(
                    settings.CELERY_BROKER_URL, socket_timeout=BROKER_TIMEOUT, socket_connect_timeout=BROKER_TIMEOUT)
            await self._client.lpush(template.key, *(template.message(i) for i in message_ids))
        except Exception:  # noqa: BLE001 - the broker is down: the rows are committed, the sweeper sends them later
            log.exception("could not enqueue the scans of %d messages; the sweeper will pick them up",
                          len(message_ids))

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
