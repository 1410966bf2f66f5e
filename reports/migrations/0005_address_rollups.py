"""A user's numbers kept as a domain's are, and a user's mail read in time order from an index.

- `AddressStat`: per address of a protected domain, per local day and direction, the roll-up's counters.
- `DailyTop.scope` holds an address too (the score rows of a user): 320 characters.
- On PostgreSQL, indexes that serve a user's mail newest first (`MessageQuerySet.newest_visible_parts`) and a
  user's time window (`visible_to(user, received=…)`):
  - gateway_recipient (address, received_at, message_id), which replaces (address, message_id): with
    the address leading it serves every look-up that one served, and the message id is still in it;
  - gateway_message (envelope_sender, received_at, id), which replaces the single-column index of
    envelope_sender (found by definition, as in 0003).
  Built CONCURRENTLY: the mail path goes on writing while they are built.
"""

import importlib

from django.db import migrations, models

OLD_RECIPIENT_INDEX = "reports_recipient_address_message"
NEW_INDEXES = {
    "reports_recipient_address_time": "gateway_recipient (address, received_at, message_id)",
    "reports_message_sender_time": "gateway_message (envelope_sender, received_at, id)",
}


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    single_column_indexes = importlib.import_module(
        "reports.migrations.0003_fewer_write_indexes").single_column_indexes
    for name, target in NEW_INDEXES.items():
        schema_editor.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {target}")
    schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {OLD_RECIPIENT_INDEX}")
    with schema_editor.connection.cursor() as cursor:
        for name in single_column_indexes(cursor, "gateway_message", "envelope_sender"):
            schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {schema_editor.quote_name(name)}")


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {OLD_RECIPIENT_INDEX} ON gateway_recipient (address, message_id)")
    schema_editor.execute("CREATE INDEX IF NOT EXISTS gateway_message_envelope_sender_single "
                          "ON gateway_message (envelope_sender)")
    for name in NEW_INDEXES:
        schema_editor.execute(f"DROP INDEX IF EXISTS {name}")


COUNTER_FIELDS = [
    ("messages", "Accepted messages (refused attempts not counted)"), ("clean", ""), ("spam", ""),
    ("high_spam", ""), ("virus", ""), ("blocked_attachment", ""), ("blocked_sender", ""),
    ("unscannable", "Messages the scanners could not check whole"), ("quarantined", ""),
    ("volume", "Bytes of the accepted messages"), ("refused", "Attempts refused at SMTP time, all reasons"),
    ("refused_unknown_user", ""), ("refused_cant_resolve", ""), ("refused_rbl", ""), ("refused_relay_denied", ""),
]


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("reports", "0004_trafficstat_unscannable"),
        ("gateway", "0011_recipient_received_at"),
    ]

    operations = [
        migrations.CreateModel(
            name="AddressStat",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                *[(name, models.BigIntegerField(default=0, help_text=text)) for name, text in COUNTER_FIELDS],
                ("day", models.DateField(help_text="Local date (TIME_ZONE)")),
                ("address", models.CharField(max_length=320)),
                ("direction", models.CharField(max_length=10)),
            ],
            options={
                "constraints": [models.UniqueConstraint(fields=("address", "day", "direction"),
                                                        name="addressstat_unique")],
            },
        ),
        migrations.AlterField(model_name="dailytop", name="scope", field=models.CharField(max_length=320)),
        migrations.RunPython(forwards, backwards),
    ]
