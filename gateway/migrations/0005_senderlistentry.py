"""The allow/block list entries belong to the mail path now (gateway.policy.lists reads them at SMTP time
and at the scan): the model moves here from the quarantine app. Nothing changes in the database: the
table keeps its name (Meta.db_table), and its content type is renamed so that permissions given for it
stay with it."""

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models

import gateway.models


def rename_content_type(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    if not ContentType.objects.filter(app_label="gateway", model="senderlistentry").exists():
        ContentType.objects.filter(app_label="quarantine", model="senderlistentry").update(app_label="gateway")


def restore_content_type(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    if not ContentType.objects.filter(app_label="quarantine", model="senderlistentry").exists():
        ContentType.objects.filter(app_label="gateway", model="senderlistentry").update(app_label="quarantine")


class Migration(migrations.Migration):

    dependencies = [
        ("contenttypes", "0002_remove_content_type_name"),
        ("gateway", "0004_drop_pattern_indexes"),
        ("quarantine", "0004_list_entry_nulls_not_distinct"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="SenderListEntry",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                                   verbose_name="ID")),
                        ("kind", models.CharField(choices=[("allow", "Allow"), ("block", "Block")], max_length=5)),
                        ("scope", models.CharField(choices=[("global", "Everyone"), ("domain", "A domain"),
                                                            ("user", "One user")], default="global", max_length=6)),
                        ("sender", models.CharField(help_text="address, @domain, *.domain, IP address or CIDR network",
                                                    max_length=320,
                                                    validators=[gateway.models.validate_sender_pattern])),
                        ("comment", models.CharField(blank=True, max_length=200)),
                        ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                        ("created_by", models.ForeignKey(blank=True, null=True,
                                                         on_delete=django.db.models.deletion.SET_NULL,
                                                         related_name="+", to=settings.AUTH_USER_MODEL)),
                        ("domain", models.ForeignKey(blank=True, help_text="For scope 'domain'", null=True,
                                                     on_delete=django.db.models.deletion.CASCADE,
                                                     to="gateway.domain")),
                        ("user", models.ForeignKey(blank=True, help_text="For scope 'user'", null=True,
                                                   on_delete=django.db.models.deletion.CASCADE,
                                                   related_name="sender_list_entries", to=settings.AUTH_USER_MODEL)),
                    ],
                    options={
                        "verbose_name": "allow/block list entry",
                        "verbose_name_plural": "allow/block list entries",
                        "db_table": "quarantine_senderlistentry",
                        "ordering": ["scope", "kind", "sender"],
                        "constraints": [models.UniqueConstraint(fields=("kind", "scope", "sender", "domain", "user"),
                                                                name="unique_list_entry", nulls_distinct=False)],
                    },
                ),
            ],
            database_operations=[],
        ),
        migrations.RunPython(rename_content_type, restore_content_type),
    ]
