"""The administration pages: who reaches them, what domain administrators may do, forms that explain."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from gateway.models import AuditEvent, Domain, MailFlowSettings, Route, TrustedNetwork, UserProfile
from tests.support.people import People, logged_in, make_people, make_user

pytestmark = pytest.mark.django_db
User = get_user_model()
STRONG = "Unguessable-Pass-4417"

ADMIN_PAGES = ["/manage/domains/", "/manage/domains/new", "/manage/routes/", "/manage/settings/",
               "/manage/networks/"]


@pytest.fixture
def people(db) -> People:
    return make_people()


def audit_actions() -> list[str]:
    return list(AuditEvent.objects.exclude(action="login").order_by("id").values_list("action", flat=True))


def errors_of(response) -> str:
    return response.content.decode()


# --- Who reaches what --------------------------------------------------------------------------------


def test_users_cannot_reach_manage(client, people):
    logged_in(client, people.alice)
    for path in ["/manage/", "/manage/users/", "/manage/users/new", f"/manage/users/{people.bob.pk}/", *ADMIN_PAGES]:
        assert client.get(path).status_code == 403, path


def test_anonymous_visitors_go_to_the_login(client, people):
    response = client.get("/manage/users/")
    assert response.status_code == 302 and "login" in response["Location"]


def test_domain_administrators_reach_users_only(client, people):
    logged_in(client, people.dana)
    assert client.get("/manage/").url == "/manage/users/"
    assert client.get("/manage/users/").status_code == 200
    for path in ADMIN_PAGES:
        assert client.get(path).status_code == 403, path
    assert client.post(f"/manage/domains/{people.org.pk}/delete").status_code == 403
    assert Domain.objects.filter(pk=people.org.pk).exists()


def test_administrators_reach_everything(client, people):
    logged_in(client, people.admin)
    for path in ["/manage/users/", "/manage/users/new", f"/manage/users/{people.alice.pk}/",
                 f"/manage/domains/{people.org.pk}/", f"/manage/routes/{people.route.pk}/", *ADMIN_PAGES]:
        assert client.get(path).status_code == 200, path


# --- Users ---------------------------------------------------------------------------------------------


def test_a_domain_administrator_sees_and_edits_only_their_domains_users(client, people):
    mixed = make_user("mixed", role="user", email="mixed@example.org", aliases="mixed@example.net")
    logged_in(client, people.dana)
    page = client.get("/manage/users/").content.decode()
    assert "alice" in page
    for other in ("bob", "mixed", "admin", "dana"):
        assert f">{other}</a>" not in page, other
    # A user with one address elsewhere is not theirs alone: editing it (its password!) is a 404.
    for user in (people.bob, mixed, people.admin, people.dana):
        assert client.get(f"/manage/users/{user.pk}/").status_code == 404
        assert client.post(f"/manage/users/{user.pk}/", {"username": user.username, "email": "x@example.org",
                                                          "password1": STRONG, "password2": STRONG}).status_code == 404
    assert client.get(f"/manage/users/{people.alice.pk}/").status_code == 200


def test_a_domain_administrator_creates_users_in_their_domains(client, people):
    logged_in(client, people.dana)
    response = client.post("/manage/users/new", {"username": "eve", "email": "eve@example.net",
                                                 "addresses": "eve@evil.example", "password1": STRONG,
                                                 "password2": STRONG, "role": "admin", "is_active": "on"})
    text = errors_of(response)
    assert response.status_code == 400
    assert "eve@example.net is not in one of your domains" in text
    assert "Not in one of your domains: eve@evil.example" in text
    response = client.post("/manage/users/new", {"username": "eve", "email": "eve@example.org",
                                                 "addresses": "e.ve@example.org", "password1": STRONG,
                                                 "password2": STRONG, "role": "admin", "is_active": "on"})
    assert response.status_code == 302
    eve = User.objects.get(username="eve")
    # The role field is not theirs to set: a domain administrator makes users.
    assert (eve.mail_profile.role, eve.is_superuser, eve.is_staff) == ("user", False, False)
    assert eve.mail_profile.all_addresses() == ["eve@example.org", "e.ve@example.org"]
    assert eve.check_password(STRONG)
    event = AuditEvent.objects.get(action="user_create")
    assert (event.username, event.target) == ("dana", "user eve")


def test_an_administrator_creates_a_domain_administrator(client, people):
    logged_in(client, people.admin)
    response = client.post("/manage/users/new", {"username": "nadia", "email": "nadia@example.net",
                                                 "role": "domain_admin", "password1": STRONG, "password2": STRONG,
                                                 "is_active": "on"})
    assert response.status_code == 400 and "A domain administrator needs at least one domain" in errors_of(response)
    client.post("/manage/users/new", {"username": "nadia", "email": "nadia@example.net", "role": "domain_admin",
                                      "domains": [people.net.pk], "password1": STRONG, "password2": STRONG,
                                      "is_active": "on"})
    profile = UserProfile.objects.get(user__username="nadia")
    assert (profile.role, list(profile.domains.all())) == ("domain_admin", [people.net])


def test_an_administrator_role_opens_the_django_admin(client, people):
    logged_in(client, people.admin)
    client.post("/manage/users/new", {"username": "root2", "email": "root2@example.org", "role": "admin",
                                      "password1": STRONG, "password2": STRONG, "is_active": "on"})
    root2 = User.objects.get(username="root2")
    assert root2.is_staff and root2.is_superuser


@pytest.mark.parametrize(("password", "explanation"), [
    ("short1A!", "This password is too short"),
    ("password1234", "This password is too common"),
    ("83749283749283", "This password is entirely numeric"),
    ("alice@example.org", "The password is too similar to the email address"),
])
def test_password_reset_uses_djangos_validators(client, people, password, explanation):
    logged_in(client, people.admin)
    response = client.post(f"/manage/users/{people.alice.pk}/", {
        "username": "alice", "email": "alice@example.org", "role": "user", "addresses": "ali@example.org",
        "password1": password, "password2": password, "is_active": "on"})
    assert response.status_code == 400
    assert explanation in errors_of(response)
    people.alice.refresh_from_db()
    assert not people.alice.check_password(password)


def test_password_reset_and_mismatch(client, people):
    logged_in(client, people.dana)
    form = {"username": "alice", "email": "alice@example.org", "addresses": "ali@example.org", "is_active": "on"}
    response = client.post(f"/manage/users/{people.alice.pk}/", {**form, "password1": STRONG, "password2": "other"})
    assert "The two passwords differ" in errors_of(response)
    assert client.post(f"/manage/users/{people.alice.pk}/", {**form, "password1": STRONG,
                                                               "password2": STRONG}).status_code == 302
    people.alice.refresh_from_db()
    assert people.alice.check_password(STRONG)
    assert audit_actions() == ["user_update", "user_password_reset"]
    # No password in the audit trail, ever.
    assert all(STRONG not in str(e.detail) for e in AuditEvent.objects.all())


def test_user_form_errors_are_explained(client, people):
    logged_in(client, people.admin)
    response = client.post("/manage/users/new", {"username": "ALICE", "email": "not-an-address",
                                                 "addresses": "fine@example.org\nbroken address",
                                                 "role": "user", "password1": "", "password2": ""})
    text = errors_of(response)
    assert response.status_code == 400
    assert "This login name is taken" in text
    assert "Enter a valid email address" in text
    assert "Not an e-mail address: broken address" in text
    assert "This field is required" in text  # the password of a new login


def test_an_administrator_cannot_lock_themselves_out(client, people):
    logged_in(client, people.admin)
    response = client.post(f"/manage/users/{people.admin.pk}/", {"username": "admin", "email": "postmaster@example.org",
                                                                  "role": "user"})
    text = errors_of(response)
    assert "You cannot take away your own administrator role" in text
    assert "You cannot deactivate your own login" in text


def test_a_user_without_an_address_is_refused(client, people):
    logged_in(client, people.admin)
    response = client.post("/manage/users/new", {"username": "ghost", "role": "user", "password1": STRONG,
                                                 "password2": STRONG, "is_active": "on"})
    assert "A user needs at least one address" in errors_of(response)


# --- Domains and routes -------------------------------------------------------------------------------


def test_add_a_domain_with_a_new_route_and_valid_recipients(client, people):
    logged_in(client, people.admin)
    response = client.post("/manage/domains/new", {
        "name": "Shop.Example.", "new_route": "mx.shop.example:2525", "active": "on", "recipient_check": "list",
        "valid_recipients": "sales@shop.example\nSUPPORT@shop.example\n"})
    assert response.status_code == 302
    domain = Domain.objects.get(name="shop.example")
    assert (domain.route.host, domain.route.port) == ("mx.shop.example", 2525)
    assert sorted(domain.valid_recipients.values_list("address", flat=True)) == ["sales@shop.example",
                                                                                 "support@shop.example"]
    event = AuditEvent.objects.get(action="domain_create")
    assert event.target == "domain shop.example" and event.detail["route"] == "mx.shop.example:2525"

    client.post(f"/manage/domains/{domain.pk}/", {"name": "shop.example", "route": domain.route.pk, "active": "on",
                                                  "recipient_check": "list", "valid_recipients": "sales@shop.example"})
    assert list(domain.valid_recipients.values_list("address", flat=True)) == ["sales@shop.example"]
    update = AuditEvent.objects.get(action="domain_update")
    assert update.detail["changes"]["valid_recipients"] == {"added": [], "removed": ["support@shop.example"]}


@pytest.mark.parametrize(("fields", "explanation"), [
    ({"name": "bad_name!.example", "route": "ROUTE"}, "is not a valid domain name"),
    ({"name": "localhost", "route": "ROUTE"}, "is not a fully qualified domain name"),
    ({"name": "example.org", "route": "ROUTE"}, "example.org is already a protected domain"),
    ({"name": "new.example"}, "Every domain needs a route"),
    ({"name": "new.example", "route": "ROUTE", "new_route": "mx.new.example"}, "not both"),
    ({"name": "new.example", "new_route": "mx.new.example:99999"}, "the port is out of range"),
    ({"name": "new.example", "new_route": "bad host!:25"}, "Write HOST:PORT"),
    ({"name": "new.example", "route": "ROUTE", "recipient_check": "list"}, "list at least one address"),
    ({"name": "new.example", "route": "ROUTE", "valid_recipients": "a@other.example"}, "Not at new.example"),
    ({"name": "new.example", "route": "ROUTE", "valid_recipients": "nobody"}, "Not an e-mail address: nobody"),
])
def test_domain_form_errors_are_explained(client, people, fields, explanation):
    logged_in(client, people.admin)
    data = {"recipient_check": "any", "active": "on", **fields}
    if data.get("route") == "ROUTE":
        data["route"] = people.route.pk
    response = client.post("/manage/domains/new", data)
    assert response.status_code == 400
    assert explanation in errors_of(response)
    assert Domain.objects.count() == 2


def test_routes_add_edit_and_protected_delete(client, people):
    logged_in(client, people.admin)
    response = client.post("/manage/routes/", {"address": "exchange.example.org"})
    assert response.status_code == 302
    route = Route.objects.get(host="exchange.example.org")
    assert (route.name, route.port) == ("exchange.example.org:25", 25)
    response = client.post("/manage/routes/", {"address": "exchange.example.org:25"})
    assert response.status_code == 400 and "already goes to exchange.example.org:25" in errors_of(response)
    response = client.post("/manage/routes/", {"address": "mx:notaport"})
    assert response.status_code == 400 and "the port is not a number" in errors_of(response)

    client.post(f"/manage/routes/{route.pk}/", {"name": "Exchange", "address": "[2001:db8::25]:2525"})
    route.refresh_from_db()
    assert (route.name, route.host, route.port) == ("Exchange", "2001:db8::25", 2525)
    assert AuditEvent.objects.get(action="route_update").detail["changes"]["address"] == [
        "exchange.example.org:25", "2001:db8::25:2525"]

    response = client.post(f"/manage/routes/{people.route.pk}/delete", follow=True)
    assert "is used by example.net, example.org" in errors_of(response)
    assert Route.objects.filter(pk=people.route.pk).exists()
    client.post(f"/manage/routes/{route.pk}/delete")
    assert not Route.objects.filter(pk=route.pk).exists()
    assert audit_actions() == ["route_create", "route_update", "route_delete"]


def test_delete_a_domain(client, people):
    logged_in(client, people.admin)
    client.post(f"/manage/domains/{people.net.pk}/delete")
    assert not Domain.objects.filter(name="example.net").exists()
    assert audit_actions() == ["domain_delete"]


# --- Settings and networks ----------------------------------------------------------------------------


def settings_form(**changes) -> dict:
    current = MailFlowSettings.load()
    data = {}
    for field in MailFlowSettings._meta.fields:
        if field.name == "id":
            continue
        value = getattr(current, field.name)
        if isinstance(value, bool):
            if value:
                data[field.name] = "on"
        else:
            data[field.name] = value
    data.update(changes)
    return data


def test_mail_flow_settings(client, people):
    logged_in(client, people.admin)
    response = client.post("/manage/settings/", settings_form(spam_threshold="6.5", action_spam="quarantine"))
    assert response.status_code == 302
    current = MailFlowSettings.load()
    assert (current.spam_threshold, current.action_spam) == (6.5, "quarantine")
    event = AuditEvent.objects.get(action="settings_update")
    assert event.detail["changes"]["spam_threshold"] == ["5.0", "6.5"]
    assert set(event.detail["changes"]) == {"spam_threshold", "action_spam"}


@pytest.mark.parametrize(("changes", "explanation"), [
    ({"spam_threshold": "20", "high_spam_threshold": "10"}, "must be at least the spam threshold"),
    ({"outbound_relay": "relay:notaport"}, "the port is not a number"),
    ({"blocked_attachments": "*.exe\nmy file.doc"}, "without spaces: my file.doc"),
    ({"max_message_size": "-1"}, "greater than or equal to 0"),
    ({"action_virus": "explode"}, "Select a valid choice"),
])
def test_settings_errors_are_explained(client, people, changes, explanation):
    logged_in(client, people.admin)
    response = client.post("/manage/settings/", settings_form(**changes))
    assert response.status_code == 400
    assert explanation in errors_of(response)
    assert not AuditEvent.objects.filter(action="settings_update").exists()


def test_trusted_networks(client, people):
    logged_in(client, people.admin)
    assert client.post("/manage/networks/", {"network": "192.0.2.17/24", "description": "office"}).status_code == 302
    network = TrustedNetwork.objects.get()
    assert network.network == "192.0.2.0/24"
    for value, explanation in [("192.0.2.0/24", "is already trusted"), ("0.0.0.0/0", "open relay"),
                               ("::/0", "open relay"), ("10.0.0.0/300", "is not an IP address or a CIDR network"),
                               ("office", "is not an IP address or a CIDR network")]:
        response = client.post("/manage/networks/", {"network": value})
        assert response.status_code == 400 and explanation in errors_of(response), value
    client.post(f"/manage/networks/{network.pk}/delete")
    assert not TrustedNetwork.objects.exists()
    assert audit_actions() == ["trusted_network_add", "trusted_network_delete"]


def test_manage_posts_without_csrf_are_refused(people):
    client = Client(enforce_csrf_checks=True)
    client.force_login(people.admin)
    assert client.post("/manage/networks/", {"network": "192.0.2.0/24"}).status_code == 403
    assert client.post(f"/manage/domains/{people.net.pk}/delete").status_code == 403
    assert not TrustedNetwork.objects.exists() and Domain.objects.filter(pk=people.net.pk).exists()
