"""The spam policies' pages: a domain's (/manage/spam/, its administrators and administrators) and a user's own
(/account/spam, within the limits of the domains of their addresses)."""

from __future__ import annotations

import pytest

from gateway.models import Action, AuditEvent, DomainSpamPolicy, UserSpamPolicy
from tests.support.people import People, logged_in, make_people, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def people(db) -> People:
    return make_people()


# --- A domain's policy -------------------------------------------------------------------------------


def test_a_domain_administrator_edits_the_policy_of_their_domain_only(client, people):
    logged_in(client, people.dana)
    listing = client.get("/manage/spam/").content.decode()
    assert "example.org" in listing and "example.net" not in listing
    assert client.get(f"/manage/spam/{people.net.pk}/").status_code == 404
    assert client.post(f"/manage/spam/{people.net.pk}/", {"spam_threshold": "1"}).status_code == 404
    assert client.post(f"/manage/spam/{people.net.pk}/delete").status_code == 404
    assert not DomainSpamPolicy.objects.exists()

    response = client.post(f"/manage/spam/{people.org.pk}/", {
        "spam_threshold": "4", "high_spam_threshold": "", "action_spam": Action.QUARANTINE, "action_high_spam": "",
        "users_may_choose": "on", "user_min_threshold": "2", "user_max_threshold": "12"})
    assert response.status_code == 302
    policy = DomainSpamPolicy.objects.get(domain=people.org)
    assert (policy.spam_threshold, policy.high_spam_threshold, policy.action_spam, policy.action_high_spam) == (
        4.0, None, Action.QUARANTINE, "")
    assert (policy.users_may_choose, policy.user_min_threshold, policy.user_max_threshold,
            policy.users_may_skip_quarantine) == (True, 2.0, 12.0, False)
    event = AuditEvent.objects.get(action="spam_policy_update")
    assert event.target == "domain example.org" and event.user == people.dana


def test_users_do_not_reach_the_domains_policies(client, people):
    logged_in(client, people.alice)
    assert client.get("/manage/spam/").status_code == 403
    assert client.post(f"/manage/spam/{people.org.pk}/", {"spam_threshold": "1"}).status_code == 403
    assert not DomainSpamPolicy.objects.exists()


def test_an_administrator_edits_any_domains_policy_and_removes_it(client, people):
    logged_in(client, people.admin)
    assert client.post(f"/manage/spam/{people.net.pk}/", {"high_spam_threshold": "9"}).status_code == 302
    assert DomainSpamPolicy.objects.get(domain=people.net).high_spam_threshold == 9.0
    listing = client.get("/manage/spam/").content.decode()
    assert "<td>9</td>" in listing and "The mail-flow settings (no policy of its own)" in listing  # example.org
    assert client.post(f"/manage/spam/{people.net.pk}/delete").status_code == 302
    assert not DomainSpamPolicy.objects.exists()


def test_the_domain_form_explains_what_is_wrong(client, people):
    logged_in(client, people.dana)
    response = client.post(f"/manage/spam/{people.org.pk}/", {"spam_threshold": "9", "high_spam_threshold": "3",
                                                             "user_min_threshold": "8", "user_max_threshold": "2"})
    assert response.status_code == 400
    page = response.content.decode()
    assert "must be at least the spam threshold" in page
    assert not DomainSpamPolicy.objects.exists()
    response = client.post(f"/manage/spam/{people.org.pk}/", {"user_min_threshold": "8", "user_max_threshold": "2"})
    assert response.status_code == 400 and "must be at least the lowest threshold" in response.content.decode()


# --- A user's own ------------------------------------------------------------------------------------


def allow_users(people: People, **fields) -> DomainSpamPolicy:
    return DomainSpamPolicy.objects.create(domain=people.org, **{"users_may_choose": True, **fields})


def test_a_user_outside_the_domains_limits_gets_a_form_error(client, people):
    allow_users(people, user_min_threshold=3.0, user_max_threshold=12.0)
    logged_in(client, people.alice)
    response = client.post("/account/spam", {"spam_threshold": "20"})
    assert response.status_code == 400
    assert "example.org allows from 3 to 12" in response.content.decode()
    response = client.post("/account/spam", {"spam_threshold": "2.5"})
    assert response.status_code == 400
    assert not UserSpamPolicy.objects.exists()

    assert client.post("/account/spam", {"spam_threshold": "8", "high_spam_threshold": "12"}).status_code == 302
    policy = UserSpamPolicy.objects.get(user=people.alice)
    assert (policy.spam_threshold, policy.high_spam_threshold, policy.skip_quarantine) == (8.0, 12.0, False)
    page = client.get("/account/spam").content.decode()
    assert "user alice@example.org" in page  # what now applies to her mail
    assert AuditEvent.objects.filter(action="spam_filter_change", user=people.alice).exists()


def test_a_user_cannot_opt_out_of_the_quarantine_unless_the_domain_allows_it(client, people):
    domain = allow_users(people)
    logged_in(client, people.alice)
    assert 'name="skip_quarantine"' not in client.get("/account/spam").content.decode()
    assert client.post("/account/spam", {"skip_quarantine": "on"}).status_code == 302
    assert UserSpamPolicy.objects.get(user=people.alice).skip_quarantine is False

    domain.users_may_skip_quarantine = True
    domain.save()
    assert 'name="skip_quarantine"' in client.get("/account/spam").content.decode()
    assert client.post("/account/spam", {"skip_quarantine": "on"}).status_code == 302
    assert UserSpamPolicy.objects.get(user=people.alice).skip_quarantine is True


def test_a_user_whose_domain_lets_them_choose_nothing(client, people):
    logged_in(client, people.bob)  # example.net has no policy: the mail-flow settings decide
    page = client.get("/account/spam").content.decode()
    assert "leaves nothing to choose" in page and 'name="spam_threshold"' not in page
    assert client.post("/account/spam", {"spam_threshold": "50"}).status_code == 403
    assert not UserSpamPolicy.objects.exists()


def test_a_user_edits_their_own_policy_only(client, people):
    allow_users(people)
    carol = make_user("carol", email="carol@example.org")
    UserSpamPolicy.objects.create(user=carol, spam_threshold=4.0)
    logged_in(client, people.alice)
    # Nothing names the login whose policy it is: another user's id in the form changes nothing of theirs.
    assert client.post("/account/spam", {"spam_threshold": "9", "user": str(carol.pk)}).status_code == 302
    assert UserSpamPolicy.objects.get(user=carol).spam_threshold == 4.0
    assert UserSpamPolicy.objects.get(user=people.alice).spam_threshold == 9.0


def test_the_limits_of_each_domain_of_a_users_addresses(client, people):
    allow_users(people, user_max_threshold=20.0)
    DomainSpamPolicy.objects.create(domain=people.net, users_may_choose=True, user_max_threshold=10.0)
    both = make_user("eve", email="eve@example.org", aliases="eve@example.net")
    logged_in(client, both)
    response = client.post("/account/spam", {"spam_threshold": "15"})
    assert response.status_code == 400 and "example.net allows up to 10" in response.content.decode()
    assert client.post("/account/spam", {"spam_threshold": "10"}).status_code == 302
