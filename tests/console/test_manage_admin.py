"""The Django admin: every gateway and quarantine table is registered, its pages load, changes are audited."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.urls import reverse

from gateway.models import AuditEvent, MailFlowSettings, Message, SenderListEntry, TrustedNetwork
from quarantine.models import BulkJob
from tests.support.people import People, make_people, make_user, quarantined

pytestmark = pytest.mark.django_db


@pytest.fixture
def people(db) -> People:
    return make_people()


@pytest.fixture
def root(client, people):
    user = make_user("root", role="admin", email="root@example.org", superuser=True)
    client.force_login(user)
    return client


def test_every_model_of_the_two_apps_is_registered():
    from django.apps import apps

    for app in ("gateway", "quarantine"):
        for model in apps.get_app_config(app).get_models():
            assert admin.site.is_registered(model), model


def test_every_changelist_and_change_page_loads(root, people):
    message = quarantined("alice@example.org")
    MailFlowSettings.load()
    TrustedNetwork.objects.create(network="192.0.2.0/24")
    SenderListEntry.objects.create(kind="block", scope="global", sender="@spam.example")
    BulkJob.objects.create(created_by=people.alice, action="delete")
    AuditEvent.objects.create(action="test", message=message)
    for model in admin.site._registry:
        if model._meta.app_label not in ("gateway", "quarantine", "auth"):
            continue
        prefix = f"admin:{model._meta.app_label}_{model._meta.model_name}"
        assert root.get(reverse(f"{prefix}_changelist")).status_code == 200, model
        obj = model._default_manager.first()
        if obj is not None:
            assert root.get(reverse(f"{prefix}_change", args=[obj.pk])).status_code == 200, model
    assert root.get(reverse("admin:gateway_message_changelist"), {"q": message.queue_id}).status_code == 200


def test_the_log_is_read_only_and_settings_are_one_row(root, people):
    message = quarantined("alice@example.org")
    assert root.get(reverse("admin:gateway_message_add")).status_code == 403
    assert root.post(reverse("admin:gateway_message_delete", args=[message.pk]), {"post": "yes"}).status_code == 403
    assert Message.objects.filter(pk=message.pk).exists()
    MailFlowSettings.load()
    assert root.get(reverse("admin:gateway_mailflowsettings_add")).status_code == 403


def test_admin_changes_are_audited(root, people):
    response = root.post(reverse("admin:gateway_trustednetwork_add"), {"network": "198.51.100.0/24",
                                                                        "description": "branch"})
    assert response.status_code == 302
    network = TrustedNetwork.objects.get()
    root.post(reverse("admin:gateway_trustednetwork_delete", args=[network.pk]), {"post": "yes"})
    events = list(AuditEvent.objects.exclude(action="login").order_by("id").values_list("action", "username"))
    assert events == [("admin_add", "root"), ("admin_delete", "root")]


def test_non_staff_cannot_use_the_admin(client, people):
    client.force_login(people.dana)
    response = client.get(reverse("admin:gateway_domain_changelist"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
