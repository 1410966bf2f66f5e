"""Group commit of accepted messages: the writes of the messages that arrive while one commit is in flight
go into the next one, so a busy MX pays one round trip and one commit for many messages.

Each message still gets its `250` only after the commit that holds its rows (RFC 5321 §6.1: once we say
250 the message is ours). With PostgreSQL the batch is one SQL statement, sent from the event loop over
an asynchronous psycopg connection (no thread hop, no ORM): a CTE inserts the messages and, joined on
their queue IDs, their raw bytes and recipients. Any other database (SQLite for `make run`) goes through
the ORM in the server's thread pool, one transaction per batch.

When a batch fails, its messages are written again one by one, so a message that cannot be stored (the
database refuses a value) does not take the others down with it; whatever still fails gets `451 4.3.0`
from the caller and the client keeps the message.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psycopg
from django.db import DatabaseError, DataError, IntegrityError, connections

from gateway import metrics
from gateway.db import rowsql, statements
from gateway.dispatch import enqueue
from gateway.dispatch.scans import ScanSender
from gateway.models import Message, Recipient

from .rows import Arrival, new_message, new_row_fields
from .store import store_messages

log = logging.getLogger(__name__)

MAX_BATCH = 200  # messages in one write
MAX_BATCH_BYTES = 32 * 1024 * 1024  # of message data in one write (PostgreSQL caps a parameter at 1 GB)


@dataclass
class Stored:
    id: int
    queue_id: str


class GroupCommit:
    """Batches what `submit` is given while a write is in flight; `write` stores a batch, all or nothing."""

    def __init__(self, write: Callable[[list], Awaitable[list]], *, alone: Callable[[Exception], bool],
                 size: Callable[[object], int] = lambda item: 0, max_batch: int = MAX_BATCH,
                 max_bytes: int = MAX_BATCH_BYTES):
        self.write = write
        self.alone = alone  # does this error call for writing the batch's items one by one?
        self.size = size
        self.max_batch = max_batch
        self.max_bytes = max_bytes
        self.pending: list[tuple[object, asyncio.Future]] = []
        self.writing = False

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        if not self.writing:
            self.writing = True
            asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                count, total = 0, 0
                for item, _ in self.pending[: self.max_batch]:
                    total += self.size(item)
                    if count and total > self.max_bytes:
                        break  # a large message waits for the next write (and one alone is always taken)
                    count += 1
                batch, self.pending = self.pending[:count], self.pending[count:]
                await self._write(batch)
        finally:
            self.writing = False

    async def _write(self, batch: list) -> None:
        try:
            results = await self.write([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - each future gets the error, or its own second try
            if len(batch) == 1 or not self.alone(exc):
                # A lost connection fails the whole batch at once: no point in trying each of them.
                for _, future in batch:
                    _settle(future, exc=exc)
                return
            log.warning("a batch of %d messages failed (%s); storing them one by one", len(batch), exc)
            for one in batch:
                await self._write([one])
            return
        for (_, future), result in zip(batch, results, strict=True):
            _settle(future, result=result)


def _settle(future: asyncio.Future, *, result=None, exc: BaseException | None = None) -> None:
    if future.done():  # the client went away and its DATA was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class IntakeWriter:
    """Stores accepted messages with group commit; `store` returns once the message is committed and its
    scan is enqueued."""

    def __init__(self, run_sync: Callable[..., Awaitable]):
        self.run_sync = run_sync
        self.group = GroupCommit(self._write_batch, alone=_refused_value, size=lambda item: len(item[1]))

    @staticmethod
    def for_database(run_sync: Callable[..., Awaitable], alias: str = "default") -> IntakeWriter:
        if connections[alias].vendor == "postgresql":
            return PostgresIntakeWriter(run_sync, alias)
        return IntakeWriter(run_sync)

    async def store(self, envelope: Arrival, data: bytes) -> Stored:
        stored = await self.group.submit((envelope, data))
        metrics.count("mailgate_messages_accepted")
        return stored

    async def _write_batch(self, items: list[tuple[Arrival, bytes]]) -> list[Stored]:
        stored = await self.run_sync(store_messages, items)
        return [Stored(m.pk, m.queue_id) for m in stored]

    async def close(self) -> None:
        pass


class PostgresIntakeWriter(IntakeWriter):
    """One statement per batch over an asynchronous psycopg connection of the server's own."""

    def __init__(self, run_sync: Callable[..., Awaitable], alias: str = "default"):
        super().__init__(run_sync)
        self.alias = alias
        self._connection = None
        self._sql: str | None = None
        self.scans = ScanSender(run_sync)

    async def close(self) -> None:
        await self._drop_connection()
        await self.scans.close()

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def _connect(self) -> psycopg.AsyncConnection:
        if self._connection is not None and not self._connection.closed:
            return self._connection
        params = connections[self.alias].get_connection_params()
        for key in ("cursor_factory", "context"):  # the sync cursor and adapters of Django's own connections
            params.pop(key, None)
        params.setdefault("connect_timeout", 10)
        params.setdefault("application_name", "mailgate smtp intake")  # to be found in pg_stat_activity
        # Django turns prepared statements off (prepare_threshold None); this connection's one statement is
        # prepared on its first use (prepare=True below), as the worker's are (rowsql.cursor): parsing and
        # planning it anew was a third of PostgreSQL's CPU for a message written alone.
        # DB_PREPARED_STATEMENTS = False (a transaction-mode pooler) keeps it unprepared.
        params["prepare_threshold"] = rowsql.PREPARE_WHEN_ASKED if rowsql.prepares_statements() else None
        self._connection = await psycopg.AsyncConnection.connect(autocommit=True, **params)
        return self._connection

    async def _write_batch(self, items: list[tuple[Arrival, bytes]]) -> list[Stored]:
        built = [new_message(envelope, data) for envelope, data in items]
        # The rows go as one JSON document (PostgreSQL types each column from the table's row type; far
        # cheaper to send than an array per column), the raw bytes as one bytea[] in binary (%b: as text,
        # every byte would be written and parsed again as two hex digits).
        document = json.dumps([{**message, "recipients": recipients} for message, recipients in built],
                              ensure_ascii=False, separators=(",", ":"), default=_json_value)
        params = (document, [message["queue_id"] for message, _ in built], [data for _, data in items])
        try:
            connection = await self._connect()
            try:
                cursor = await connection.execute(self._statement(), params, prepare=True)
                rows = await cursor.fetchall()
            except Exception:
                if connection.broken or connection.closed:
                    await self._drop_connection()  # the next batch connects again; the broker's client stays
                raise
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            raise DataError(str(exc)) from exc  # this batch's values: another batch may well be stored
        except psycopg.Error as exc:
            raise DatabaseError(str(exc)) from exc
        ids = {queue_id: pk for pk, queue_id in rows}
        stored = [Stored(ids[message["queue_id"]], message["queue_id"]) for message, _ in built]
        if enqueue.tasks_are_sent():
            # The 250 waits for the publish, as it waits for the on_commit hook of the ORM path.
            await self.scans.send([s.id for s in stored])
        return stored

    def _statement(self) -> str:
        if self._sql is None:
            self._sql = statements.intake_batch({model: new_row_fields(model) for model in (Message, Recipient)},
                                                self.alias)
        return self._sql


def _json_value(value):
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not a column value")


def _refused_value(exc: Exception) -> bool:
    return isinstance(exc, DataError | IntegrityError)
