"""Fewer index entries at every write of a message or a recipient, on PostgreSQL.

A message's row is written four times on its way (received, scanning, verdict, final state) and a
recipient's three; each write that changes an indexed column takes a new entry in every index of the
table (no HOT update), ~15 µs of the database's CPU each.

- The roll-up's three indexes on claimed_at, scanned_at and completed_at become one on
  GREATEST(claimed_at, scanned_at, completed_at): "changed since" is the same question (GREATEST skips
  NULLs), and reports/rollup.py asks it that way on PostgreSQL.
- The recipient's single-column indexes on address and on domain go: the roll-up's (address, message_id)
  and (domain, message_id) serve every lookup they served, the address or the domain leading. Found by
  definition rather than by name, since Django names them with a hash. Other databases keep them.
"""

from django.db import migrations

CHANGED_AT = "reports_message_changed_at"
SINGLE_TIMES = {
    "reports_message_claimed_at": "claimed_at",
    "reports_message_scanned_at": "scanned_at",
    "reports_message_completed_at": "completed_at",
}
REDUNDANT_COLUMNS = ("address", "domain")  # each led by the reports_recipient_*_message index


def single_column_indexes(cursor, table: str, column: str) -> list[str]:
    """Plain (non-unique, non-partial, default operator class) one-column B-tree indexes of the column."""
    cursor.execute(
        """
        SELECT i.relname FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace AND n.nspname = current_schema()
        JOIN pg_am a ON a.oid = i.relam AND a.amname = 'btree'
        JOIN pg_attribute c ON c.attrelid = t.oid AND c.attnum = x.indkey[0]
        JOIN pg_opclass o ON o.oid = x.indclass[0] AND o.opcdefault
        WHERE t.relname = %s AND c.attname = %s AND x.indnatts = 1 AND NOT x.indisunique
          AND x.indpred IS NULL AND x.indexprs IS NULL
        """,
        [table, column],
    )
    return [name for (name,) in cursor.fetchall()]


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {CHANGED_AT} "
                          "ON gateway_message ((GREATEST(claimed_at, scanned_at, completed_at)))")
    for name in SINGLE_TIMES:
        schema_editor.execute(f"DROP INDEX IF EXISTS {name}")
    with schema_editor.connection.cursor() as cursor:
        for column in REDUNDANT_COLUMNS:
            cursor.execute("SELECT 1 FROM pg_class WHERE relname = %s", [f"reports_recipient_{column}_message"])
            if cursor.fetchone() is None:  # the composite is missing: keep the single one
                continue
            for name in single_column_indexes(cursor, "gateway_recipient", column):
                schema_editor.execute(f"DROP INDEX IF EXISTS {schema_editor.quote_name(name)}")


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name, column in SINGLE_TIMES.items():
        schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {name} ON gateway_message ({column})")
    schema_editor.execute(f"DROP INDEX IF EXISTS {CHANGED_AT}")
    for column in REDUNDANT_COLUMNS:
        schema_editor.execute(f"CREATE INDEX IF NOT EXISTS gateway_recipient_{column}_single "
                              f"ON gateway_recipient ({column})")


class Migration(migrations.Migration):
    dependencies = [
        ("reports", "0002_postgresql_indexes"),
        ("gateway", "0004_drop_pattern_indexes"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
