"""SenderListEntry moved to the gateway app (gateway/migrations/0005_senderlistentry): it leaves this
app's state only; its table stays where it is, under its first name."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("gateway", "0005_senderlistentry"),
        ("quarantine", "0004_list_entry_nulls_not_distinct"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="SenderListEntry")],
            database_operations=[],
        ),
    ]
