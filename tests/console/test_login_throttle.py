"""One login throttle for every door: the site login, the Django admin's login, SMTP AUTH and API tokens count
failures together, per username and IP, per username from anywhere and per IP across usernames; a throttled
attempt is refused with the right password too."""

from __future__ import annotations

import smtplib
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from gateway.models import AuditEvent, SMTPPolicy
from reports.models import ApiToken
from tests.support.people import PERSONAS_PASSWORD as PASSWORD
from tests.support.people import make_user
from tests.support.servers import insecure_tls

THROTTLED = "Too many failed logins"


def site_login(username: str, password: str, ip: str = "198.51.100.1", client: Client | None = None):
    client = client or Client()
    response = client.post(reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=ip)
    return response, client


def admin_login(username: str, password: str, ip: str = "198.51.100.1"):
    client = Client()
    response = client.post("/admin/login/", {"username": username, "password": password, "next": "/admin/"},
                           REMOTE_ADDR=ip)
    return response, client


def logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


# --- The admin's login is the same door as the site's -------------------------------------------------


@pytest.fixture
def root(personas):
    """An administrator who may use the Django admin (staff)."""
    return make_user("root", role="admin", email="root@example.com", superuser=True, password=PASSWORD)


@pytest.mark.django_db
def test_the_admin_login_shares_the_site_logins_throttle(root):
    for _ in range(5):
        response, _ = site_login("root", "wrong")
        assert THROTTLED not in response.content.decode()
    # From the same address, /admin/login/ refuses the right password as /login/ does, and says why.
    for _ in range(8):
        admin_login("root", "still wrong")
    response, client = admin_login("root", PASSWORD)
    assert response.status_code == 200 and not logged_in(client)
    assert THROTTLED in response.content.decode()
    assert client.get("/manage/").status_code == 302
    response, client = site_login("root", PASSWORD)
    assert THROTTLED in response.content.decode() and not logged_in(client)


@pytest.mark.django_db
def test_failures_at_the_admin_login_lock_the_site_login(root):
    for _ in range(5):
        response, _ = admin_login("root", "wrong")
        assert response.status_code == 200
    response, client = site_login("root", PASSWORD)
    assert THROTTLED in response.content.decode() and not logged_in(client)
    # Another address is another pair: the administrator still gets in from there, and the session opens
    # the console.
    response, client = admin_login("root", PASSWORD, ip="198.51.100.77")
    assert response.status_code == 302 and logged_in(client)
    assert client.get("/manage/users/").status_code == 200


# --- Spraying and distributed guessing ------------------------------------------------------------------


