"""Logging in and out: the form, the throttle after five failures, the audit rows."""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.test import Client
from django.urls import reverse

from gateway.models import AuditEvent
from tests.support.people import PERSONAS_PASSWORD as PASSWORD


@pytest.fixture(autouse=True)
def empty_cache():
    cache.clear()
    yield
    cache.clear()


def attempt(client: Client, username: str, password: str, ip: str = "198.51.100.1"):
    return client.post(reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=ip)


@pytest.mark.django_db
def test_login_and_logout(personas):
    client = Client()
    page = client.get(reverse("login"))
    assert page.status_code == 200 and b'name="password"' in page.content
    response = attempt(client, "alice", PASSWORD)
    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
    assert client.get(reverse("dashboard")).status_code == 200
    assert client.post(reverse("logout")).status_code == 302
    assert client.get(reverse("dashboard")).status_code == 302
    actions = list(AuditEvent.objects.filter(username="alice").values_list("action", flat=True))
    assert sorted(actions) == ["login", "logout"]


@pytest.mark.django_db
def test_five_failures_lock_out_that_username_from_that_ip(personas):
    client = Client()
    for _ in range(5):
        response = attempt(client, "alice", "wrong")
        assert response.status_code == 200
        assert "Please enter a correct username and password" in response.content.decode()
    # Now even the right password is refused, with a clear message.
    response = attempt(client, "alice", PASSWORD)
    assert response.status_code == 200
    assert "Too many failed logins" in response.content.decode()
    assert "_auth_user_id" not in client.session
    assert AuditEvent.objects.filter(action="login_failed", target="alice").count() == 5
    assert AuditEvent.objects.filter(action="login_throttled", target="alice").exists()
    # The same username from another address, and another username from this one, are not locked.
    assert attempt(Client(), "alice", PASSWORD, ip="198.51.100.2").status_code == 302
    assert attempt(Client(), "bob", PASSWORD).status_code == 302


@pytest.mark.django_db
def test_a_success_resets_the_count(personas):
    for _ in range(4):
        attempt(Client(), "bob", "wrong")
    assert attempt(Client(), "bob", PASSWORD).status_code == 302
    for _ in range(4):
        attempt(Client(), "bob", "wrong")
    assert attempt(Client(), "bob", PASSWORD).status_code == 302


@pytest.mark.django_db
def test_the_login_page_redirects_when_logged_in(personas):
    client = Client()
    client.force_login(personas.alice)
    assert client.get(reverse("login")).status_code == 302
