"""Recipient.received_at: the message's received_at, copied onto each of its recipients.

A user's mail in time order is then read from one index on (address, received_at) (reports' migration 0005)
rather than by sorting all of their messages. The existing rows are filled in batches of message ids, each
committed on its own (the migration is not atomic, each statement commits), so a large log is not rewritten in one transaction:
at ten million messages this takes a few minutes.
"""

from django.db import migrations, models

BATCH = 500_000


def fill(apps, schema_editor):
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        cursor.execute("SELECT min(id), max(id) FROM gateway_message")
        low, high = cursor.fetchone()
        if low is None:
            return
        for start in range(low, high + 1, BATCH):
            if connection.vendor == "postgresql":
                cursor.execute(
                    "UPDATE gateway_recipient r SET received_at = m.received_at FROM gateway_message m "
                    "WHERE m.id = r.message_id AND r.received_at IS NULL AND r.message_id >= %s "
                    "AND r.message_id < %s", [start, start + BATCH])
            else:
                cursor.execute(
                    "UPDATE gateway_recipient SET received_at = (SELECT m.received_at FROM gateway_message m "
                    "WHERE m.id = gateway_recipient.message_id) WHERE received_at IS NULL AND message_id >= %s "
                    "AND message_id < %s", [start, start + BATCH])
        if connection.vendor == "postgresql":
            # Fresh statistics for the new column, whose index reports' 0005 builds next; the rows the UPDATE
            # left behind are autovacuum's (VACUUM ANALYZE gateway_recipient at once where that cannot wait).
            cursor.execute("ANALYZE gateway_recipient")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("gateway", "0010_directories"),
    ]

    operations = [
        migrations.AddField(
            model_name="recipient",
            name="received_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(fill, migrations.RunPython.noop),
    ]
