"""Hand-written UPDATE statements for the path every message takes (scan, verdict, delivery).

The ORM builds each statement anew (~0.5-1 ms of Python per statement) and has no `UPDATE … RETURNING`,
so a claim costs it an UPDATE plus a SELECT. These helpers write the SQL once from the model's own
metadata (table and column names, each field's conversion of values to and from the database), so
they work on PostgreSQL and on SQLite (3.35+, `make run`) alike, and return model instances as the ORM
would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any, TypeVar

from django.conf import settings
from django.db import connections, models

M = TypeVar("M", bound=models.Model)


# Names are quoted once per process: these run several times per statement.
@cache
def quote(name: str, using: str = "default") -> str:
    return connections[using].ops.quote_name(name)


@cache
def table(model: type[models.Model], using: str = "default") -> str:
    return quote(model._meta.db_table, using)


@cache
def column(model: type[models.Model], name: str, using: str = "default") -> str:
    return quote(model._meta.get_field(name).column, using)


@cache
def _returning(model: type[models.Model], using: str) -> tuple[str, tuple, tuple]:
    """`RETURNING` list of every concrete column, their attribute names, and each one's converters."""
    connection = connections[using]
    fields = model._meta.concrete_fields
    sql = ", ".join(f"{table(model, using)}.{quote(f.column, using)}" for f in fields)
    converters = []
    for f in fields:
        col = f.get_col(model._meta.db_table)
        converters.append((col, tuple(connection.ops.get_db_converters(col) + f.get_db_converters(connection))))
    return sql, tuple(f.attname for f in fields), tuple(converters)


def state_is(model: type[models.Model], name: str, count: int = 1, using: str = "default") -> str:
    """`(<column> IN (%s, …)) IS TRUE`: a state check the planner cannot answer from an index.

    Every message passes through each state, so an index led by the state column (message_due,
    recipient_due) holds many dead entries for 'scanning', 'delivering' … until VACUUM; with a plain
    `state = %s` beside `id = %s`, PostgreSQL costs both indexes alike and often walks the state one
    (measured: 1.2 ms instead of 0.03 ms per UPDATE). Written this way, the row is found by its key and
    the state only checked on it.
    """
    return f"({column(model, name, using)} IN ({', '.join(['%s'] * count)})) IS TRUE"


_AS_IS = (str, int, float, bool, type(None))


@cache
def _prepared(model: type[models.Model], name: str) -> models.Field | None:
    """The field, when its values need the field's own conversion; None for text, number and boolean
    fields, whose plain Python values the database drivers take as they are (the ORM passes them
    through unchanged too)."""
    field = model._meta.get_field(name)
    plain = (models.CharField, models.TextField, models.IntegerField, models.FloatField, models.BooleanField)
    return None if isinstance(field, plain) and not isinstance(field, models.JSONField) else field


def value(model: type[models.Model], name: str, data: Any, using: str = "default") -> Any:
    """A Python value as the field saves it (JSON adapted, datetimes in the backend's form)."""
    field = _prepared(model, name)
    if field is None and isinstance(data, _AS_IS):
        return data
    return model._meta.get_field(name).get_db_prep_save(data, connection=connections[using])


def assignments(model: type[models.Model], values: dict[str, Any], using: str = "default") -> tuple[str, list]:
    """`col = %s, …` and its parameters; a value that is an SQL snippet wrapped in `Raw` goes in as is."""
    parts, params = [], []
    for name, data in values.items():
        if isinstance(data, Raw):
            parts.append(f"{column(model, name, using)} = {data.sql}")
            params.extend(data.params)
        else:
            parts.append(f"{column(model, name, using)} = %s")
            params.append(value(model, name, data, using))
    return ", ".join(parts), params


class Raw:
    """An SQL expression in a SET list, such as `attempts + 1`."""

    def __init__(self, sql: str, params: Sequence[Any] = ()):
        self.sql, self.params = sql, list(params)


# psycopg's prepare_threshold for a connection whose chosen statements are prepared (execute(...,
# prepare=True)) and whose others never are: Django's own (None) turns preparing off altogether.
PREPARE_WHEN_ASKED = 2**31


def prepares_statements() -> bool:
    """Whether the mail path's statements are sent as prepared statements (DB_PREPARED_STATEMENTS)."""
    return settings.DB_PREPARED_STATEMENTS


