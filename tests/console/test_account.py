"""My account: the password with Django's validators, the report frequency, the addresses (read-only unless
ACCOUNT_EDIT_ADDRESSES), one's own lists and API tokens (the key shown once, only its hash kept); another
login's entry or token is a 404."""

from __future__ import annotations

import pytest

from digests.models import Subscription
from gateway.models import AuditEvent, SenderListEntry, UserProfile
from reports.models import ApiToken, hash_token
from tests.support.people import PERSONAS_PASSWORD, logged_in


@pytest.fixture
def alice(client, personas):
    return logged_in(client, personas.alice)


def test_the_page_shows_ones_own(alice, personas):
    page = alice.get("/account/").content.decode()
    assert "alice@example.com" in page and "sales@example.com" in page
    assert "set by an administrator" in page and 'name="aliases"' not in page


def test_password_change_uses_the_validators(alice, personas):
    weak = alice.post("/account/password", {"old_password": PERSONAS_PASSWORD, "new_password1": "12345678",
                                            "new_password2": "12345678"})
    assert weak.status_code == 400 and "too short" in weak.content.decode()
    good = alice.post("/account/password", {"old_password": PERSONAS_PASSWORD,
                                            "new_password1": "a-much-better-one-2027",
                                            "new_password2": "a-much-better-one-2027"})
    assert good.status_code == 302
    personas.alice.refresh_from_db()
    assert personas.alice.check_password("a-much-better-one-2027")
    assert alice.get("/account/").status_code == 200  # still logged in
    assert AuditEvent.objects.filter(action="password_change", user=personas.alice).exists()


def test_report_frequency(alice, client, personas):
    assert alice.post("/account/digests", {"own": "weekly"}).status_code == 302
    assert Subscription.objects.get(user=personas.alice, kind="user").frequency == "weekly"
    client.force_login(personas.domain_admin)
    page = client.get("/account/").content.decode()
    assert "all quarantined mail of my domains" in page
    client.post("/account/digests", {"own": "", "domains": "daily"})
    assert Subscription.objects.get(user=personas.domain_admin, kind="domain").frequency == "daily"


def test_addresses_when_allowed(alice, personas, settings):
    assert alice.post("/account/addresses", {"aliases": "x@example.com"}).status_code == 403
    settings.ACCOUNT_EDIT_ADDRESSES = True
    assert 'name="aliases"' in alice.get("/account/").content.decode()
    taken = alice.post("/account/addresses", {"aliases": "bob@example.com"})
    assert taken.status_code == 400 and "another login" in taken.content.decode()
    foreign = alice.post("/account/addresses", {"aliases": "me@elsewhere.example"})
    assert foreign.status_code == 400 and "not in one of our domains" in foreign.content.decode()
    assert alice.post("/account/addresses", {"aliases": "Sales@example.com\nshop@example.com"}).status_code == 302
    assert UserProfile.objects.get(user=personas.alice).addresses == "sales@example.com\nshop@example.com"


def test_own_lists(alice, client, personas):
    assert alice.post("/account/lists/add", {"kind": "allow", "sender": "Friend@Sender.test"}).status_code == 302
    entry = SenderListEntry.objects.get(user=personas.alice)
    assert (entry.kind, entry.scope, entry.sender) == ("allow", "user", "friend@sender.test")
    assert alice.post("/account/lists/add", {"kind": "block", "sender": "not a pattern"}).status_code == 400
    client.force_login(personas.bob)
    assert client.post(f"/account/lists/{entry.pk}/delete").status_code == 404
    client.force_login(personas.alice)
    assert client.post(f"/account/lists/{entry.pk}/delete").status_code == 302
    assert not SenderListEntry.objects.exists()


def test_api_tokens_shown_once(alice, client, personas):
    page = alice.post("/account/tokens/new", {"name": "monitoring"}).content.decode()
    token = ApiToken.objects.get(user=personas.alice)
    key = page.split('id="token-key">')[1].split("<")[0]
    assert token.key_hash == hash_token(key) and key not in alice.get("/account/").content.decode()
    assert ApiToken.authenticate(key) == personas.alice
    client.force_login(personas.bob)
    assert client.post(f"/account/tokens/{token.pk}/revoke").status_code == 404
    client.force_login(personas.alice)
    client.post(f"/account/tokens/{token.pk}/revoke")
    assert ApiToken.authenticate(key) is None
