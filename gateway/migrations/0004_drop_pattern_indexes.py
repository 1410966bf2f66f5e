"""Drop the pattern-matching copies of the mail log's text indexes, on PostgreSQL.

For every indexed or unique varchar column, Django on PostgreSQL makes a second index with
varchar_pattern_ops, for case-sensitive `LIKE 'prefix%'` (`startswith`). Nothing here searches the log
that way: lookups are exact (`queue_id`, an address, a domain) or case-insensitive substrings, which no
B-tree serves. Yet each of these indexes takes a new entry at every write of a row: a message's row is
written four times on its way (received, scanning, verdict, final state) and a recipient's three.
Found by operator class rather than by name, since Django names them with a hash.
"""

from django.db import migrations

TABLES = ("gateway_message", "gateway_recipient")


def pattern_indexes(cursor) -> list[str]:
    cursor.execute(
        """
        SELECT i.relname FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace AND n.nspname = current_schema()
        JOIN pg_opclass o ON o.oid = x.indclass[0]
        WHERE t.relname = ANY(%s) AND o.opcname IN ('varchar_pattern_ops', 'text_pattern_ops')
          AND x.indnatts = 1 AND NOT x.indisunique
        """,
        [list(TABLES)],
    )
    return [name for (name,) in cursor.fetchall()]


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        for name in pattern_indexes(cursor):
            schema_editor.execute(f"DROP INDEX IF EXISTS {schema_editor.quote_name(name)}")


class Migration(migrations.Migration):
    dependencies = [
        ("gateway", "0003_smtp_policy"),
    ]

    # Not put back on the way down: nothing needs them.
    operations = [migrations.RunPython(drop, migrations.RunPython.noop)]
