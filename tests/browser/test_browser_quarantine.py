"""The quarantine, the lists and the administration in a real browser (Debian's Chromium, Playwright).

- An administrator opens a quarantined GTUBE message from the quarantine list, sees its rules, releases it,
  and the organisation's mail server (a capture SMTP server) receives it exactly once.
- A user sees only their quarantine; another user's message URL answers 404.
- A domain administrator is limited to their domains (quarantine and users).
- An allow-list entry made on the lists page changes the verdict of the next matching message; a block
  entry too (through our SMTP server and the scan pipeline).
Screenshots: docs/screenshots/quarantine.png, lists.png, manage-users.png.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from playwright.sync_api import expect

from gateway.models import Message, SenderListEntry, Verdict
from tests.support.browser import login_as, screenshot
from tests.support.mail import message as build_message
from tests.support.people import GTUBE, PASSWORD, People, make_people, quarantined, virus

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def tab(page):
    """The browser kit's page (JavaScript errors and dialogs recorded), under a name that does not shadow it."""
    return page


@pytest.fixture
def people(transactional_db, capture_server) -> People:
    # The protected domains' route is the capture server: released mail lands there.
    return make_people(route_port=capture_server.port)


def log_in(tab, live_server, user) -> None:
    login_as(tab, live_server, user, password=PASSWORD)


def check_page(tab, *expected_statuses: int) -> None:
    """No JavaScript error, no dialog, and no failed request but the ones the test provoked on purpose
    (Chromium logs a 404, a 403 or a form answered 400 as a console error)."""
    expected = tuple(f"status of {status} " for status in expected_statuses)
    tab.problems.errors[:] = [e for e in tab.problems.errors if not any(x in e for x in expected)]
    tab.problems.check()


def some_quarantine() -> Message:
    """A quarantine worth a screenshot; returns the GTUBE message."""
    quarantined("alice@example.org", subject="Your parcel is waiting: confirm delivery",
                sender="noreply@parcel.example", verdict=Verdict.SPAM, score=7.3, age=timedelta(hours=5),
                rules=[{"name": "URIBL_BLACK", "score": 4.1, "description": "Contains a URL listed in URIBL"}])
    virus("ali@example.org", sender="billing@invoices.example", age=timedelta(hours=3))
    quarantined("bob@example.net", subject="Re: your account", sender="security@bank-login.example",
                score=17.2, age=timedelta(hours=2))
    return quarantined("alice@example.org", subject="GTUBE test message", sender="tester@spam.example",
                       body=f"This is the GTUBE, the generic test for unsolicited bulk email.\r\n\r\n{GTUBE}",
                       age=timedelta(minutes=3))