@pytest.fixture
def quick_hashes(settings, personas):
    """Dozens of logins per test: a fast hasher for them (the throttle counts attempts, not hashing time)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher",
                                 "django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    for user in (personas.alice, personas.bob):
        user.set_password(PASSWORD)
        user.save()
    return personas


@pytest.mark.django_db
def test_one_password_sprayed_over_many_usernames_from_one_address(quick_hashes, settings):
    assert settings.LOGIN_THROTTLE_IP_FAILURES == 30
    for number in range(30):
        site_login(f"user{number}", "Summer2026!", ip="203.0.113.50")
    response, client = site_login("bob", PASSWORD, ip="203.0.113.50")
    assert THROTTLED in response.content.decode() and not logged_in(client)
    # The address is what is locked, not Bob.
    response, client = site_login("bob", PASSWORD, ip="203.0.113.51")
    assert response.status_code == 302 and logged_in(client)


@pytest.mark.django_db
def test_one_username_guessed_from_many_addresses(quick_hashes, settings):
    assert settings.LOGIN_THROTTLE_USERNAME_FAILURES == 20
    for number in range(20):
        response, _ = site_login("alice", "wrong", ip=f"192.0.2.{number + 1}")
        assert THROTTLED not in response.content.decode()
    response, client = site_login("alice", PASSWORD, ip="192.0.2.200")
    assert THROTTLED in response.content.decode() and not logged_in(client)
    # Case and look-alike forms of the name are the same name to the throttle.
    response, client = site_login("ALICE", PASSWORD, ip="192.0.2.201")
    assert THROTTLED in response.content.decode()


@pytest.mark.django_db
def test_ipv6_clients_are_counted_by_their_64(personas):
    for host in range(5):
        site_login("alice", "wrong", ip=f"2001:db8:1:2::{host + 1:x}")
    response, client = site_login("alice", PASSWORD, ip="2001:db8:1:2:ffff::1")
    assert THROTTLED in response.content.decode() and not logged_in(client)


@pytest.mark.django_db
def test_a_success_clears_only_its_own_username_and_address(personas, settings):
    settings.LOGIN_THROTTLE_USERNAME_FAILURES = 6
    for _ in range(4):
        site_login("bob", "wrong")
    response, _ = site_login("bob", PASSWORD)
    assert response.status_code == 302
    # The pair starts again; the username's count does not: an attacker's own good login clears nothing.
    for _ in range(2):
        site_login("bob", "wrong")
    response, client = site_login("bob", PASSWORD, ip="198.51.100.99")
    assert THROTTLED in response.content.decode() and not logged_in(client)


@pytest.mark.django_db
def test_throttled_attempts_are_audited_and_not_counted_as_failures(personas):
    for _ in range(5):
        site_login("alice", "wrong")
    for _ in range(3):
        site_login("alice", PASSWORD)
    assert AuditEvent.objects.filter(action="login_failed", target="alice").count() == 5
    assert AuditEvent.objects.filter(action="login_throttled", target="alice").count() == 3


@pytest.mark.django_db
def test_behind_a_trusted_proxy_the_client_it_names_is_counted(personas, settings):
    settings.TRUSTED_PROXIES = ["10.0.0.0/8"]
    client = Client()

    def via_proxy(password: str, forwarded: str):
        return client.post(reverse("login"), {"username": "alice", "password": password},
                           REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR=forwarded)

    for number in range(5):
        # What the client wrote before the proxy's own entry is ignored: it cannot dodge its count.
        via_proxy("wrong", f"192.0.2.{number}, 203.0.113.7")
    assert THROTTLED in via_proxy(PASSWORD, "203.0.113.7").content.decode()
    assert AuditEvent.objects.filter(action="login_failed", ip="203.0.113.7").count() == 5
    # Another client behind the same proxy is not locked out.
    assert via_proxy(PASSWORD, "203.0.113.8").status_code == 302
    # From an address that is not a trusted proxy, X-Forwarded-For is the client's own writing.
    response = Client().post(reverse("login"), {"username": "alice", "password": PASSWORD},
                             REMOTE_ADDR="198.51.100.3", HTTP_X_FORWARDED_FOR="203.0.113.7")
    assert response.status_code == 302


@pytest.mark.django_db
def test_an_administrator_clears_a_lock_out_from_the_command_line(personas):
    for _ in range(5):
        site_login("alice", "wrong", ip="198.51.100.5")
    out = StringIO()
    call_command("loginthrottle", "show", user="alice", ip="198.51.100.5", stdout=out)
    assert "this username from this address: 5 of 5 failures, LOCKED" in out.getvalue()
    call_command("loginthrottle", "clear", user="alice", ip="198.51.100.5", stdout=StringIO())
    response, client = site_login("alice", PASSWORD, ip="198.51.100.5")
    assert response.status_code == 302 and logged_in(client)


# --- API tokens --------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_wrong_api_tokens_count_against_the_address(personas, settings):
    settings.LOGIN_THROTTLE_IP_FAILURES = 3
    _, key = ApiToken.create_for(personas.admin)
    client = Client()
    for _ in range(3):
        assert client.get("/api/messages", HTTP_AUTHORIZATION="Token guessed",
                          REMOTE_ADDR="203.0.113.9").status_code == 401
    response = client.get("/api/messages", HTTP_AUTHORIZATION=f"Token {key}", REMOTE_ADDR="203.0.113.9")
    assert response.status_code == 429 and "too many failed" in response.json()["error"]
    assert client.get("/api/messages", HTTP_AUTHORIZATION=f"Token {key}",
                      REMOTE_ADDR="203.0.113.10").status_code == 200
    # The address is locked for the site login too: one throttle.
    response, _ = site_login("admin", PASSWORD, ip="203.0.113.9")
    assert THROTTLED in response.content.decode()


# --- SMTP AUTH ----------------------------------------------------------------------------------------------

SMTP_PASSWORD = "correct horse battery staple"


@pytest.fixture
def smtp_alice(transactional_db):
    policy = SMTPPolicy.load()
    policy.auth_max_failures = 0  # the SMTP server's own per-address limit off: only the shared throttle counts
    policy.save()
    return get_user_model().objects.create_user("alice", "alice@example.org", SMTP_PASSWORD)


def smtp_login(server, login: str, password: str) -> int:
    """The reply code of one AUTH PLAIN on the implicit-TLS port."""
    with server.smtps() as client:
        client.ehlo()
        client.user, client.password = login, password
        try:
            return client.auth("PLAIN", client.auth_plain)[0]
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code


def test_failed_site_logins_lock_smtp_auth(gateway_smtp_tls, smtp_alice):
    for _ in range(5):
        site_login("alice", "wrong", ip="127.0.0.1")
    assert smtp_login(gateway_smtp_tls, "alice", SMTP_PASSWORD) == 421
    assert smtp_login(gateway_smtp_tls, "alice@example.org", SMTP_PASSWORD) == 421


def test_failed_smtp_auth_locks_the_site_login(gateway_smtp_tls, smtp_alice):
    codes = [smtp_login(gateway_smtp_tls, login, "wrong") for login in ("alice", "alice@example.org") * 2]
    assert codes == [535] * 4
    # The fifth failure reaches the limit (counted once per attempt, under the username it names).
    assert smtp_login(gateway_smtp_tls, "alice", "wrong") == 421
    assert smtp_login(gateway_smtp_tls, "alice", SMTP_PASSWORD) == 421
    response, client = site_login("alice", SMTP_PASSWORD, ip="127.0.0.1")
    assert THROTTLED in response.content.decode() and not logged_in(client)
    assert AuditEvent.objects.filter(action="login_failed", target="alice", ip="127.0.0.1").count() == 5


def test_smtp_auth_works_with_the_right_password(gateway_smtp_tls, smtp_alice):
    assert smtp_login(gateway_smtp_tls, "alice", "wrong") == 535
    assert smtp_login(gateway_smtp_tls, "alice", SMTP_PASSWORD) == 235
    with gateway_smtp_tls.submission() as client:
        client.starttls(context=insecure_tls())
        client.ehlo()
        assert client.login("alice@example.org", SMTP_PASSWORD)[0] == 235
