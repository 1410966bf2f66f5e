"""What the hand-written statements (gateway.db.statements) need of the database and the models: quoted
table and column names from the models' own metadata, each field's conversion of values to the database
and of returned rows back to model instances (as the ORM would), and a cursor that sends the statements
as server-side prepared statements on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
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
def returning(model: type[models.Model], using: str = "default") -> tuple[str, tuple, tuple]:
    """`RETURNING` list of every concrete column, their attribute names, and each one's converters."""
    connection = connections[using]
    fields = model._meta.concrete_fields
    sql = ", ".join(f"{table(model, using)}.{quote(f.column, using)}" for f in fields)
    converters = []
    for f in fields:
        col = f.get_col(model._meta.db_table)
        converters.append((col, tuple(connection.ops.get_db_converters(col) + f.get_db_converters(connection))))
    return sql, tuple(f.attname for f in fields), tuple(converters)


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


# psycopg's prepare_threshold for a connection whose chosen statements are prepared (execute(...,
# prepare=True)) and whose others never are: Django's own (None) turns preparing off altogether.
PREPARE_WHEN_ASKED = 2**31


def prepares_statements() -> bool:
    """Whether the mail path's statements are sent as prepared statements (DB_PREPARED_STATEMENTS)."""
    return settings.DB_PREPARED_STATEMENTS


def cursor(using: str = "default"):
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


def writes_in_one_statement(using: str = "default") -> bool:
    """Whether the database runs a data-modifying WITH (PostgreSQL does; SQLite does not)."""
    return connections[using].vendor == "postgresql"


def from_row(model: type[M], row: Sequence[Any], using: str = "default") -> tuple[M, tuple]:
    """A row that starts with `returning(model)`'s columns, as an instance (converted as the ORM converts
    what it reads), and the values of the row's further columns."""
    connection = connections[using]
    _, names, converters = returning(model, using)
    width = len(names)
    values_in = list(row[:width])
    for index, (col, funcs) in enumerate(converters):
        for func in funcs:
            values_in[index] = func(values_in[index], col, connection)
    return model.from_db(using, names, values_in), tuple(row[width:])
