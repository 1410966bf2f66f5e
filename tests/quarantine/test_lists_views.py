"""The allow and block lists page: who may add what where, validation that explains, and removal."""

from __future__ import annotations

import pytest
from django.test import Client

from gateway.models import AuditEvent, SenderListEntry
from gateway.policy.lists import list_decision
from tests.support.people import People, logged_in, make_people

pytestmark = pytest.mark.django_db


@pytest.fixture
def people(db) -> People:
    return make_people()


def add(client, **fields):
    return client.post("/quarantine/lists/add", {"kind": "block", **fields})


@pytest.mark.parametrize("sender", ["john@example.com", "@example.com", "*.example.com", "192.0.2.7",
                                    "192.0.2.0/24", "2001:db8::/32", " John@Example.COM "])
def test_every_kind_of_sender_pattern_is_accepted(client, people, sender):
    logged_in(client, people.alice)
    response = add(client, sender=sender)
    assert response.status_code == 302, response.content.decode()
    entry = SenderListEntry.objects.get()
    assert entry.sender == sender.strip().lower()
    assert (entry.scope, entry.user) == ("user", people.alice)


@pytest.mark.parametrize(("sender", "explanation"), [
    ("", "This field is required"),
    ("example.com", "use an address, @domain, *.domain"),
    ("@localhost", "is not a domain name"),
    ("john@", "is not a domain name"),
    ("*@example.com", "Write @example.com for a whole domain"),
    ("john doe@example.com", "not an e-mail address"),
    ("300.1.2.3", "use an address, @domain"),
])
def test_a_bad_pattern_is_explained(client, people, sender, explanation):
    logged_in(client, people.alice)
    response = add(client, sender=sender)
    assert response.status_code == 400
    assert explanation in response.content.decode()
    assert not SenderListEntry.objects.exists()


def test_a_duplicate_or_a_contradiction_is_explained(client, people):
    logged_in(client, people.alice)
    add(client, sender="x@spam.example")
    response = add(client, sender="x@spam.example")
    assert response.status_code == 400 and "already on this list" in response.content.decode()
    response = add(client, sender="x@spam.example", kind="allow")
    assert response.status_code == 400 and "on the other list" in response.content.decode()
    assert SenderListEntry.objects.count() == 1


def test_a_user_has_only_their_own_list(client, people):
    logged_in(client, people.alice)
    for scope, domain in (("global", ""), ("domain", people.org.pk)):
        assert add(client, sender="x@spam.example", scope=scope, domain=domain).status_code == 400
    assert not SenderListEntry.objects.exists()
    page = client.get("/quarantine/lists/").content.decode()
    assert 'name="domain"' not in page and 'type="hidden" name="scope"' in page


def test_a_domain_administrator_lists_for_their_domains_only(client, people):
    logged_in(client, people.dana)
    response = add(client, sender="@spam.example", scope="domain", domain=people.net.pk)
    assert response.status_code == 400 and "Select a valid choice" in response.content.decode()
    assert add(client, sender="@spam.example", scope="global").status_code == 400
    response = add(client, sender="@spam.example", scope="domain")
    assert response.status_code == 400 and "Choose the domain" in response.content.decode()
    assert add(client, sender="@spam.example", scope="domain", domain=people.org.pk).status_code == 302
    entry = SenderListEntry.objects.get()
    assert (entry.scope, entry.domain, entry.user, entry.created_by) == ("domain", people.org, None, people.dana)


def test_an_administrator_lists_for_everyone(client, people):
    logged_in(client, people.admin)
    assert add(client, sender="203.0.113.0/24", scope="global", comment="botnet").status_code == 302
    assert add(client, sender="@partner.example", kind="allow", scope="domain", domain=people.net.pk).status_code == 302
    assert set(SenderListEntry.objects.values_list("scope", "sender")) == {
        ("global", "203.0.113.0/24"), ("domain", "@partner.example")}


def test_who_sees_which_entries(client, people):
    entries = {
        "global": SenderListEntry.objects.create(kind="block", scope="global", sender="@global.example"),
        "org": SenderListEntry.objects.create(kind="block", scope="domain", domain=people.org, sender="@org.example"),
        "net": SenderListEntry.objects.create(kind="block", scope="domain", domain=people.net, sender="@net.example"),
        "alice": SenderListEntry.objects.create(kind="allow", scope="user", user=people.alice,
                                                sender="@alice.example"),
        "bob": SenderListEntry.objects.create(kind="allow", scope="user", user=people.bob, sender="@bob.example"),
    }

    def visible(user) -> set[str]:
        page = logged_in(client, user).get("/quarantine/lists/").content.decode()
        return {name for name, entry in entries.items() if entry.sender in page}

    assert visible(people.admin) == set(entries)
    assert visible(people.dana) == {"org"}
    assert visible(people.alice) == {"alice"}
    assert visible(people.bob) == {"bob"}


def test_removing_an_entry_outside_ones_lists_is_a_404(client, people):
    bobs = SenderListEntry.objects.create(kind="allow", scope="user", user=people.bob, sender="@bob.example")
    org = SenderListEntry.objects.create(kind="block", scope="domain", domain=people.org, sender="@org.example")
    net = SenderListEntry.objects.create(kind="block", scope="domain", domain=people.net, sender="@net.example")
    logged_in(client, people.alice)
    assert client.post(f"/quarantine/lists/{bobs.pk}/delete").status_code == 404
    assert client.post(f"/quarantine/lists/{org.pk}/delete").status_code == 404
    logged_in(client, people.dana)
    assert client.post(f"/quarantine/lists/{net.pk}/delete").status_code == 404
    assert client.post(f"/quarantine/lists/{org.pk}/delete").status_code == 302
    assert set(SenderListEntry.objects.values_list("pk", flat=True)) == {bobs.pk, net.pk}


def test_changes_are_audited_with_the_ip(people):
    client = Client(REMOTE_ADDR="192.0.2.44")
    client.force_login(people.alice)
    add(client, sender="x@spam.example")
    entry = SenderListEntry.objects.get()
    client.post(f"/quarantine/lists/{entry.pk}/delete")
    events = list(AuditEvent.objects.exclude(action="login").order_by("id").values_list("action", "ip", "target"))
    assert events == [("list_add", "192.0.2.44", "block x@spam.example (user alice)"),
                      ("list_delete", "192.0.2.44", "block x@spam.example (user alice)")]


def test_a_post_without_csrf_is_refused(people):
    client = Client(enforce_csrf_checks=True)
    client.force_login(people.alice)
    assert add(client, sender="x@spam.example").status_code == 403
    assert not SenderListEntry.objects.exists()


def test_an_entry_made_on_the_page_decides_for_the_pipeline(client, people):
    """What the page writes is what quarantine.lists reads (the scan pipeline's view of the lists)."""
    logged_in(client, people.alice)
    add(client, sender="*.spam.example")
    entry = list_decision("x@mail.spam.example", "198.51.100.1", "ali@example.org")
    assert entry is not None and entry.kind == "block"
    assert list_decision("x@mail.spam.example", "198.51.100.1", "bob@example.net") is None
    logged_in(client, people.dana)
    add(client, sender="198.51.100.0/24", kind="allow", scope="domain", domain=people.org.pk)
    assert list_decision("anyone@anywhere.example", "198.51.100.9", "carol@example.org").kind == "allow"
