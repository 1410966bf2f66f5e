"""/account/, "Where is my mail?" and a digest in a real browser (Debian's Chromium, Playwright), for a user and
a domain administrator; another user's mail is a 404. Screenshots: account.png, where.png, digest.png,
digest-confirm.png."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command

from tests.support.browser import login_as, screenshot
from tests.support.digests import link, parts
from tests.support.people import make_message, quarantined

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_account_and_where_for_a_user(page, live_server, personas):
    bobs = make_message("friend@sender.test", ("bob@example.com",), subject="For Bob only")
    make_message("boss@forged.test", ("alice@example.com",), state="refused", refusal_reason="spf",
                 client_ip="203.0.113.9", subject="Quarterly figures",
                 smtp_reply="550 5.7.23 SPF: 203.0.113.9 is not allowed to send mail from forged.test")
    make_message("friend@sender.test", ("alice@example.com",), subject="Lunch on Friday")
    quarantined("alice@example.com", subject="Cheap pills")
    login_as(page, live_server, personas.alice)
    page.click("a.nav-user")
    assert "/account/" in page.url and page.locator("#addresses").inner_text().count("@example.com") >= 2
    page.select_option("#id_own", "weekly")
    page.click("#digests button[type=submit]")
    assert "settings are saved" in page.inner_text("main")
    page.fill("#id_sender", "friend@sender.test")
    page.click("#lists button[type=submit]")
    assert "friend@sender.test" in page.inner_text("#lists table")
    page.fill("#token-name", "monitoring")
    page.click("#tokens button[type=submit]")
    assert len(page.inner_text("#token-key")) >= 43
    screenshot(page, "account.png")
    page.goto(f"{live_server.url}/where/?recipient=alice")
    text = page.inner_text("#results")
    assert "Refused at SMTP time" in text and "Delivered" in text and "Held in the quarantine" in text
    assert "For Bob only" not in text
    page.click("summary")
    screenshot(page, "where.png")
    page.problems.errors.clear()
    response = page.goto(f"{live_server.url}/where/{bobs.queue_id}/")
    assert response.status == 404
    page.problems.errors.clear()
    page.problems.check()


def test_where_for_a_domain_administrator(page, live_server, personas):
    make_message("friend@sender.test", ("bob@example.com",), subject="For Bob")
    other = make_message("x@sender.test", ("carol@example.org",), subject="Other domain")
    login_as(page, live_server, personas.domain_admin)
    page.goto(f"{live_server.url}/where/?sender=sender.test")
    text = page.inner_text("#results")
    assert "For Bob" in text and "Other domain" not in text
    page.problems.errors.clear()
    assert page.goto(f"{live_server.url}/where/{other.queue_id}/").status == 404
    page.goto(f"{live_server.url}/account/")
    assert page.locator("#id_domains").count() == 1


def test_a_digest_and_its_confirmation_page(page, live_server, personas, capture_server, settings):
    personas.example_com.route.port = capture_server.port
    personas.example_com.route.save()
    settings.CELERY_TASK_ALWAYS_EAGER = True
    settings.SPAMD_URL = settings.CLAMD_URL = ""
    settings.SITE_URL = live_server.url
    settings.DIGEST_SENDER = "quarantine@example.com"
    held = quarantined("alice@example.com", subject="Invoice <overdue> & final notice", sender="billing@pay.test")
    quarantined("alice@example.com", subject="Cheap pills", sender="spammer@spam.example")
    call_command("digests", "send", stdout=io.StringIO())
    (digest,) = capture_server.wait_for(1)
    page.set_content(parts(digest.data)["text/html"])
    assert "Invoice <overdue> & final notice" in page.inner_text("body")
    screenshot(page, "digest.png")
    page.goto(live_server.url + link(digest.data, "release", held.queue_id))
    assert "Release this message?" in page.inner_text("main")
    screenshot(page, "digest-confirm.png")
    page.click("main button[type=submit]")
    assert "Released to alice@example.com" in page.inner_text("main")
    assert len(capture_server.wait_for(2)) == 2
