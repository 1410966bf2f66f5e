"""The UI in a real browser (Debian's Chromium through Playwright): charts draw, hostile mail stays text,
scoping holds, and the screenshots in docs/screenshots/ are taken on the way."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command

from gateway.models import Message
from reports.rollup import refresh
from tests.support.browser import canvas_is_drawn, login_as, screenshot
from tests.support.people import make_message

pytestmark = [pytest.mark.browser]
# Waits are selectors, not wait_for_function: Playwright polls a function with eval(), which the pages' CSP
# (no 'unsafe-eval') refuses, as it should.
CHARTS_READY = "html[data-charts-ready='1']"

SPAM_RAW = (b"Received: from mail.bulk-offers.top (mail.bulk-offers.top [203.0.113.45])\r\n"
            b"\tby gw1.example.com with ESMTP id 7F3A2B; Tue, 1 Dec 2026 09:12:03 +0000\r\n"
            b"Received: from [10.0.0.7] (unknown [198.51.100.23])\r\n"
            b"\tby mail.bulk-offers.top with ESMTPSA; Tue, 1 Dec 2026 09:12:01 +0000\r\n"
            b"Authentication-Results: gw1.example.com; spf=softfail smtp.mailfrom=bulk-offers.top; dkim=none; "
            b"dmarc=fail header.from=bulk-offers.top\r\n"
            b"From: \"Winner Notification\" <prize@bulk-offers.top>\r\nTo: alice@example.com\r\n"
            b"Subject: You have WON $5,000,000!\r\nMessage-ID: <win-123@bulk-offers.top>\r\n"
            b"Date: Tue, 1 Dec 2026 09:12:00 +0000\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/html; charset=utf-8\r\n\r\n"
            b"<html><body><h2 style=\"color:#b91c1c\">Congratulations!</h2><p>You have been selected to receive "
            b"<b>$5,000,000</b>. Reply with your bank details to claim your prize.</p>"
            b"<img src=\"http://tracker.bulk-offers.top/open.gif\"><p><a href=\"http://bulk-offers.top/claim\">"
            b"Claim now</a></p><script>alert('x')</script></body></html>\r\n")
SPAM_RULES = [
    {"name": "ADVANCE_FEE_4_NEW", "score": 3.0, "description": "Appears to be advance fee fraud (Nigerian 419)"},
    {"name": "BAYES_99", "score": 3.5, "description": "Bayes spam probability is 99 to 100%"},
    {"name": "LOTS_OF_MONEY", "score": 0.001, "description": "Huge... sums of money"},
    {"name": "MIME_HTML_ONLY", "score": 0.1, "description": "Message only has text/html MIME parts"},
    {"name": "RCVD_IN_SBL", "score": 2.6, "description": "Received via a relay in Spamhaus SBL"},
    {"name": "URIBL_BLACK", "score": 1.7, "description": "Contains an URL listed in the URIBL blacklist"},
    {"name": "SPF_SOFTFAIL", "score": 0.665, "description": "SPF: sender does not match SPF record (softfail)"},
    {"name": "DMARC_FAIL", "score": 6.0, "description": "DMARC check failed"},
]
XSS_RAW = (b"From: \"<script>alert('from')</script>\" <evil@attacker.test>\r\nTo: alice@example.com\r\n"
           b"Subject: <script>alert('subject')</script><img src=x onerror=alert('img')>\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<p>Body</p><script>alert('body')</script><img src=x onerror=\"alert('onerror')\">"
           b"<a href=\"javascript:alert('link')\">link</a><svg onload=alert('svg')></svg>\r\n")
XSS_SUBJECT = "<script>alert('subject')</script><img src=x onerror=alert('img')>"


@pytest.fixture
def realistic_mail(personas, transactional_db):
    """A month of generated traffic, plus hand-made messages for the detail pages."""
    call_command("generate_messages", count=4000, days=30, seed=2026, batch=2000, stdout=StringIO())
    spam = make_message("prize@bulk-offers.top", ["alice@example.com"], raw=SPAM_RAW, ago=timedelta(seconds=30),
                        subject="You have WON $5,000,000!", header_from='"Winner Notification" <prize@bulk-offers.top>',
                        state=Message.State.QUARANTINED, verdict="high_spam", action="quarantine", quarantined=True,
                        spam_score=17.6, spam_threshold=5.0, spam_rules=SPAM_RULES, client_ip="203.0.113.45",
                        client_name="mail.bulk-offers.top", helo="mail.bulk-offers.top",
                        checks={"spf": {"result": "softfail", "domain": "bulk-offers.top"},
                                "dmarc": {"result": "fail", "policy": "reject"}},
                        attachments=[{"name": "claim-form.pdf.exe", "type": "application/x-dosexec", "size": 48213,
                                      "sha256": "9f2c" * 16, "blocked": True, "reason": "*.exe"}])
    xss = make_message("evil@attacker.test", ["alice@example.com"], raw=XSS_RAW, subject=XSS_SUBJECT,
                       header_from="\"<script>alert('from')</script>\" <evil@attacker.test>",
                       state=Message.State.QUARANTINED, verdict="spam", quarantined=True, spam_score=9.9,
                       spam_rules=[{"name": "<script>alert('rule')</script>", "score": 9.9,
                                    "description": "<img src=x onerror=alert('desc')>"}])
    bobs = make_message("friend@sender.test", ["bob@example.com"], subject="Private to Bob")
    refresh()
    return {"spam": spam, "xss": xss, "bob": bobs}


def test_admin_dashboard_charts_draw(page, live_server, personas, realistic_mail):
    login_as(page, live_server, personas.admin)
    page.goto(f"{live_server.url}/")
    page.wait_for_selector(CHARTS_READY, state="attached")
    page.wait_for_timeout(600)  # the charts' short animation
    for canvas in ("#chart-hourly", "#chart-daily", "#chart-scores"):
        assert canvas_is_drawn(page, canvas), f"{canvas} is blank"
    assert page.locator("#latest-body tr").count() == 10
    assert int(page.locator(".tile-value").first.inner_text().replace(",", "")) > 0
    screenshot(page, "dashboard.png")
    page.problems.check()


def test_dashboard_refreshes_latest_messages(page, live_server, personas, realistic_mail):
    login_as(page, live_server, personas.admin)
    page.goto(f"{live_server.url}/")
    make_message("late@sender.test", ["alice@example.com"], subject="Arrived just now", ago=timedelta(0))
    # The page polls every 15 s, and at once when it becomes visible again.
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    page.locator("#latest-body").get_by_text("Arrived just now").wait_for()
    page.problems.check()


def test_message_log_and_reports(page, live_server, personas, realistic_mail):
    login_as(page, live_server, personas.admin)
    page.goto(f"{live_server.url}/messages/")
    assert page.locator("table.messages tbody tr").count() == 50
    page.click("text=Next →")
    page.wait_for_url("**/messages/?after=*")
    assert page.locator("table.messages tbody tr").count() == 50
    page.goto(f"{live_server.url}/messages/")
    screenshot(page, "message-log.png")
    page.click("#filters summary")  # the filters fold away when none is active
    page.select_option("#id_verdict", "virus")
    page.click("button:has-text('Apply')")
    page.wait_for_url("**verdict=virus**")
    badges = page.locator("table.messages tbody .badge-virus")
    assert badges.count() > 0 and badges.count() == page.locator("table.messages tbody tr").count()

    page.goto(f"{live_server.url}/reports/total-by-date/")
    assert page.locator("table.mailwatch tbody tr").count() == 30
    assert page.locator("table.mailwatch tfoot th").first.inner_text() == "Total"
    screenshot(page, "reports.png")
    page.goto(f"{live_server.url}/reports/hourly/")
    page.wait_for_selector(CHARTS_READY, state="attached")
    page.wait_for_timeout(600)
    assert canvas_is_drawn(page, "#report-chart")
    page.problems.check()


def test_message_detail_with_safe_preview(page, live_server, personas, realistic_mail):
    login_as(page, live_server, personas.admin)
    spam = realistic_mail["spam"]
    page.goto(f"{live_server.url}/messages/{spam.queue_id}/")
    assert page.locator("text=ADVANCE_FEE_4_NEW").count() == 1
    assert page.locator("text=203.0.113.45").count() >= 1  # the relay path
    frame = page.frame_locator("iframe.preview")
    assert "Congratulations!" in frame.locator("body").inner_text()
    assert frame.locator("img").count() == 0 or not frame.locator("img").first.get_attribute("src")
    screenshot(page, "message-detail.png")
    page.problems.check()


def test_hostile_message_is_text_and_nothing_runs(page, live_server, personas, realistic_mail):
    login_as(page, live_server, personas.alice)
    xss = realistic_mail["xss"]
    page.goto(f"{live_server.url}/messages/?sender=evil@attacker.test")
    assert XSS_SUBJECT in page.locator("table.messages tbody").inner_text()
    page.goto(f"{live_server.url}/messages/{xss.queue_id}/")
    assert page.locator("h1.subject-title").inner_text() == XSS_SUBJECT
    assert "<script>alert('rule')</script>" in page.locator("body").inner_text()
    frame = page.frame_locator("iframe.preview")
    assert "Body" in frame.locator("body").inner_text()
    page.wait_for_timeout(500)  # give anything that might run the time to
    page.goto(f"{live_server.url}/")
    page.wait_for_selector(CHARTS_READY, state="attached")
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")  # the polled rows too
    page.wait_for_timeout(800)
    assert XSS_SUBJECT in page.locator("#latest-body").inner_text()
    assert page.evaluate("document.querySelectorAll('#latest-body script, #latest-body img').length") == 0
    page.problems.check()  # no dialog, no error


def test_user_cannot_open_another_users_message(page, live_server, personas, realistic_mail):
    login_as(page, live_server, personas.alice)
    bobs = realistic_mail["bob"]
    for path in (f"/messages/{bobs.queue_id}/", f"/messages/{bobs.queue_id}/preview",
                 f"/api/messages/{bobs.queue_id}"):
        response = page.goto(f"{live_server.url}{path}")
        assert response.status == 404, path
    page.goto(f"{live_server.url}/messages/")
    assert "Private to Bob" not in page.locator("body").inner_text()
    # Chromium logs each 404 as a console error, sometimes after the next page has loaded: those are expected.
    page.problems.errors[:] = [e for e in page.problems.errors if "status of 404" not in e]
    page.problems.check()


def test_phone_layout(browser, live_server, personas, realistic_mail):
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    phone = context.new_page()
    try:
        login_as(phone, live_server, personas.admin)
        phone.goto(f"{live_server.url}/")
        phone.wait_for_selector(CHARTS_READY, state="attached")
        assert not phone.locator("nav.nav").is_visible()  # folded behind the menu button
        phone.click("label.nav-toggle-label")
        assert phone.locator("nav.nav a:has-text('Messages')").is_visible()
        # Nothing wider than the screen but the tables' own scrolling boxes.
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390
        phone.click("label.nav-toggle-label")
        phone.wait_for_timeout(600)
        screenshot(phone, "dashboard-phone.png")
    finally:
        context.close()