def _cursor(using: str):
    """A cursor for these statements: on PostgreSQL (psycopg 3) one that sends them as server-side
    prepared statements, elsewhere the connection's usual cursor.

    Django disables prepared statements (prepare_threshold None, client-side binding) so that
    transaction-mode connection poolers work; these few statements run for every message, and parsing
    and planning them anew each time was about a third of PostgreSQL's CPU on the mail path. They are
    prepared once per connection (the parameters bound on the server), and the connection's other
    statements stay as Django sends them. DB_PREPARED_STATEMENTS = False (for a pooler that cannot
    keep prepared statements) turns this off. So does query logging (DEBUG, tests that count queries):
    Django logs a statement's text from the client-side binding only.
    """
    connection = connections[using]
    if connection.vendor != "postgresql" or not prepares_statements() or connection.queries_logged:
        return connection.cursor()
    cursor_class = _prepared_cursor_class()
    if cursor_class is None:  # psycopg 2: no server-side binding
        return connection.cursor()
    # What connection.cursor() does, with another cursor class: the health check, the connection,
    # Django's error translation and its cursor wrapper (query logging, execute wrappers).
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    connection.validate_thread_sharing()
    with connection.wrap_database_errors:
        raw = connection.connection
        if raw.prepare_threshold is None:
            # Statements are prepared only when asked (prepare=True, below): the others never reach this.
            raw.prepare_threshold = PREPARE_WHEN_ASKED
        cursor = cursor_class(raw)
    return connection.make_cursor(cursor)


@cache
def _prepared_cursor_class() -> type | None:
    try:
        from django.db.backends.postgresql.base import ServerBindingCursor
    except ImportError:
        return None
    if ServerBindingCursor is None or not hasattr(ServerBindingCursor, "_maybe_prepare_gen"):
        return None

    class PreparedCursor(ServerBindingCursor):
        def execute(self, query, params=None, *, prepare: bool | None = True, binary: bool | None = None):
            return super().execute(query, params, prepare=prepare, binary=binary)

    return PreparedCursor


class With:
    """A data-modifying `WITH name AS (…)` put in front of an UPDATE (PostgreSQL only), and joined to it
    with `FROM name`: two writes in one statement, so one round trip and one commit, atomic without a
    transaction block."""

    def __init__(self, name: str, sql: str, params: Sequence[Any] = ()):
        self.name, self.sql, self.params = name, sql, list(params)


def _statement(model: type[models.Model], values: dict[str, Any], where: str, params: Iterable[Any],
               with_: With | None, using: str) -> tuple[str, list]:
    sets, set_params = assignments(model, values, using)
    head, from_, head_params = "", "", []
    if with_ is not None:
        head, from_, head_params = f"WITH {with_.name} AS ({with_.sql}) ", f" FROM {with_.name}", with_.params
    return (f"{head}UPDATE {table(model, using)} SET {sets}{from_} WHERE {where}",
            [*head_params, *set_params, *params])


def update_sql(model: type[models.Model], values: dict[str, Any], where: str, params: Iterable[Any] = (),
               returning: str = "", using: str = "default") -> tuple[str, list]:
    """The text and parameters of `UPDATE … [RETURNING …]`, to go inside a `With`."""
    sql, all_params = _statement(model, values, where, params, None, using)
    return (f"{sql} RETURNING {returning}" if returning else sql), all_params


def writes_in_one_statement(using: str = "default") -> bool:
    """Whether the database runs a data-modifying WITH (PostgreSQL does; SQLite does not)."""
    return connections[using].vendor == "postgresql"


def update(model: type[models.Model], values: dict[str, Any], where: str, params: Iterable[Any] = (),
           using: str = "default", with_: With | None = None) -> int:
    """`UPDATE table SET … WHERE <where>`; the number of rows changed."""
    sql, all_params = _statement(model, values, where, params, with_, using)
    with _cursor(using) as cursor:
        cursor.execute(sql, all_params)
        return cursor.rowcount


def update_returning(model: type[M], values: dict[str, Any], where: str, params: Iterable[Any] = (),
                     extra: Sequence[str] = (), using: str = "default",
                     with_: With | None = None) -> list[tuple[M, tuple]]:
    """`UPDATE … RETURNING` every column (and the `extra` expressions): the changed rows as instances,
    each with the values of its extra expressions. This is a claim and the read of what it claimed in
    one statement: only the rows this very statement moved come back."""
    connection = connections[using]
    returning, names, converters = _returning(model, using)
    sql, all_params = _statement(model, values, where, params, with_, using)
    extras = "".join(f", {expression}" for expression in extra)
    with _cursor(using) as cursor:
        cursor.execute(f"{sql} RETURNING {returning}{extras}", all_params)
        rows = cursor.fetchall()
    out = []
    width = len(names)
    for row in rows:
        values_in = list(row[:width])
        for index, (col, funcs) in enumerate(converters):
            for func in funcs:
                values_in[index] = func(values_in[index], col, connection)
        out.append((model.from_db(using, names, values_in), tuple(row[width:])))
    return out
