"""The mail queue and the status page in a real browser (Debian's Chromium through Playwright): the queue
groups and acts, the status page colours each part from the real clamd, spamd and Redis; the screenshots
docs/screenshots/queue.png and status.png are taken on the way."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from gateway.heartbeat import VERSION
from gateway.models import Domain, Message, NodeHeartbeat, Recipient, Route
from tests.support.browser import login_as, screenshot
from tests.support.people import make_message

pytestmark = [pytest.mark.browser]

REFUSED = "451 4.3.0 <{}>: temporary failure: mailbox store busy (from 10.0.0.20:25)"
UNREACHABLE = "451 4.4.1 [Errno 111] Connection refused (from 10.0.0.30:25)"


@pytest.fixture
def busy_queue(personas, transactional_db):
    """A queue as a bad afternoon leaves it: one mail store answering 451, an archive host down, a message
    whose scan waits for clamd, and one recipient on hold; on two nodes."""
    now = timezone.now()
    archive = Route.objects.create(name="archive", host="10.0.0.30", port=25)
    Route.objects.filter(name="mailstore").update(host="10.0.0.20", port=25)
    personas.example_org.route = archive
    personas.example_org.save()
    Domain.objects.create(name="example.net", route=archive)
    made = []
    for i, (sender, to, minutes, node, reply) in enumerate([
        ("orders@supplier.test", "alice@example.com", 95, "mx1", REFUSED),
        ("newsletter@news.test", "bob@example.com", 80, "mx2", REFUSED),
        ("billing@utility.test", "sales@example.com", 62, "mx1", REFUSED),
        ("hr@partner.test", "records@example.org", 240, "mx1", UNREACHABLE),
        ("ceo@partner.test", "board@example.net", 190, "mx2", UNREACHABLE),
        ("noreply@tickets.test", "archive@example.org", 30, "mx2", UNREACHABLE),
    ]):
        message = make_message(sender, [to], ago=timedelta(minutes=minutes), state=Message.State.DELIVERING,
                               subject=f"Queued {i}", node=node)
        Recipient.objects.filter(message=message).update(
            status=Recipient.Status.DEFERRED, reply_code=451, reply_text=reply.format(to), attempts=4 + i,
            next_attempt_at=now + timedelta(minutes=7 + i))
        made.append(message)
    waiting = make_message("scanner@lab.test", ["alice@example.com"], ago=timedelta(minutes=12),
                           state=Message.State.SCAN_DEFERRED, node="mx1", subject="Waiting for clamd",
                           last_error="clamd at unix:///run/clamav/clamd.ctl: [Errno 111] Connection refused",
                           next_attempt_at=now + timedelta(minutes=3))
    Recipient.objects.filter(message=waiting).update(status=Recipient.Status.PENDING)
    held = make_message("bulk@promo.test", ["bob@example.com"], ago=timedelta(minutes=45),
                        state=Message.State.DELIVERING, node="mx2", subject="Held for review")
    Recipient.objects.filter(message=held).update(status=Recipient.Status.HELD, reply_code=451,
                                                  reply_text=REFUSED.format("bob@example.com"), attempts=2)
    return made


def heartbeats():
    now = timezone.now()
    for node, kind, pid, connections, up in (("mx1", "smtp", 812, 14, 26), ("mx1", "worker", 840, None, 26),
                                             ("mx2", "smtp", 655, 9, 3), ("mx2", "worker", 671, None, 3)):
        NodeHeartbeat.objects.create(node=node, kind=kind, pid=pid, version=VERSION, smtp_connections=connections,
                                     started_at=now - timedelta(hours=up), seen_at=now - timedelta(seconds=4))


def test_the_mail_queue_groups_and_holds(page, live_server, personas, busy_queue):
    login_as(page, live_server, personas.admin)
    page.goto(f"{live_server.url}/queue/")
    assert page.locator("#queue-form tbody tr").count() == 8
    groups = page.locator(".op-groups table").first.locator("tbody tr")
    assert groups.count() == 2  # mailstore and archive
    assert "mailstore (10.0.0.20:25)" in groups.first.inner_text()  # the largest first: five
    assert "archive (10.0.0.30:25)" in groups.last.inner_text()
    screenshot(page, "queue.png")
    # Tick the oldest deferred recipient and hold it.
    first = busy_queue[3]  # the oldest: four hours
    recipient = first.recipients.get()
    page.check(f"input[name=ids][value='{recipient.pk}']")
    page.select_option("#queue-form select[name=action]", "hold")
    with page.expect_navigation():
        page.click("#queue-form button:has-text('Apply')")
    assert "1 recipient(s) of 1 message(s) put on hold" in page.locator(".flash").inner_text()
    recipient.refresh_from_db()
    assert recipient.status == Recipient.Status.HELD
    # Filtered by node.
    page.goto(f"{live_server.url}/queue/?node=mx2")
    assert page.locator("#queue-form tbody tr").count() == 4
    page.problems.check()


def test_the_status_page_colours_each_part(page, live_server, personas, busy_queue, settings, clamd, spamd, redis):
    settings.CLAMD_URL, settings.SPAMD_URL, settings.CELERY_BROKER_URL = clamd, spamd, redis
    heartbeats()
    login_as(page, live_server, personas.admin)
    page.goto(f"{live_server.url}/status/")
    cards = page.locator(".op-card")
    text = page.locator("main").inner_text()
    assert "mx1" in text and "mx2" in text and "14 SMTP connections now" in text
    assert "ClamAV" in text and "SPAMD/" in text and "queue celery" in text
    assert "Waiting for clamd" not in text and "clamd at unix" in text  # the last errors
    assert cards.count() >= 8
    screenshot(page, "status.png")
    page.problems.check()
