"""Every quarantine action works on the held recipients its caller acts for, and only on those: a user's own
addresses, a domain administrator's domains. The other recipients' copies stay held, the stored original stays
while any copy is held or on its way, being the (forgeable) envelope sender grants nothing, and the audit row
names the recipients an action touched."""

from __future__ import annotations

from unittest import mock

import pytest
from django.core.exceptions import PermissionDenied, ValidationError

from gateway.models import AuditEvent, Message, RawMessage, Recipient
from quarantine import actions
from quarantine.models import BulkJob
from tests.support.people import People, logged_in, make_people, quarantined

pytestmark = pytest.mark.django_db


@pytest.fixture
def people(db) -> People:
    return make_people()


@pytest.fixture
def no_delivery():
    with mock.patch("gateway.dispatch.enqueue.delivery") as enqueue:
        yield enqueue


def url(queue_id: str, action: str = "") -> str:
    return f"/quarantine/{queue_id}/{action}"


def statuses(message: Message) -> dict[str, str]:
    return dict(message.recipients.values_list("address", "status"))


def audit(message: Message, action: str) -> list[dict]:
    return [e.detail for e in AuditEvent.objects.filter(message=message, action=action).order_by("id")]


# --- Delete -------------------------------------------------------------------------------------------


def test_a_user_deletes_only_her_own_copy(client, people, no_delivery):
    message = quarantined(["alice@example.org", "bob@example.net"])
    logged_in(client, people.alice)
    response = client.post(url(message.queue_id, "delete"), follow=True)
    assert "deleted for your recipients" in response.content.decode()
    message.refresh_from_db()
    assert statuses(message) == {"alice@example.org": Recipient.Status.DELETED,
                                 "bob@example.net": Recipient.Status.QUARANTINED}
    # Bob's copy is still in the quarantine, and so is the original it is made from.
    assert (message.state, message.quarantined) == (Message.State.QUARANTINED, True)
    assert RawMessage.objects.filter(message=message).exists()
    assert audit(message, "delete") == [{"recipients": ["alice@example.org"]}]
    # It has left Alice's quarantine, not Bob's.
    assert message.queue_id not in client.get("/quarantine/").content.decode()
    assert message.queue_id in logged_in(client, people.bob).get("/quarantine/").content.decode()

    # Bob deletes his: nothing is held any more, the original goes.
    client.post(url(message.queue_id, "delete"))
    message.refresh_from_db()
    assert message.state == Message.State.DELETED and not message.quarantined
    assert not RawMessage.objects.filter(message=message).exists()
    assert audit(message, "delete")[-1] == {"recipients": ["bob@example.net"]}


def test_a_second_click_on_delete_says_so_and_touches_nothing_else(client, people):
    message = quarantined(["alice@example.org", "bob@example.net"])
    logged_in(client, people.alice)
    client.post(url(message.queue_id, "delete"))
    again = client.post(url(message.queue_id, "delete"), follow=True)
    assert again.status_code == 200 and "no longer in the quarantine" in again.content.decode()
    assert statuses(message)["bob@example.net"] == Recipient.Status.QUARANTINED
    assert len(audit(message, "delete")) == 1


def test_a_domain_administrator_deletes_only_her_domains_copies(client, people):
    message = quarantined(["carol@example.org", "bob@example.net"])
    logged_in(client, people.dana)
    client.post(url(message.queue_id, "delete"))
    assert statuses(message) == {"carol@example.org": Recipient.Status.DELETED,
                                 "bob@example.net": Recipient.Status.QUARANTINED}
    assert audit(message, "delete") == [{"recipients": ["carol@example.org"]}]


def test_the_command_line_acts_for_every_recipient(people):
    message = quarantined(["alice@example.org", "bob@example.net"])
    assert actions.delete_message(message, by=None)
    assert set(statuses(message).values()) == {Recipient.Status.DELETED}
    assert not RawMessage.objects.filter(message=message).exists()


def test_a_release_on_its_way_keeps_the_original_when_the_last_held_copy_is_deleted(client, people, no_delivery):
    message = quarantined(["alice@example.org", "bob@example.net"])
    logged_in(client, people.alice)
    client.post(url(message.queue_id, "release"))
    message.refresh_from_db()
    assert message.state == Message.State.QUARANTINED  # Bob's copy is still held
    logged_in(client, people.bob)
    client.post(url(message.queue_id, "delete"))
    message.refresh_from_db()
    assert statuses(message) == {"alice@example.org": Recipient.Status.PENDING,
                                 "bob@example.net": Recipient.Status.DELETED}
    # Alice's copy is on its way: the bytes it is sent from stay; the message is a released one now.
    assert message.state == Message.State.RELEASED and not message.quarantined
    assert RawMessage.objects.filter(message=message).exists()


# --- Release, and release to another address ----------------------------------------------------------


