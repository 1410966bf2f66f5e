"""Two-factor login in a real browser (Debian's Chromium, Playwright): an administrator who must have it
(TWO_FACTOR_REQUIRED_FOR_ADMINS) is sent to set it up after the password, reads the secret off the page as an
authenticator app would, confirms it with a code, logs out, logs in with the password and a code, then with a
recovery code. Screenshots: two-factor.png (the set-up page), login-code.png (the second step)."""

from __future__ import annotations

import pytest
from django_otp.plugins.otp_totp.models import TOTPDevice

from console import twofactor
from gateway.models import AuditEvent
from tests.support.browser import screenshot
from tests.support.people import PERSONAS_PASSWORD
from tests.support.twofactor import code_at, fresh_code, key_of, now_step

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def password_step(page, live_server, username: str) -> None:
    page.goto(f"{live_server.url}/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PERSONAS_PASSWORD)
    with page.expect_navigation():
        page.click("button[type=submit]")


def log_out(page) -> None:
    with page.expect_navigation():
        page.click(".nav-logout button")
    assert "/login/" in page.url


def test_an_administrator_enrols_and_logs_in_with_a_code_and_with_a_recovery_code(page, live_server, personas,
                                                                                  settings):
    settings.TWO_FACTOR_REQUIRED_FOR_ADMINS = True
    admin = personas.admin
    # The password alone leads to the set-up page, and nowhere else.
    password_step(page, live_server, admin.username)
    assert page.url.endswith("/account/two-factor/")
    assert "Administrators log in with two factors" in page.inner_text("#required")
    page.goto(f"{live_server.url}/manage/users/")
    assert page.url.endswith("/account/two-factor/")
    with page.expect_navigation():
        page.click("#start-setup")
    assert page.locator("#qr svg").count() == 1
    secret = page.inner_text("#secret")
    screenshot(page, "two-factor.png")
    # What a phone would show, from the secret on the page.
    key = key_of(secret)
    page.fill("#id_code", code_at(key, now_step()))
    with page.expect_navigation():
        page.click("#confirm")
    assert "Two-factor login is on" in page.inner_text("main")
    codes = [item.strip() for item in page.locator("#new-codes li").all_inner_texts()]
    assert len(codes) == 10
    page.goto(f"{live_server.url}/manage/users/")
    assert page.url.endswith("/manage/users/")
    log_out(page)

    # Password, then the code.
    device = TOTPDevice.objects.get(user=admin, confirmed=True)
    assert device.bin_key == key
    password_step(page, live_server, admin.username)
    assert page.url.endswith("/login/code")
    screenshot(page, "login-code.png")
    page.goto(f"{live_server.url}/manage/users/")
    assert "/login/" in page.url and "/login/code" not in page.url, "no page opens on the password alone"
    password_step(page, live_server, admin.username)
    page.fill("#id_code", "000000" if fresh_code(device) != "000000" else "111111")
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert "not right" in page.inner_text("main")
    page.fill("#id_code", fresh_code(device))
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.url == f"{live_server.url}/"
    page.goto(f"{live_server.url}/manage/users/")
    assert page.url.endswith("/manage/users/")
    log_out(page)

    # Password, then a recovery code: it works once.
    password_step(page, live_server, admin.username)
    page.fill("#id_code", codes[0])
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.url == f"{live_server.url}/"
    assert "9 of them left" in page.inner_text("body")
    page.goto(f"{live_server.url}/account/two-factor/")
    assert "9 recovery codes left" in page.inner_text("#codes-left")
    log_out(page)
    password_step(page, live_server, admin.username)
    page.fill("#id_code", codes[0])
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert "/login/code" in page.url and "not right" in page.inner_text("main")
    assert twofactor.recovery_codes_left(admin) == 9
    done = set(AuditEvent.objects.filter(username=admin.username).values_list("action", flat=True))
    assert {"two_factor_enrol", "two_factor_failed", "two_factor_recovery_used", "login", "logout"} <= done
    page.problems.check()