def test_an_administrator_releases_a_gtube_message_and_it_arrives_once(tab, live_server, people,
                                                                       capture_server, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = True  # the delivery task runs when the release commits
    gtube = some_quarantine()
    log_in(tab, live_server, people.admin)

    tab.goto(f"{live_server.url}/quarantine/")
    expect(tab.locator(".q-table")).to_contain_text("Your parcel is waiting")
    expect(tab.locator(".q-table")).to_contain_text("Re: your account")
    screenshot(tab, "quarantine.png")

    tab.get_by_role("link", name="GTUBE test message").click()
    expect(tab).to_have_url(re.compile(f"/quarantine/{gtube.queue_id}/$"))
    rules = tab.locator(".q-rules")
    expect(rules).to_contain_text("GTUBE")
    expect(rules).to_contain_text("1000")
    expect(rules).to_contain_text("Generic Test for Unsolicited Bulk Email")

    tab.locator("#q-release").click()
    expect(tab.locator(".flash")).to_contain_text(f"Message {gtube.queue_id} released to alice@example.org")
    received = capture_server.wait_for(1, timeout=30)
    time.sleep(1)  # anything sent twice would have arrived by now
    assert len(received) == 1
    assert received[0].recipients == ["alice@example.org"]
    assert GTUBE.encode() in received[0].data

    # Back on the message: released, no release button; a second release (a replayed POST) does nothing.
    tab.goto(f"{live_server.url}/quarantine/{gtube.queue_id}/")
    expect(tab.locator(".q-state")).to_have_text("Released from quarantine")
    expect(tab.locator("#q-release")).to_have_count(0)
    token = tab.locator("input[name=csrfmiddlewaretoken]").first.get_attribute("value")
    replay = tab.request.post(f"{live_server.url}/quarantine/{gtube.queue_id}/release",
                               form={"csrfmiddlewaretoken": token}, headers={"Referer": live_server.url + "/"})
    assert "already released" in replay.text()
    time.sleep(1)
    assert len(capture_server.messages) == 1
    gtube.refresh_from_db()
    assert gtube.state == Message.State.RELEASED  # and stays so: released mail is marked released
    assert list(gtube.recipients.values_list("address", "status")) == [("alice@example.org", "delivered")]
    tab.problems.check()


def test_a_user_sees_only_their_quarantine(tab, live_server, people):
    some_quarantine()
    bobs = Message.objects.get(subject="Re: your account")
    log_in(tab, live_server, people.alice)
    tab.goto(f"{live_server.url}/quarantine/")
    table = tab.locator(".q-table")
    expect(table).to_contain_text("GTUBE test message")
    expect(table).to_contain_text("Invoice attached")  # to her alias
    expect(table).not_to_contain_text("Re: your account")
    expect(tab.locator(".q-count")).to_contain_text("3 messages in your quarantine")

    response = tab.goto(f"{live_server.url}/quarantine/{bobs.queue_id}/")
    assert response.status == 404
    # The virus is hers to see, not to release.
    tab.goto(f"{live_server.url}/quarantine/")
    tab.get_by_role("link", name="Invoice attached").click()
    expect(tab.locator(".q-release")).to_contain_text("Only administrators may release it")
    check_page(tab, 404)


def test_a_domain_administrator_is_limited_to_their_domains(tab, live_server, people):
    some_quarantine()
    bobs = Message.objects.get(subject="Re: your account")
    log_in(tab, live_server, people.dana)
    tab.goto(f"{live_server.url}/quarantine/")
    table = tab.locator(".q-table")
    expect(table).to_contain_text("GTUBE test message")
    expect(table).not_to_contain_text("Re: your account")
    assert tab.goto(f"{live_server.url}/quarantine/{bobs.queue_id}/").status == 404

    tab.goto(f"{live_server.url}/manage/users/")
    users = tab.locator(".m-table")
    expect(users).to_contain_text("alice")
    expect(users).not_to_contain_text("bob")
    expect(tab.locator(".m-tabs")).not_to_contain_text("Domains")
    assert tab.goto(f"{live_server.url}/manage/domains/").status == 403
    check_page(tab, 403, 404)


def test_an_administrator_manages_users(tab, live_server, people):
    log_in(tab, live_server, people.admin)
    tab.goto(f"{live_server.url}/manage/users/new")
    tab.fill("#id_username", "carol")
    tab.fill("#id_email", "carol@example.org")
    tab.fill("#id_password1", "short")
    tab.fill("#id_password2", "short")
    tab.click(".m-form button[type=submit]")
    expect(tab.locator(".m-form .error")).to_contain_text("This password is too short")
    tab.fill("#id_password1", "Carol-has-a-long-pass-77")
    tab.fill("#id_password2", "Carol-has-a-long-pass-77")
    tab.click(".m-form button[type=submit]")
    expect(tab.locator(".flash")).to_contain_text("User carol created.")
    expect(tab.locator(".m-table")).to_contain_text("carol@example.org")
    screenshot(tab, "manage-users.png")
    check_page(tab, 400)


def send(gateway_smtp, raw: bytes, sender: str, to: str) -> Message:
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail(sender)
        client.rcpt(to)
        code, reply = client.data(raw)
    assert code == 250, reply
    return Message.objects.get(queue_id=reply.decode().rsplit(" ", 1)[1])


def add_entry(tab, live_server, kind: str, sender: str) -> None:
    tab.goto(f"{live_server.url}/quarantine/lists/")
    tab.check(f"input[name=kind][value={kind}]")
    tab.fill("#id_sender", sender)
    tab.click(".q-add button[type=submit]")
    expect(tab.locator(".flash")).to_contain_text(f"{sender} added to the {kind} list")


def test_a_block_entry_made_in_the_ui_changes_the_next_verdict(tab, live_server, people, gateway_smtp,
                                                               capture_server, scanners_off):
    ham = build_message(subject="Weekly newsletter", sender="news@letters.example", to="alice@example.org")
    before = send(gateway_smtp, ham, "news@letters.example", "alice@example.org")
    before.refresh_from_db()
    assert (before.verdict, before.state) == (Verdict.CLEAN, Message.State.DELIVERED)

    log_in(tab, live_server, people.alice)
    tab.goto(f"{live_server.url}/quarantine/lists/")
    # A mistake first: the form says what is wrong.
    tab.check("input[name=kind][value=block]")
    tab.fill("#id_sender", "letters.example")
    tab.click(".q-add button[type=submit]")
    expect(tab.locator(".q-add .error")).to_contain_text("use an address, @domain, *.domain")
    add_entry(tab, live_server, "block", "@letters.example")
    assert SenderListEntry.objects.get().user == people.alice

    after = send(gateway_smtp, ham, "news@letters.example", "alice@example.org")
    after.refresh_from_db()
    assert after.verdict == Verdict.BLOCKED_SENDER
    assert after.state == Message.State.QUARANTINED  # the default action for a blocked sender
    assert len(capture_server.messages) == 1  # only the message before the entry

    # Bob's mail from the same sender is not Alice's business.
    other = send(gateway_smtp, ham, "news@letters.example", "bob@example.net")
    other.refresh_from_db()
    assert other.verdict == Verdict.CLEAN
    check_page(tab, 400)


def test_an_allow_entry_made_in_the_ui_changes_the_next_verdict(tab, live_server, people, gateway_smtp,
                                                                capture_server, settings, spamd):
    settings.SPAMD_URL = spamd
    settings.CLAMD_URL = ""
    gtube = build_message(subject="Test of the spam filter", sender="qa@partner.example", to="alice@example.org",
                          body=f"Our filter test:\n\n{GTUBE}\n")
    before = send(gateway_smtp, gtube, "qa@partner.example", "alice@example.org")
    before.refresh_from_db()
    assert (before.verdict, before.state) == (Verdict.HIGH_SPAM, Message.State.QUARANTINED)

    log_in(tab, live_server, people.alice)
    add_entry(tab, live_server, "allow", "qa@partner.example")
    add_entry(tab, live_server, "block", "*.spam.example")
    expect(tab.locator(".q-entries")).to_contain_text("qa@partner.example")
    screenshot(tab, "lists.png")

    after = send(gateway_smtp, gtube, "qa@partner.example", "alice@example.org")
    after.refresh_from_db()
    # SpamAssassin still says high spam (the message's verdict is the scanners'); for Alice, the
    # recipient, her allow list decided: clean, delivered.
    assert after.spam_score > 900
    assert list(after.recipients.values_list("verdict", "status")) == [(Verdict.CLEAN, "delivered")]
    assert after.state == Message.State.DELIVERED
    assert len(capture_server.wait_for(1)) == 1
    tab.problems.check()


def test_a_bulk_delete_shows_its_progress_until_done(tab, live_server, people):
    for i in range(130):
        quarantined("alice@example.org", subject=f"Lottery win number {i}", sender=f"lucky{i}@lottery.example")
    keep = quarantined("alice@example.org", subject="A newsletter I want", sender="news@friends.example")
    log_in(tab, live_server, people.alice)
    tab.goto(f"{live_server.url}/quarantine/?sender=lottery")
    expect(tab.locator(".q-count")).to_contain_text("130 messages match this filter")

    # Tick all on the page: the boxes follow.
    tab.check("#q-select-all")
    assert tab.locator("input[name=ids]:checked").count() == 50

    tab.select_option("select[name=target]", "all")
    tab.select_option("select[name=action]", "delete")
    # The page asks "Delete: all 130 that match?"; the kit dismisses dialogs, so answer yes here.
    tab.evaluate("window.confirm = (question) => { sessionStorage.setItem('asked', question); return true; }")
    tab.click("#q-bulk-form button[type=submit]")
    job = tab.locator(".q-job")
    expect(job).to_contain_text("Delete of 130 messages")
    expect(job.locator(".q-job-summary")).to_have_text("Deleted 130 of 130 messages.", timeout=30_000)
    expect(job.locator(".q-job-count")).to_have_text("130 / 130")
    assert tab.evaluate("sessionStorage.getItem('asked')") == "Delete: all 130 that match?"

    job.locator(".q-job-reload").click()
    expect(tab.locator(".q-count")).to_contain_text("0 messages match this filter")
    assert Message.objects.filter(subject__startswith="Lottery", state=Message.State.DELETED).count() == 130
    keep.refresh_from_db()
    assert keep.state == Message.State.QUARANTINED
    tab.problems.check()
