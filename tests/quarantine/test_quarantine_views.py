"""The quarantine pages and actions: scope (404 outside it), release rules, double clicks, CSRF, audit."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.test import Client

from gateway.models import AuditEvent, Message, Recipient, SenderListEntry
from tests.support.people import People, logged_in, make_people, quarantined, virus

pytestmark = pytest.mark.django_db


@pytest.fixture
def people(db) -> People:
    return make_people()


def url(queue_id: str, action: str = "") -> str:
    return f"/quarantine/{queue_id}/{action}"


@pytest.fixture
def no_delivery():
    """Count what a release hands to delivery, without delivering (no task, no SMTP)."""
    with mock.patch("gateway.dispatch.enqueue.delivery") as enqueue:
        yield enqueue


# --- Who sees what --------------------------------------------------------------------------------


def test_a_user_sees_only_their_quarantine(client, people):
    mine = quarantined("alice@example.org", subject="For Alice")
    alias = quarantined("ali@example.org", subject="For the alias of Alice")
    theirs = quarantined("bob@example.net", subject="For Bob")
    delivered = quarantined("alice@example.org", subject="Already delivered")
    Message.objects.filter(pk=delivered.pk).update(state=Message.State.DELIVERED)

    page = logged_in(client, people.alice).get("/quarantine/").content.decode()
    assert mine.subject in page and alias.subject in page
    assert theirs.subject not in page and delivered.subject not in page
    assert "2 messages in your quarantine" in page


@pytest.mark.parametrize("action", ["release", "delete", "learn", "allow", "block"])
def test_another_users_message_is_a_404_for_every_action(client, people, no_delivery, action):
    theirs = quarantined("bob@example.net")
    logged_in(client, people.alice)
    assert client.get(url(theirs.queue_id)).status_code == 404
    response = client.post(url(theirs.queue_id, action), {"as": "spam", f"{action}-what": "address"})
    assert response.status_code == 404
    theirs.refresh_from_db()
    assert theirs.state == Message.State.QUARANTINED
    assert not SenderListEntry.objects.exists()
    assert not AuditEvent.objects.filter(message=theirs).exists()
    no_delivery.assert_not_called()


def test_an_unknown_queue_id_is_a_404_too(client, people):
    assert logged_in(client, people.admin).get(url("DOESNOTEXIST")).status_code == 404


def test_a_domain_administrator_is_limited_to_their_domains(client, people, no_delivery):
    org = quarantined("carol@example.org", subject="For example.org")
    net = quarantined("bob@example.net", subject="For example.net")
    logged_in(client, people.dana)
    page = client.get("/quarantine/").content.decode()
    assert org.subject in page and net.subject not in page
    assert client.get(url(net.queue_id)).status_code == 404
    assert client.post(url(net.queue_id, "release")).status_code == 404
    assert client.post(url(org.queue_id, "release"), follow=True).status_code == 200
    org.refresh_from_db()
    net.refresh_from_db()
    assert (org.state, net.state) == (Message.State.RELEASED, Message.State.QUARANTINED)


def test_anonymous_visitors_are_sent_to_the_login(client, people):
    message = quarantined("alice@example.org")
    response = client.get("/quarantine/")
    assert response.status_code == 302 and "login" in response["Location"]
    assert client.post(url(message.queue_id, "release")).status_code == 302
    message.refresh_from_db()
    assert message.state == Message.State.QUARANTINED


# --- Release ----------------------------------------------------------------------------------------


def test_release_twice_delivers_once(client, people, no_delivery):
    message = quarantined("alice@example.org")
    logged_in(client, people.alice)
    first = client.post(url(message.queue_id, "release"), follow=True)
    assert "released to alice@example.org" in first.content.decode()
    second = client.post(url(message.queue_id, "release"), follow=True)
    assert "already released" in second.content.decode()
    assert no_delivery.call_count == 1
    assert AuditEvent.objects.filter(action="release", message=message).count() == 1
    recipient = message.recipients.get()
    assert (recipient.status, recipient.released) == (Recipient.Status.PENDING, True)


def test_a_virus_is_released_by_administrators_only(client, people, no_delivery):
    message = virus(["alice@example.org"])
    for user in (people.alice, people.dana):
        logged_in(client, user)
        response = client.post(url(message.queue_id, "release"))
        assert response.status_code == 403
        assert "Only administrators" in response.content.decode()
        assert "Only administrators may release it" in client.get(url(message.queue_id)).content.decode()
    message.refresh_from_db()
    assert message.state == Message.State.QUARANTINED
    no_delivery.assert_not_called()

    logged_in(client, people.admin)
    client.post(url(message.queue_id, "release"))
    message.refresh_from_db()
    assert message.state == Message.State.RELEASED
    no_delivery.assert_called_once_with(message.pk)


def test_a_user_releases_only_their_own_copy(client, people, no_delivery):
    message = quarantined(["alice@example.org", "carol@example.org"])
    logged_in(client, people.alice)
    client.post(url(message.queue_id, "release"))
    statuses = dict(message.recipients.values_list("address", "status"))
    assert statuses["alice@example.org"] == Recipient.Status.PENDING
    assert statuses["carol@example.org"] != Recipient.Status.PENDING


def test_a_user_may_not_release_mail_they_only_sent(client, people, no_delivery):
    # Alice sees mail *from* her address too, but it is not hers to push into someone else's mailbox.
    message = quarantined("someone@example.com", sender="alice@example.org")
    logged_in(client, people.alice)
    assert client.get(url(message.queue_id)).status_code == 200
    # Every action answers 403 with the reason: seeing a message as its sender grants none of them.
    for action, data in (("release", {}), ("release", {"to_address": "alice@example.org"}), ("delete", {}),
                         ("learn", {"as": "ham"})):
        response = client.post(url(message.queue_id, action), data)
        assert response.status_code == 403, action
        assert "You see this message as its sender" in response.content.decode()
    message.refresh_from_db()
    assert message.state == Message.State.QUARANTINED
    no_delivery.assert_not_called()


def test_release_to_chosen_recipients(client, people, no_delivery):
    message = quarantined(["alice@example.org", "carol@example.org"])
    logged_in(client, people.admin)
    client.post(url(message.queue_id, "release"), {"recipients": ["carol@example.org"]})
    statuses = dict(message.recipients.values_list("address", "status"))
    assert statuses["carol@example.org"] == Recipient.Status.PENDING
    assert statuses["alice@example.org"] != Recipient.Status.PENDING


def test_release_to_another_address_is_validated(client, people, no_delivery):
    message = quarantined("alice@example.org")
    logged_in(client, people.alice)
    response = client.post(url(message.queue_id, "release"), {"to_address": "not an address"})
    assert response.status_code == 400 and "is not an e-mail address" in response.content.decode()
    response = client.post(url(message.queue_id, "release"), {"to_address": "mallory@evil.example"})
    assert response.status_code == 400
    assert "You may not release mail to mallory@evil.example" in response.content.decode()
    no_delivery.assert_not_called()

    client.post(url(message.queue_id, "release"), {"to_address": "ALI@example.org"})
    assert set(message.recipients.filter(released=True).values_list("address", flat=True)) == {"ali@example.org"}
    no_delivery.assert_called_once()


def test_an_administrator_releases_to_any_valid_address(client, people, no_delivery):
    message = quarantined("alice@example.org")
    logged_in(client, people.admin)
    client.post(url(message.queue_id, "release"), {"to_address": "analyst@security.example"})
    message.refresh_from_db()
    assert message.state == Message.State.RELEASED
    assert message.recipients.filter(address="analyst@security.example", released=True).exists()


# --- Delete and learn -------------------------------------------------------------------------------


def test_delete_then_release_says_already_deleted(client, people, no_delivery):
    message = quarantined("alice@example.org")
    logged_in(client, people.alice)
    assert "deleted" in client.post(url(message.queue_id, "delete"), follow=True).content.decode()
    message.refresh_from_db()
    assert message.state == Message.State.DELETED and not hasattr(message, "raw")
    assert "already deleted" in client.post(url(message.queue_id, "release"), follow=True).content.decode()
    no_delivery.assert_not_called()


def test_learn_as_spam_and_as_ham(client, people, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = True  # tasks are sent (here: to the mock), not run inline
    message = quarantined("alice@example.org")
    logged_in(client, people.alice)
    with mock.patch("gateway.dispatch.enqueue.learn") as learn:
        client.post(url(message.queue_id, "learn"), {"as": "spam"})
        client.post(url(message.queue_id, "learn"), {"as": "ham"})
        assert client.post(url(message.queue_id, "learn"), {"as": "maybe"}).status_code == 400
    assert [c.args for c in learn.call_args_list] == [(message.pk, True), (message.pk, False)]
    assert list(AuditEvent.objects.filter(message=message).order_by("id").values_list("action", flat=True)) == [
        "learn_spam", "learn_ham"]


def test_actions_are_post_only(client, people):
    message = quarantined("alice@example.org")
    logged_in(client, people.alice)
    for action in ("release", "delete", "learn", "allow", "block"):
        assert client.get(url(message.queue_id, action)).status_code == 405


# --- CSRF and audit ---------------------------------------------------------------------------------


def test_a_post_without_csrf_token_is_refused(people, no_delivery):
    message = quarantined("alice@example.org")
    client = Client(enforce_csrf_checks=True)
    client.force_login(people.alice)
    for action in ("release", "delete", "allow"):
        assert client.post(url(message.queue_id, action)).status_code == 403
    assert client.post("/quarantine/bulk", {"action": "delete", "target": "all"}).status_code == 403
    assert client.post("/quarantine/lists/add", {"kind": "block", "sender": "x@y.example"}).status_code == 403
    message.refresh_from_db()
    assert message.state == Message.State.QUARANTINED
    assert not SenderListEntry.objects.exists()


def test_every_action_is_audited_with_the_client_ip(people, no_delivery):
    client = Client(REMOTE_ADDR="203.0.113.9")
    client.force_login(people.admin)
    released, deleted = quarantined("alice@example.org"), quarantined("bob@example.net")
    client.post(url(released.queue_id, "release"))
    client.post(url(deleted.queue_id, "delete"))
    client.post(url(deleted.queue_id, "block"), {"block-what": "domain", "block-scope": "global"})
    events = AuditEvent.objects.exclude(action="login").order_by("id")
    assert [(e.action, e.ip, e.username) for e in events] == [
        ("release", "203.0.113.9", "admin"), ("delete", "203.0.113.9", "admin"),
        ("list_add", "203.0.113.9", "admin")]


# --- Allow and block the sender of a message ----------------------------------------------------------


def test_allow_sender_from_a_message_goes_to_the_users_own_list(client, people):
    message = quarantined("alice@example.org", sender="News@Shop.example")
    logged_in(client, people.alice)
    # A user has no say over the scope: a forged one is refused.
    response = client.post(url(message.queue_id, "allow"), {"allow-what": "address", "allow-scope": "global"})
    assert response.status_code == 400 and not SenderListEntry.objects.exists()
    # The pattern comes from the message: a forged sender field is ignored.
    client.post(url(message.queue_id, "allow"), {"allow-what": "address", "allow-sender": "*.com"})
    entry = SenderListEntry.objects.get()
    assert (entry.kind, entry.scope, entry.sender, entry.user) == ("allow", "user", "news@shop.example", people.alice)


def test_a_domain_administrator_chooses_which_of_their_domains(client, people):
    message = quarantined("carol@example.org")
    logged_in(client, people.dana)
    page = client.get(url(message.queue_id)).content.decode()
    assert 'name="block-domain"' in page and "example.net" not in page.split('name="block-domain"')[1][:400]
    response = client.post(url(message.queue_id, "block"), {"block-what": "domain", "block-scope": "domain",
                                                            "block-domain": people.net.pk})
    assert response.status_code == 400 and "Select a valid choice" in response.content.decode()
    client.post(url(message.queue_id, "block"), {"block-what": "domain", "block-scope": "domain",
                                                 "block-domain": people.org.pk})
    entry = SenderListEntry.objects.get()
    assert (entry.kind, entry.scope, entry.sender, entry.domain) == ("block", "domain", "@spam.example", people.org)


def test_an_administrator_lists_globally(client, people):
    message = quarantined("alice@example.org")
    logged_in(client, people.admin)
    client.post(url(message.queue_id, "block"), {"block-what": "address", "block-scope": "global"})
    entry = SenderListEntry.objects.get()
    assert (entry.scope, entry.domain, entry.user) == ("global", None, None)
    response = client.post(url(message.queue_id, "block"), {"block-what": "address", "block-scope": "global"})
    assert response.status_code == 400 and "already on this list" in response.content.decode()


def test_a_bounce_has_no_sender_to_list(client, people):
    message = quarantined("alice@example.org", sender="")
    logged_in(client, people.alice)
    response = client.post(url(message.queue_id, "block"), {"block-what": "address"})
    assert response.status_code == 400 and "no sender address" in response.content.decode()


# --- The list: filters and keyset paging ---------------------------------------------------------------


def test_filters(client, people):
    quarantined("alice@example.org", subject="Old one", age=timedelta(days=10))
    quarantined("alice@example.org", subject="Virus one", verdict="virus", viruses=["EICAR"])
    quarantined("ali@example.org", subject="From the bank", sender="phish@bank.example")
    logged_in(client, people.alice)

    def subjects(**query) -> set[str]:
        page = client.get("/quarantine/", query).content.decode()
        return {s for s in ("Old one", "Virus one", "From the bank") if s in page}

    assert subjects(verdict="virus") == {"Virus one"}
    assert subjects(sender="bank") == {"From the bank"}
    assert subjects(recipient="ali@") == {"From the bank"}
    assert subjects(subject="one") == {"Old one", "Virus one"}
    today = Message.objects.latest("received_at").received_at.date()
    assert subjects(date_from=str(today)) == {"Virus one", "From the bank"}
    assert subjects(date_to=str(today - timedelta(days=5))) == {"Old one"}
    response = client.get("/quarantine/", {"date_from": str(today), "date_to": str(today - timedelta(days=1))})
    assert "The end date is before the start date" in response.content.decode()


def test_keyset_paging_visits_every_message_once(client, people):
    # Same received_at for many rows: the id breaks the tie, so no row is skipped or shown twice.
    messages = [quarantined("alice@example.org", subject=f"Message number {i:03d}.") for i in range(120)]
    same_time = messages[0].received_at
    Message.objects.filter(pk__in=[m.pk for m in messages[:70]]).update(received_at=same_time)
    # The recipients keep their message's received_at (the index a user's quarantine is paged by).
    Recipient.objects.filter(message_id__in=[m.pk for m in messages[:70]]).update(received_at=same_time)
    logged_in(client, people.alice)
    seen, query, pages = [], {}, 0
    while True:
        response = client.get("/quarantine/", query)
        page = response.content.decode()
        seen += [f"{i:03d}" for i in range(120) if f"Message number {i:03d}." in page]
        pages += 1
        after = response.context["older"]
        if not after:
            break
        query = {"after": after}
    assert pages == 3
    assert sorted(seen) == [f"{i:03d}" for i in range(120)] and len(seen) == 120
    # And back: the newer page of page 2 is page 1.
    first = client.get("/quarantine/")
    second = client.get("/quarantine/", {"after": first.context["older"]})
    back = client.get("/quarantine/", {"before": second.context["newer"]})
    assert [m.pk for m in back.context["rows"]] == [m.pk for m in first.context["rows"]]
    assert back.context["newer"] is None


def test_a_broken_cursor_shows_the_first_page(client, people):
    quarantined("alice@example.org", subject="Still here")
    logged_in(client, people.alice)
    assert "Still here" in client.get("/quarantine/", {"after": "garbage"}).content.decode()


def test_a_large_quarantine_is_counted_up_to_a_limit(client, people, monkeypatch):
    """Counting every held message of a million would cost seconds per page: past COUNT_LIMIT the page says
    "more than", and the bulk action still takes them all."""
    monkeypatch.setattr("quarantine.views.COUNT_LIMIT", 3)
    for i in range(3):
        quarantined("alice@example.org", subject=f"Held {i}")
    logged_in(client, people.alice)
    page = client.get("/quarantine/").content.decode()
    assert "3 messages in your quarantine" in page and "More than" not in page
    quarantined("alice@example.org", subject="Held 3")
    page = client.get("/quarantine/").content.decode()
    assert "More than 3 messages in your quarantine" in page
    assert "all (more than 3) that match" in page
    assert all(f"Held {i}" in page for i in range(4))