def test_the_sender_of_a_message_may_not_release_it_to_herself(client, people, no_delivery):
    # The envelope sender is whatever the client said: being it gives no say over the recipients' copies.
    message = quarantined("bob@example.net", sender="alice@example.org")
    logged_in(client, people.alice)
    response = client.post(url(message.queue_id, "release"), {"to_address": "alice@example.org"})
    assert response.status_code == 403
    assert statuses(message) == {"bob@example.net": Recipient.Status.QUARANTINED}
    with pytest.raises(PermissionDenied):
        actions.release_message(message, by=people.alice, to_address="alice@example.org")
    assert statuses(message) == {"bob@example.net": Recipient.Status.QUARANTINED}
    no_delivery.assert_not_called()
    assert not AuditEvent.objects.filter(message=message).exists()


def test_release_to_another_address_takes_only_the_callers_copies(client, people, no_delivery):
    message = quarantined(["carol@example.org", "bob@example.net"])
    logged_in(client, people.dana)
    client.post(url(message.queue_id, "release"), {"to_address": "helpdesk@example.org"})
    message.refresh_from_db()
    assert statuses(message) == {"carol@example.org": Recipient.Status.DELETED,
                                 "bob@example.net": Recipient.Status.QUARANTINED,
                                 "helpdesk@example.org": Recipient.Status.PENDING}
    assert message.state == Message.State.QUARANTINED  # Bob's copy still waits for Bob
    assert audit(message, "release") == [{"recipients": ["carol@example.org"], "to_address": "helpdesk@example.org"}]
    no_delivery.assert_called_once_with(message.pk)


def test_a_release_names_its_recipients_in_the_audit(client, people, no_delivery):
    message = quarantined(["alice@example.org", "ali@example.org", "bob@example.net"])
    logged_in(client, people.alice)
    client.post(url(message.queue_id, "release"))
    assert statuses(message) == {"alice@example.org": Recipient.Status.PENDING,
                                 "ali@example.org": Recipient.Status.PENDING,
                                 "bob@example.net": Recipient.Status.QUARANTINED}
    assert audit(message, "release") == [{"recipients": ["alice@example.org", "ali@example.org"]}]


def test_a_user_cannot_pick_someone_elses_recipient(people, no_delivery):
    message = quarantined(["alice@example.org", "bob@example.net"])
    with pytest.raises(ValidationError):
        actions.release_message(message, by=people.alice, recipients=["bob@example.net"])
    assert set(statuses(message).values()) == {Recipient.Status.QUARANTINED}


# --- Learn ----------------------------------------------------------------------------------------------


def test_the_sender_may_not_teach_the_filter_about_her_own_message(client, people, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = True
    message = quarantined("bob@example.net", sender="alice@example.org")
    logged_in(client, people.alice)
    with mock.patch("gateway.dispatch.enqueue.learn") as learn:
        response = client.post(url(message.queue_id, "learn"), {"as": "ham"})
        assert response.status_code == 403
        with pytest.raises(PermissionDenied):
            actions.learn_message(message, as_spam=False, by=people.alice)
    learn.assert_not_called()
    assert not AuditEvent.objects.filter(message=message).exists()


# --- Bulk jobs ------------------------------------------------------------------------------------------


def test_bulk_jobs_keep_to_the_owners_recipients(client, people, no_delivery):
    shared = quarantined(["alice@example.org", "bob@example.net"])
    sent_by_alice = quarantined("bob@example.net", sender="alice@example.org")
    logged_in(client, people.alice)
    response = client.post("/quarantine/bulk", {"action": "delete", "target": "all"}, follow=True)
    text = response.content.decode()
    assert "Deleted 1 of 2 messages; 1 failed" in text and sent_by_alice.queue_id in text
    assert statuses(shared) == {"alice@example.org": Recipient.Status.DELETED,
                                "bob@example.net": Recipient.Status.QUARANTINED}
    assert statuses(sent_by_alice) == {"bob@example.net": Recipient.Status.QUARANTINED}
    assert RawMessage.objects.filter(message__in=[shared, sent_by_alice]).count() == 2

    client.post("/quarantine/bulk", {"action": "release", "target": "selected", "ids": [sent_by_alice.queue_id]})
    assert statuses(sent_by_alice) == {"bob@example.net": Recipient.Status.QUARANTINED}
    job = BulkJob.objects.filter(action="release").get()
    assert (job.succeeded, job.failed) == (0, 1) and "held recipients is yours" in job.errors[0]
    no_delivery.assert_not_called()


# --- What the pages offer -------------------------------------------------------------------------------


def test_no_buttons_for_mail_seen_only_as_its_sender(client, people):
    message = quarantined("bob@example.net", sender="alice@example.org")
    logged_in(client, people.alice)
    detail = client.get(f"/messages/{message.queue_id}/")
    assert detail.status_code == 200
    assert detail.context["actions"] == []
    page = client.get(url(message.queue_id)).content.decode()
    for action in ("release", "delete", "learn"):
        assert f'action="{url(message.queue_id, action)}"' not in page, action

    # Bob, its recipient, gets all of them, on both pages.
    logged_in(client, people.bob)
    names = [a["name"] for a in client.get(f"/messages/{message.queue_id}/").context["actions"]]
    assert names == ["release", "learn", "learn", "delete"]
    page = client.get(url(message.queue_id)).content.decode()
    for action in ("release", "delete", "learn"):
        assert f'action="{url(message.queue_id, action)}"' in page, action
