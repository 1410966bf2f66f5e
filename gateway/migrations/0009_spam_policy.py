# The spam policies of domains and users, and the policy that decided on each recipient.

import django.core.validators
import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('gateway', '0008_message_node_index'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name='recipient',
            name='policy',
            field=models.CharField(blank=True, max_length=400),
        ),
        migrations.AddField(
            model_name='recipient',
            name='spam_threshold',
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.CreateModel(
            name='DomainSpamPolicy',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('spam_threshold', models.FloatField(blank=True, help_text='Score from which mail is spam; empty: the global setting', null=True, validators=[django.core.validators.MinValueValidator(-1000), django.core.validators.MaxValueValidator(100000)])),
                ('high_spam_threshold', models.FloatField(blank=True, help_text='Score from which mail is high spam; empty: the global setting', null=True, validators=[django.core.validators.MinValueValidator(-1000), django.core.validators.MaxValueValidator(100000)])),
                ('action_spam', models.CharField(blank=True, choices=[('deliver', 'Deliver'), ('tag', 'Deliver tagged (subject prefix)'), ('quarantine', 'Quarantine'), ('delete', 'Delete')], help_text='Empty: the global setting', max_length=12)),
                ('action_high_spam', models.CharField(blank=True, choices=[('deliver', 'Deliver'), ('tag', 'Deliver tagged (subject prefix)'), ('quarantine', 'Quarantine'), ('delete', 'Delete')], help_text='Empty: the global setting', max_length=12)),
                ('users_may_choose', models.BooleanField(default=False, help_text='Users may set their own thresholds, within the limits below')),
                ('user_min_threshold', models.FloatField(blank=True, help_text='The lowest threshold a user may choose; empty: no limit', null=True, validators=[django.core.validators.MinValueValidator(-1000), django.core.validators.MaxValueValidator(100000)])),
                ('user_max_threshold', models.FloatField(blank=True, help_text='The highest threshold a user may choose; empty: no limit', null=True, validators=[django.core.validators.MinValueValidator(-1000), django.core.validators.MaxValueValidator(100000)])),
                ('users_may_skip_quarantine', models.BooleanField(default=False, help_text='Users may have their spam delivered tagged instead of quarantined')),
                ('domain', models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, related_name='spam_policy', to='gateway.domain')),
            ],
            options={
                'verbose_name': 'domain spam policy',
                'verbose_name_plural': 'domain spam policy',
            },
        ),
        migrations.CreateModel(
            name='UserSpamPolicy',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('spam_threshold', models.FloatField(blank=True, help_text="Score from which mail is spam; empty: your domain's setting", null=True, validators=[django.core.validators.MinValueValidator(-1000), django.core.validators.MaxValueValidator(100000)])),
                ('high_spam_threshold', models.FloatField(blank=True, help_text="Score from which mail is high spam; empty: your domain's setting", null=True, validators=[django.core.validators.MinValueValidator(-1000), django.core.validators.MaxValueValidator(100000)])),
                ('skip_quarantine', models.BooleanField(default=False, help_text='Deliver my spam tagged instead of holding it in the quarantine (never a virus, a blocked attachment or a message that could not be checked)')),
                ('user', models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, related_name='spam_policy', to=settings.AUTH_USER_MODEL)),
            ],
            options={
                'verbose_name': 'user spam policy',
                'verbose_name_plural': 'user spam policy',
            },
        ),
    ]
