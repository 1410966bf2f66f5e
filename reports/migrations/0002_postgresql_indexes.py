"""Indexes on the gateway's tables that the reports need, on PostgreSQL only.

They live here, not in gateway's migrations, because only the reports use them:
- claimed_at / scanned_at / completed_at: the roll-up finds the messages that changed since its last run;
- recipient (domain, message_id) and (address, message_id): the scoping of a domain administrator or a user
  (`Message.objects.visible_to`) builds its set of message ids from an index alone.
IF NOT EXISTS: gateway may add the same index under the same name one day.
"""

from django.db import migrations

INDEXES = {
    "reports_message_claimed_at": "gateway_message (claimed_at)",
    "reports_message_scanned_at": "gateway_message (scanned_at)",
    "reports_message_completed_at": "gateway_message (completed_at)",
    "reports_recipient_domain_message": "gateway_recipient (domain, message_id)",
    "reports_recipient_address_message": "gateway_recipient (address, message_id)",
}


def create_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name, target in INDEXES.items():
        schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {target}")


def drop_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name in INDEXES:
        schema_editor.execute(f"DROP INDEX IF EXISTS {name}")


class Migration(migrations.Migration):
    dependencies = [
        ("reports", "0001_initial"),
        ("gateway", "0001_initial"),
    ]

    operations = [migrations.RunPython(create_indexes, drop_indexes)]
