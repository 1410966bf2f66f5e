"""The directories page in a real browser (Debian's Chromium, Playwright) against the real slapd: an administrator
adds the organisation's directory, tests it and lists it; then a person of that directory logs in with the
password the directory knows and finds their addresses on My account. Screenshot: directory.png."""

from __future__ import annotations

import pytest

from gateway.models import Directory, Domain
from tests.support.browser import login_as, screenshot
from tests.support.directory import (
    ADMINS,
    DOMAIN_ADMINS,
    PASSWORDS,
    PEOPLE,
    SERVICE_DN,
    SERVICE_PASSWORD,
    ca_pem,
    ldap_url,
    require_slapd,
)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_an_administrator_sets_up_the_directory_and_its_people_log_in(page, live_server, personas):
    require_slapd()
    Domain.objects.create(name="example.edu", route=personas.example_com.route)
    login_as(page, live_server, personas.admin)
    page.goto(f"{live_server.url}/manage/directories/")
    page.click("text=Add a directory")
    page.fill("#id_name", "Campus directory")
    page.fill("#id_uri", ldap_url())
    page.fill("#id_ca_certificate", ca_pem())
    page.fill("#id_bind_dn", SERVICE_DN)
    page.fill("#id_bind_password", SERVICE_PASSWORD)
    page.fill("#id_user_base", PEOPLE)
    page.fill("#id_admin_group", ADMINS)
    page.fill("#id_domain_admin_group", DOMAIN_ADMINS)
    page.click("form.m-form:not([action]) button[type=submit]")
    assert "Directory Campus directory added." in page.inner_text("main")
    directory = Directory.objects.get()
    assert directory.domain is None and directory.bind_password == SERVICE_PASSWORD
    page.fill("#id_login", "bob")
    page.fill("#id_address", "robert.jones@example.edu")
    page.click("#test button[type=submit]")
    results = page.inner_text(".check-results")
    assert "(StartTLS, the certificate verified)" in results
    assert "role: Domain administrator of example.edu" in results
    assert "<robert.jones@example.edu>: found" in results and "failed" not in results
    page.click("text=List it now")
    assert "3 entries, 7 addresses (7 new, 0 gone)" in page.inner_text("main")
    page.fill("#test #id_login", "alice")
    page.fill("#test #id_address", "info@example.edu")
    page.click("#test button[type=submit]")
    screenshot(page, "directory.png")
    page.problems.check()

    # carol logs in with her directory password ("alice" and "bob" are local accounts here: their own
    # passwords only, never the directory's).
    page.context.clear_cookies()
    page.goto(f"{live_server.url}/login/")
    page.fill("#id_username", "carol")
    page.fill("#id_password", PASSWORDS["carol"])
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")
    page.goto(f"{live_server.url}/account/")
    text = page.inner_text("main")
    assert "info@example.edu" in text and "password of your organisation's directory" in text
    page.problems.check()
