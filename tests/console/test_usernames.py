"""Login names are plain: ASCII letters, digits and . _ - +, no '@' (a login name is not an address) and no
look-alike letters of other scripts, unique whatever their case; on the /manage/ pages and in the Django admin.
And the settings page offers every verdict's action, the unscannable one too."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from gateway.models import MailFlowSettings
from tests.support.people import People, logged_in, make_people, make_user

pytestmark = pytest.mark.django_db
User = get_user_model()
STRONG = "Unguessable-Pass-4417"

REFUSED = {
    "bob@b.test": "cannot contain @",
    "\u0430lice": "look-alike",  # a Cyrillic а
    "\uff41\uff4c\uff49\uff43\uff45": "look-alike",  # full-width alice
    "alice\u200b": "U+200B",  # a zero-width space
    "al ice": "U+0020",
    "j\u00f6rg": "look-alike",
}


@pytest.fixture
def people(db) -> People:
    return make_people()


def new_user(client, username: str, email: str = "carol@example.org"):
    return client.post("/manage/users/new", {"username": username, "email": email, "password1": STRONG,
                                             "password2": STRONG, "is_active": "on"})


@pytest.mark.parametrize("username", list(REFUSED))
def test_a_domain_administrator_cannot_make_a_name_that_passes_for_another(client, people, username):
    logged_in(client, people.dana)
    response = new_user(client, username)
    assert response.status_code == 400
    assert REFUSED[username] in response.content.decode()
    assert not User.objects.filter(email="carol@example.org").exists()


@pytest.mark.parametrize("username", ["carol", "carol.smith", "c_smith-2", "carol+test", "C.Smith"])
def test_plain_names_are_taken(client, people, username):
    logged_in(client, people.dana)
    assert new_user(client, username).status_code == 302
    assert User.objects.filter(username=username).exists()


def test_names_are_unique_whatever_their_case(client, people):
    logged_in(client, people.admin)
    response = new_user(client, "ALICE", email="other@example.org")
    assert response.status_code == 400 and "This login name is taken" in response.content.decode()


def test_a_name_made_before_the_rule_stays_until_it_is_changed(client, people):
    legacy = make_user("old@name.example", role="user", email="old@example.org")
    logged_in(client, people.admin)
    form = {"username": "old@name.example", "email": "old@example.org", "role": "user", "is_active": "on",
            "first_name": "Old"}
    assert client.post(f"/manage/users/{legacy.pk}/", form).status_code == 302
    legacy.refresh_from_db()
    assert legacy.first_name == "Old"
    response = client.post(f"/manage/users/{legacy.pk}/", {**form, "username": "new@name.example"})
    assert response.status_code == 400 and "cannot contain @" in response.content.decode()


# --- The Django admin ---------------------------------------------------------------------------------


@pytest.fixture
def root(client, people):
    client.force_login(make_user("root", role="admin", email="root@example.org", superuser=True))
    return client


PROFILE_INLINE = {"mail_profile-TOTAL_FORMS": "0", "mail_profile-INITIAL_FORMS": "0"}


def admin_add(client, username: str):
    return client.post("/admin/auth/user/add/", {"username": username, "usable_password": "true",
                                                 "password1": STRONG, "password2": STRONG, **PROFILE_INLINE})


@pytest.mark.parametrize("username", ["bob@b.test", "\u0430lice", "ALICE"])
def test_the_admin_refuses_them_too(root, username):
    response = admin_add(root, username)
    assert response.status_code == 200  # the form again, with its error
    assert response.context["adminform"].form.errors.get("username")
    assert not User.objects.filter(username=username).exists()


def test_the_admin_takes_a_plain_name_and_refuses_renaming_to_an_address(root):
    response = admin_add(root, "carol")
    assert response.status_code == 302
    carol = User.objects.get(username="carol")
    change = root.get(f"/admin/auth/user/{carol.pk}/change/")
    form = change.context["adminform"].form
    data = {name: value for name, value in form.initial.items() if value is not None and name != "password"}
    data.update({"username": "carol@example.org", "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00",
                 **PROFILE_INLINE})
    data.pop("date_joined", None)
    data.pop("last_login", None)
    for key in ("groups", "user_permissions"):
        data.pop(key, None)
    response = root.post(f"/admin/auth/user/{carol.pk}/change/", data)
    assert response.status_code == 200
    assert "cannot contain @" in str(response.context["adminform"].form.errors.get("username"))
    carol.refresh_from_db()
    assert carol.username == "carol"


# --- The settings page shows every action -------------------------------------------------------------


def test_the_settings_page_offers_the_action_for_unscannable_mail(client, people):
    logged_in(client, people.admin)
    page = client.get("/manage/settings/").content.decode()
    assert 'name="action_unscannable"' in page
    data = {}
    for field in MailFlowSettings._meta.fields:
        value = getattr(MailFlowSettings.load(), field.name)
        if field.name != "id" and not (isinstance(value, bool) and not value):
            data[field.name] = "on" if value is True else value
    data["action_unscannable"] = "delete"
    assert client.post("/manage/settings/", data).status_code == 302
    assert MailFlowSettings.load().action_unscannable == "delete"
