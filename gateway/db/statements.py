"""Every hand-written statement of the mail path, each as one whole template, and the functions that run them.

The scan and the delivery of a message run a handful of UPDATEs; built by the ORM they cost ~0.5-1 ms of
Python each and need a SELECT after every claim (docs/decisions.md). Here each is written out once: a
template whose `{m}`, `{r}`, `{raw}` stand for the quoted names of the Message, Recipient and RawMessage
tables and `{m.state}` for a quoted column, filled in once per process from the models' metadata
(gateway.db.rowsql), so the same text runs on PostgreSQL and on SQLite (3.35+, `make run`).

Two habits run through them:
- a state is checked as `(<column> IN (%s, …)) IS TRUE`: every message passes through each state, so an
  index led by the state column holds many dead entries until VACUUM, and with a plain `state = %s` beside
  `id = %s` PostgreSQL costs both indexes alike and often walks the state one (1.2 ms instead of 0.03 ms
  per UPDATE, measured). Written this way the row is found by its key and the state only checked on it.
- on PostgreSQL, two writes that must go together are one statement (a data-modifying `WITH`): one round
  trip and one commit, atomic without a transaction block. SQLite has no data-modifying WITH; the same
  writes run there in a transaction. That choice is made here, in `joined()`, and nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cache
from typing import Any

from django.db import transaction

from gateway.models import Message, RawMessage, Recipient

from . import rowsql


class Names:
    """A model's quoted names for a template: `{m}` is the table, `{m.state}` a column, `{m.returning}`
    every concrete column qualified by the table (a RETURNING list)."""

    def __init__(self, model):
        self._model = model

    def __format__(self, spec: str) -> str:
        return rowsql.table(self._model)

    def __getattr__(self, name: str) -> str:
        if name == "returning":
            return rowsql.returning(self._model)[0]
        return rowsql.column(self._model, name)


NAMES = {"m": Names(Message), "r": Names(Recipient), "raw": Names(RawMessage)}

# The columns a verdict writes on the message, in the order of VERDICT_SET.
VERDICT_FIELDS = ("verdict", "action", "spam_score", "spam_threshold", "spam_rules", "virus_names", "attachments",
                  "scan_notes", "checks", "scanned_at", "last_error", "next_attempt_at", "quarantined", "state",
                  "completed_at")
# A recipient's outcome of one delivery attempt, in the order of OUTCOME_SET.
OUTCOME_FIELDS = ("status", "reply_code", "reply_text", "attempts", "claimed_at", "delivered_at", "next_attempt_at")

VERDICT_SET = ("{m.verdict} = %s, {m.action} = %s, {m.spam_score} = %s, {m.spam_threshold} = %s, "
               "{m.spam_rules} = %s, {m.virus_names} = %s, {m.attachments} = %s, {m.scan_notes} = %s, "
               "{m.checks} = %s, {m.scanned_at} = %s, {m.last_error} = %s, {m.next_attempt_at} = %s, "
               "{m.quarantined} = %s, {m.state} = %s, {m.completed_at} = %s")
OUTCOME_SET = ("{r.status} = %s, {r.reply_code} = %s, {r.reply_text} = %s, {r.attempts} = %s, {r.claimed_at} = %s, "
               "{r.delivered_at} = %s, {r.next_attempt_at} = %s")

# --- The scan --------------------------------------------------------------------------------------------

# Claim the message for a scan (received or scan-deferred -> scanning, one more attempt) and read it, its
# raw bytes and its number of recipients.
CLAIM_SCAN = (
    "UPDATE {m} SET {m.state} = %s, {m.claimed_at} = %s, {m.attempts} = {m.attempts} + 1 "
    "WHERE {m}.{m.id} = %s AND ({m.state} IN (%s, %s)) IS TRUE "
    "RETURNING {m.returning}, "
    "(SELECT {raw.data} FROM {raw} WHERE {raw.message} = {m}.{m.id}), "
    "(SELECT COUNT(*) FROM {r} WHERE {r.message} = {m}.{m.id})")
# The same, with the pending recipients (PENDING_COLUMNS) as a JSON list: for a delivery that follows the
# scan before its verdict is written (PostgreSQL). The status is our own constant, found by the message,
# not through the recipient_due index's dead entries.
PENDING_COLUMNS = ("id", "address", "domain", "attempts", "released")
CLAIM_SCAN_WITH_PENDING = CLAIM_SCAN + (
    ", (SELECT json_agg(json_build_array({r.id}, {r.address}, {r.domain}, {r.attempts}, {r.released}) "
    "ORDER BY {r.id})::text FROM {r} WHERE {r.message} = {m}.{m.id} AND ({r.status} = 'pending') IS TRUE)")

# The verdict on the message, under this scan's claim.
VERDICT = ("UPDATE {m} SET " + VERDICT_SET +
           " WHERE {m.id} = %s AND ({m.state} IN (%s)) IS TRUE AND {m.claimed_at} = %s")
# The verdict without a claim to check: a message none of whose recipients was pending.
VERDICT_UNCLAIMED = "UPDATE {m} SET " + VERDICT_SET + " WHERE {m.id} = %s"

# A recipient's verdict, action and the spam policy that decided (with its spam threshold), in the order of
# _group_params.
RECIPIENT_VERDICT_SET = "{r.verdict} = %s, {r.action} = %s, {r.policy} = %s, {r.spam_threshold} = %s"

# A group of pending recipients given their verdict and their next state (held, deleted, or claimed for
# the delivery that follows, under the scan's timestamp); {ids}: those of the group, or all pending.
GROUP_HELD = ("UPDATE {r} SET " + RECIPIENT_VERDICT_SET + ", {r.status} = %s, {r.next_attempt_at} = %s "
              "WHERE {r.message} = %s AND ({r.status} IN (%s)) IS TRUE{ids}")
GROUP_CLAIMED = ("UPDATE {r} SET " + RECIPIENT_VERDICT_SET + ", {r.status} = %s, {r.claimed_at} = %s, "
                 "{r.next_attempt_at} = %s WHERE {r.message} = %s AND ({r.status} IN (%s)) IS TRUE{ids} "
                 "RETURNING {r.returning}")
# The verdict and every pending recipient's, in one statement (PostgreSQL): no recipient changes unless the
# message did.
VERDICT_AND_GROUP_HELD = (
    "WITH scanned AS (" + VERDICT + " RETURNING {m.id}) "
    "UPDATE {r} SET " + RECIPIENT_VERDICT_SET + ", {r.status} = %s, {r.next_attempt_at} = %s FROM scanned "
    "WHERE {r}.{r.message} = scanned.{m.id} AND ({r.status} IN (%s)) IS TRUE")
VERDICT_AND_GROUP_CLAIMED = (
    "WITH scanned AS (" + VERDICT + " RETURNING {m.id}) "
    "UPDATE {r} SET " + RECIPIENT_VERDICT_SET + ", {r.status} = %s, {r.claimed_at} = %s, "
    "{r.next_attempt_at} = %s FROM scanned "
    "WHERE {r}.{r.message} = scanned.{m.id} AND ({r.status} IN (%s)) IS TRUE RETURNING {r.returning}")
# The verdict, the message delivered, and these recipients' verdict and outcome, in one statement
# (PostgreSQL): the delivery that follows a scan took every recipient in one SMTP transaction.
VERDICT_DELIVERED = (
    "WITH scanned AS (" + VERDICT + " RETURNING {m.id}) "
    "UPDATE {r} SET " + RECIPIENT_VERDICT_SET + ", " + OUTCOME_SET + " FROM scanned "
    "WHERE {r}.{r.message} = scanned.{m.id} AND ({r.status} IN (%s)) IS TRUE AND {r}.{r.id} IN ({ids})")

# --- The delivery ----------------------------------------------------------------------------------------

# The message's due recipients (pending or deferred, their time come), claimed for this pass and read.
CLAIM_DELIVERY = (
    "UPDATE {r} SET {r.status} = %s, {r.claimed_at} = %s "
    "WHERE {r.message} = %s AND ({r.status} IN (%s, %s)) IS TRUE "
    "AND ({r.next_attempt_at} IS NULL OR {r.next_attempt_at} <= %s) RETURNING {r.returning}")
# One outcome shared by these recipients, only while the claim is still this pass's.
OUTCOME = ("UPDATE {r} SET " + OUTCOME_SET +
           " WHERE {r.id} IN ({ids}) AND ({r.status} IN (%s)) IS TRUE AND {r.claimed_at} = %s")
# The message's final state, only if it is still in the state this pass read.
FINAL_STATE = ("UPDATE {m} SET {m.state} = %s, {m.completed_at} = %s "
               "WHERE {m}.{m.id} = %s AND ({m.state} IN (%s)) IS TRUE")
# The outcome of every recipient of the message and its final state, the state only if each outcome was
# written under its claim (PostgreSQL).
OUTCOME_AND_FINAL_STATE = (
    "WITH done AS (" + OUTCOME + " RETURNING {r.id}) "
    "UPDATE {m} SET {m.state} = %s, {m.completed_at} = %s "
    "WHERE {m}.{m.id} = %s AND ({m.state} IN (%s)) IS TRUE AND (SELECT COUNT(*) FROM done) = %s")


@cache
def render(template: str, ids: int = 0) -> str:
    """The template with its names filled in; `ids` placeholders where it says {ids} (` AND id IN (…)` for
    the optional list of a group, `%s, …` inside an IN of its own)."""
    if "{ids}" in template and "IN ({ids})" not in template:
        id_list = f" AND {rowsql.column(Recipient, 'id')} IN ({', '.join(['%s'] * ids)})" if ids else ""
    else:
        id_list = ", ".join(["%s"] * ids)
    return template.format(ids=id_list, **NAMES)


def joined() -> bool:
    """Whether two writes that go together are one statement (PostgreSQL's data-modifying WITH)."""
    return rowsql.writes_in_one_statement()


def _run(sql: str, params: Sequence[Any]) -> int:
    with rowsql.cursor() as cursor:
        cursor.execute(sql, list(params))
        return cursor.rowcount


def _fetch(sql: str, params: Sequence[Any]) -> list[tuple]:
    with rowsql.cursor() as cursor:
        cursor.execute(sql, list(params))
        return cursor.fetchall()


def _values(model, fields: Iterable[str], values: dict) -> list:
    return [rowsql.value(model, name, values[name]) for name in fields]


def _at(model, name: str, when: datetime | None):
    return rowsql.value(model, name, when)


# --- The scan --------------------------------------------------------------------------------------------


def claim_scan(message_id: int, now: datetime, *, with_pending: bool) -> tuple[Message, tuple] | None:
    """The message claimed for this scan, with (raw bytes, number of recipients[, pending recipients as
    JSON]); None when it is not there to claim."""
    template = CLAIM_SCAN_WITH_PENDING if with_pending else CLAIM_SCAN
    rows = _fetch(render(template), [Message.State.SCANNING, _at(Message, "claimed_at", now), message_id,
                                     Message.State.RECEIVED, Message.State.SCAN_DEFERRED])
    if not rows:
        return None
    (row,) = rows
    return rowsql.from_row(Message, row)


def _verdict_params(message_values: dict, message_id: int, claimed_at: datetime | None) -> list:
    return [*_values(Message, VERDICT_FIELDS, message_values), message_id, Message.State.SCANNING,
            _at(Message, "claimed_at", claimed_at)]


def _group_params(group: dict, now: datetime | None) -> list:
    """A group's SET values: verdict, action, policy, spam_threshold, status[, claimed_at], next_attempt_at."""
    head = [group["verdict"], group["action"], group["policy"], group["spam_threshold"], group["status"]]
    if group["status"] == Recipient.Status.DELIVERING:
        head.append(_at(Recipient, "claimed_at", group["claimed_at"]))
    return [*head, _at(Recipient, "next_attempt_at", group["next_attempt_at"])]


def write_verdict(message_id: int, claimed_at: datetime | None, message_values: dict) -> bool:
    """The verdict on the message under the scan's claim; False when the claim is no longer held."""
    return bool(_run(render(VERDICT), _verdict_params(message_values, message_id, claimed_at)))


def write_verdict_unclaimed(message_id: int, message_values: dict) -> None:
    _run(render(VERDICT_UNCLAIMED), [*_values(Message, VERDICT_FIELDS, message_values), message_id])


def write_group(message_id: int, group: dict, ids: list[int] | None) -> tuple[int, list[Recipient]]:
    """One group of pending recipients (all of them when `ids` is None) given its verdict: how many
    changed, and those claimed for delivery."""
    claims = group["status"] == Recipient.Status.DELIVERING
    sql = render(GROUP_CLAIMED if claims else GROUP_HELD, len(ids) if ids else 0)
    params = [*_group_params(group, None), message_id, Recipient.Status.PENDING, *(ids or ())]
    if not claims:
        return _run(sql, params), []
    claimed = sorted((rowsql.from_row(Recipient, row)[0] for row in _fetch(sql, params)), key=lambda r: r.pk)
    return len(claimed), claimed


def write_verdict_and_group(message_id: int, claimed_at: datetime | None, message_values: dict,
                            group: dict) -> tuple[int, list[Recipient]]:
    """The verdict and every pending recipient's in one statement (PostgreSQL): how many recipients it
    changed (none when the claim was lost) and those it claimed for delivery."""
    claims = group["status"] == Recipient.Status.DELIVERING
    sql = render(VERDICT_AND_GROUP_CLAIMED if claims else VERDICT_AND_GROUP_HELD)
    params = [*_verdict_params(message_values, message_id, claimed_at), *_group_params(group, None),
              Recipient.Status.PENDING]
    if not claims:
        return _run(sql, params), []
    claimed = sorted((rowsql.from_row(Recipient, row)[0] for row in _fetch(sql, params)), key=lambda r: r.pk)
    return len(claimed), claimed


def write_verdict_delivered(message_id: int, claimed_at: datetime | None, message_values: dict, verdict: str,
                            action: str, policy: str, spam_threshold: float | None, outcome: dict,
                            ids: list[int]) -> int:
    """The verdict, the message's final state and these recipients' verdict and outcome in one statement
    (PostgreSQL): how many recipients it recorded (none when the claim was lost)."""
    params = [*_verdict_params(message_values, message_id, claimed_at), verdict, action, policy, spam_threshold,
              *_values(Recipient, OUTCOME_FIELDS, outcome), Recipient.Status.PENDING, *ids]
    return _run(render(VERDICT_DELIVERED, len(ids)), params)


def verdict_written(message_id: int, state: str, scanned_at: datetime) -> bool:
    """Whether this scan's verdict (its own timestamp) is the one on the message."""
    return Message.objects.filter(pk=message_id, state=state, scanned_at=scanned_at).exists()


# --- The delivery ----------------------------------------------------------------------------------------


def claim_delivery(message_id: int, now: datetime) -> list[Recipient]:
    """The message's due recipients, claimed (-> delivering, the claim token being `now`) and read in one
    statement: only the rows this very statement moved come back."""
    rows = _fetch(render(CLAIM_DELIVERY), [Recipient.Status.DELIVERING, _at(Recipient, "claimed_at", now), message_id,
                                           Recipient.Status.PENDING, Recipient.Status.DEFERRED,
                                           _at(Recipient, "next_attempt_at", now)])
    return sorted((rowsql.from_row(Recipient, row)[0] for row in rows), key=lambda r: r.pk)


def _outcome_params(ids: list[int], claimed_at: datetime | None, outcome: dict) -> list:
    return [*_values(Recipient, OUTCOME_FIELDS, outcome), *ids, Recipient.Status.DELIVERING,
            _at(Recipient, "claimed_at", claimed_at)]


def write_outcome(ids: list[int], claimed_at: datetime | None, outcome: dict) -> int:
    """One outcome shared by these recipients, while the claim taken at `claimed_at` is still theirs: how many
    it recorded."""
    return _run(render(OUTCOME, len(ids)), _outcome_params(ids, claimed_at, outcome))


def write_outcome_and_final_state(ids: list[int], claimed_at: datetime | None, outcome: dict, message_id: int,
                                  current_state: str, final_state: str, completed_at: datetime) -> bool:
    """The outcome of every recipient of the message and the message's final state, the state only if each
    outcome was written under its claim: True when the state was written."""
    state = [final_state, _at(Message, "completed_at", completed_at), message_id, current_state]
    if joined():
        return bool(_run(render(OUTCOME_AND_FINAL_STATE, len(ids)),
                         [*_outcome_params(ids, claimed_at, outcome), *state, len(ids)]))
    with transaction.atomic():
        return (write_outcome(ids, claimed_at, outcome) == len(ids)
                and bool(_run(render(FINAL_STATE), state)))


# --- Intake ----------------------------------------------------------------------------------------------


def intake_batch(columns: dict, alias: str = "default") -> str:
    """The statement that writes a batch of accepted messages (gateway.intake.writer): the messages from one
    JSON document through jsonb_populate_recordset, their raw bytes as one bytea[] joined on the queue
    IDs, their recipients from each message's "recipients" array (PostgreSQL). `columns`: model -> the
    columns of a new row."""
    def listed(model, prefix: str = "") -> str:
        return ", ".join(prefix + rowsql.quote(f.column, alias) for f in columns[model])

    message, raw, recipient = (rowsql.table(m, alias) for m in (Message, RawMessage, Recipient))
    return (
        "WITH d AS (SELECT %s::jsonb AS doc), "
        f"m AS (INSERT INTO {message} ({listed(Message)}) SELECT {listed(Message, 'u.')} "
        f"FROM jsonb_populate_recordset(NULL::{message}, (SELECT doc FROM d)) u RETURNING id, queue_id), "
        f"r AS (INSERT INTO {raw} (message_id, data) SELECT m.id, u.data "
        "FROM unnest(%s::varchar[], %b::bytea[]) AS u(queue_id, data) JOIN m USING (queue_id)), "
        f"t AS (INSERT INTO {recipient} (message_id, {listed(Recipient)}) "
        f"SELECT m.id, {listed(Recipient, 'u.')} FROM jsonb_array_elements((SELECT doc FROM d)) e "
        "JOIN m ON m.queue_id = e->>'queue_id' "
        f"CROSS JOIN LATERAL jsonb_populate_recordset(NULL::{recipient}, e->'recipients') u) "
        "SELECT id, queue_id FROM m")


def pending_recipients(message: Message, listed: str | None) -> list[Recipient]:
    """CLAIM_SCAN_WITH_PENDING's JSON list of pending recipients as instances (the other fields have their
    values of a recipient not yet scanned: no verdict, action, reply or claim)."""
    return [Recipient(message=message, status=Recipient.Status.PENDING, **dict(zip(PENDING_COLUMNS, row, strict=True)))
            for row in json.loads(listed or "[]")]
