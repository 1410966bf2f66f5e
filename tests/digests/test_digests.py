"""Digests in one process: who gets one and of what, the links (GET shows, POST acts once, a changed token or
another message is a 404, expiry), the tokens kept as hashes, the one-click unsubscription, the schedule."""

from __future__ import annotations

import base64
import io
import re
from datetime import datetime, timedelta

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from digests.models import DigestLink, DigestPolicy, DomainDigestPolicy, Frequency, Subscription, UnsubscribeLink
from digests.schedule import is_due, latest_slot
from gateway.models import AuditEvent, Domain, Message, Recipient, SenderListEntry
from tests.support.digests import csrf_of, header, link, links, parts
from tests.support.people import make_user, quarantined, virus

pytestmark = pytest.mark.usefixtures("scanners_off")


@pytest.fixture
def setup(protected_domain, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = True
    settings.SITE_URL = "http://testserver"
    settings.DIGEST_SENDER = "quarantine@example.org"
    alice = make_user("alice", email="alice@example.org", aliases="ali@example.org")
    return alice


def send(*args: str) -> str:
    out = io.StringIO()
    call_command("digests", "send", *args, stdout=out)
    return out.getvalue()


def test_a_digest_lists_what_is_new_newest_first_and_only_once(setup, capture_server):
    older = quarantined("alice@example.org", subject="<b>Older</b> & cheap", age=timedelta(hours=2))
    Message.objects.filter(pk=older.pk).update(scanned_at=timezone.now() - timedelta(hours=2))
    newer = quarantined("ali@example.org", subject="Newer")
    Message.objects.filter(pk=newer.pk).update(scanned_at=timezone.now() - timedelta(minutes=1))
    quarantined("someone@example.org", subject="Not hers")
    output = send()
    assert "sent alice <alice@example.org> (own mail) a digest of 2 messages" in output
    (digest,) = capture_server.wait_for(1)
    assert digest.recipients == ["alice@example.org"]
    body = parts(digest.data)
    html, text = body["text/html"], body["text/plain"]
    assert "&lt;b&gt;Older&lt;/b&gt; &amp; cheap" in html and "<b>Older</b>" not in html
    assert text.index("Newer") < text.index("Older") and "Not hers" not in text
    assert "spam score 1000.0" in text
    assert header(digest.data, "List-Unsubscribe").startswith("<http://testserver/digest/unsubscribe/")
    assert header(digest.data, "List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
    assert len(links(digest.data)) == 2 * 4 + 1  # four links a message, and the frequency page
    logged = Message.objects.get(subject__startswith="Quarantine report")
    assert logged.direction == "outbound" and logged.state == "delivered" and logged.checks == {
        "generated": "quarantine digest"}
    # Nothing new: nothing sent; something new: only that.
    assert "nothing new" in send()
    assert len(capture_server.messages) == 1
    quarantined("alice@example.org", subject="Newest")
    send()
    second = parts(capture_server.wait_for(2)[1].data)["text/plain"]
    assert "Newest" in second and "Newer" not in second and "Older" not in second


def test_the_release_link_shows_on_get_and_releases_once_on_post(setup, capture_server):
    held = quarantined("alice@example.org", subject="Wanted", sender="friend@sender.example")
    other = quarantined("alice@example.org", subject="Other")
    send()
    digest = capture_server.wait_for(1)[0].data
    release = link(digest, "release", held.queue_id)
    client = Client(enforce_csrf_checks=True)
    page = client.get(release)
    assert page.status_code == 200 and "Release this message?" in page.content.decode()
    assert "Wanted" in page.content.decode() and "friend@sender.example" in page.content.decode()
    assert Recipient.objects.get(message=held).status == "quarantined"
    assert len(capture_server.messages) == 1
    # A POST without the page's CSRF token does nothing.
    assert client.post(release).status_code == 403
    assert Recipient.objects.get(message=held).status == "quarantined"
    done = client.post(release, {"csrfmiddlewaretoken": csrf_of(page.content.decode())})
    assert done.status_code == 200 and "Released to alice@example.org" in done.content.decode()
    released = capture_server.wait_for(2)[1]
    assert released.recipients == ["alice@example.org"] and b"Subject: Wanted" in released.data
    again = client.post(release, {"csrfmiddlewaretoken": csrf_of(page.content.decode())})
    assert again.status_code == 410 and "used already" in again.content.decode()
    assert len(capture_server.messages) == 2
    # The same message's delete link now says what happened.
    delete = client.get(link(digest, "delete", held.queue_id))
    assert "released for alice@example.org already" in delete.content.decode()
    # One character changed, another message's id, another action: 404.
    token = release.rsplit("/", 1)[1]
    changed = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert client.get(release.replace(token, changed)).status_code == 404
    assert client.get(release.replace(held.queue_id, other.queue_id)).status_code == 404
    assert client.get(release.replace("/release/", "/delete/")).status_code == 404
    assert client.post(release.replace(held.queue_id, other.queue_id)).status_code in (403, 404)
    audit = AuditEvent.objects.filter(action="digest_link", message=held)
    assert {e.detail["step"] for e in audit} >= {"viewed", "used", "refused"}
    assert all(e.ip == "127.0.0.1" for e in audit)
    (released_event,) = AuditEvent.objects.filter(action="release", message=held)
    assert released_event.detail["recipients"] == ["alice@example.org"] and released_event.ip == "127.0.0.1"
    assert released_event.username == "alice"


def test_an_expired_link_does_nothing_and_says_so(setup, capture_server):
    held = quarantined("alice@example.org", subject="Late")
    send()
    release = link(capture_server.wait_for(1)[0].data, "release", held.queue_id)
    DigestLink.objects.filter(message=held).update(expires_at=timezone.now() - timedelta(minutes=1))
    client = Client(enforce_csrf_checks=True)
    page = client.get(release)
    assert "expired" in page.content.decode() and "csrfmiddlewaretoken" not in page.content.decode()
    response = Client().post(release)
    assert response.status_code == 410 and "expired" in response.content.decode()
    assert Recipient.objects.get(message=held).status == "quarantined"
    assert len(capture_server.messages) == 1


def test_release_and_allow_and_delete_act_for_that_one_recipient(setup, capture_server):
    bob = make_user("bob", email="bob@example.org")
    held = quarantined(["alice@example.org", "bob@example.org"], sender="news@letters.example")
    send()
    digests = {m.recipients[0]: m.data for m in capture_server.wait_for(2)}
    client = Client()
    url = link(digests["alice@example.org"], "release_allow", held.queue_id)
    client.post(url)
    statuses = dict(Recipient.objects.filter(message=held).values_list("address", "status"))
    assert statuses["bob@example.org"] == "quarantined" and statuses["alice@example.org"] != "quarantined"
    assert SenderListEntry.objects.filter(kind="allow", scope="user", user=setup, sender="news@letters.example")
    client.post(link(digests["bob@example.org"], "delete", held.queue_id))
    assert Recipient.objects.get(message=held, address="bob@example.org").status == "deleted"
    assert not SenderListEntry.objects.filter(user=bob).exists()


def test_a_virus_is_not_released_from_a_users_digest(setup, capture_server):
    held = virus("alice@example.org")
    send()
    data = capture_server.wait_for(1)[0].data
    assert not [p for p in links(data) if "/release" in p]
    assert "virus: Eicar-Test-Signature" in parts(data)["text/plain"]
    assert held.state == "quarantined"


def test_preview_link_shows_the_sanitised_preview(setup, capture_server):
    held = quarantined("alice@example.org", subject="Look", body="<script>alert(1)</script>Hello there")
    send()
    url = link(capture_server.wait_for(1)[0].data, "preview", held.queue_id)
    client = Client()
    page = client.get(url)
    assert page.status_code == 200 and "<iframe" in page.content.decode() and "sandbox" in page.content.decode()
    queue_id, token = url.split("/")[2], url.rsplit("/", 1)[1]
    content = client.get(f"/digest/{queue_id}/preview/{token}/content")
    assert content.status_code == 200 and "sandbox" in content["Content-Security-Policy"]
    assert "Hello there" in content.content.decode()
    assert Recipient.objects.get(message=held).status == "quarantined"


def test_the_database_holds_only_hashes_of_tokens_of_at_least_128_bits(setup, capture_server):
    quarantined("alice@example.org")
    send()
    data = capture_server.wait_for(1)[0].data
    tokens = [p.rsplit("/", 1)[1] for p in links(data) if "/quarantine/" not in p]
    assert tokens
    for token in tokens:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        assert len(raw) * 8 >= 128
    stored = list(DigestLink.objects.values_list("token_hash", flat=True)) + list(
        UnsubscribeLink.objects.values_list("token_hash", flat=True))
    assert len(stored) == len(tokens)
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in stored)
    from django.db import connection

    with connection.cursor() as cursor:
        for table in ("digests_digestlink", "digests_unsubscribelink", "digests_subscription", "gateway_auditevent"):
            cursor.execute(f"SELECT * FROM {table}")  # noqa: S608 - our table names
            dump = repr(cursor.fetchall())
            assert not any(token in dump for token in tokens), table


def test_one_click_unsubscription_needs_no_login_nor_csrf(setup, capture_server):
    quarantined("alice@example.org")
    send()
    data = capture_server.wait_for(1)[0].data
    url = header(data, "List-Unsubscribe").strip("<>").removeprefix("http://testserver")
    client = Client(enforce_csrf_checks=True)
    page = client.get(url)
    assert page.status_code == 200 and "Quarantine reports" in page.content.decode()
    response = client.post(url, "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 200
    assert Subscription.objects.get(user=setup, kind="user").frequency == Frequency.OFF
    quarantined("alice@example.org", subject="After")
    assert "digests off" in send()
    assert len(capture_server.messages) == 1
    # The page's form sets it back (CSRF-protected).
    saved = client.post(url + "/frequency", {"frequency": "weekly", "csrfmiddlewaretoken": csrf_of(
        page.content.decode())})
    assert saved.status_code == 200
    assert Subscription.objects.get(user=setup, kind="user").frequency == Frequency.WEEKLY
    assert Client().post(url.replace(url[-5:], "xxxxx")).status_code == 404


def test_addresses_without_a_login_and_domain_administrators(setup, capture_server):
    domain = Domain.objects.get(name="example.org")
    dana = make_user("dana", role="domain_admin", email="dana@example.org", domains=[domain])
    quarantined("sales@example.org", subject="For sales")
    out = send()
    assert "sales@example.org" not in out  # the domain does not say so yet
    DomainDigestPolicy.objects.create(domain=domain, non_users=True)
    Subscription.objects.create(kind="domain", user=dana, frequency=Frequency.DAILY)
    assert "would send <sales@example.org>" in send("--dry-run")
    assert capture_server.messages == []
    out = send()
    assert "sent <sales@example.org>" in out and "dana <dana@example.org> (domains example.org)" in out
    got = {m.recipients[0]: parts(m.data)["text/plain"] for m in capture_server.wait_for(2)}
    assert "For sales" in got["sales@example.org"] and "to sales@example.org" in got["dana@example.org"]
    # The address's links act without a login; there is no 'allow the sender' (no list of its own).
    assert "Release and always allow" not in got["sales@example.org"]


def test_only_one_user(setup, capture_server):
    make_user("bob", email="bob@example.org")
    quarantined(["alice@example.org", "bob@example.org"])
    assert "sent bob" in send("--user", "bob")
    assert [m.recipients for m in capture_server.wait_for(1)] == [["bob@example.org"]]


def test_the_schedule():
    tz = timezone.get_current_timezone()
    now = datetime(2026, 12, 9, 10, 30, tzinfo=tz)  # a Wednesday
    assert latest_slot(now, Frequency.DAILY, 8, 0) == datetime(2026, 12, 9, 8, 0, tzinfo=tz)
    assert latest_slot(now, Frequency.DAILY, 11, 0) == datetime(2026, 12, 8, 11, 0, tzinfo=tz)
    assert latest_slot(now, Frequency.TWICE_DAILY, 11, 0) == datetime(2026, 12, 8, 23, 0, tzinfo=tz)
    assert latest_slot(now, Frequency.WEEKLY, 8, 0) == datetime(2026, 12, 7, 8, 0, tzinfo=tz)
    assert latest_slot(now, Frequency.OFF, 8, 0) is None
    assert is_due(None, now, Frequency.DAILY, 8, 0)
    assert not is_due(datetime(2026, 12, 9, 8, 5, tzinfo=tz), now, Frequency.DAILY, 8, 0)
    assert is_due(datetime(2026, 12, 8, 20, 0, tzinfo=tz), now, Frequency.DAILY, 8, 0)


def test_beat_sends_only_what_is_due(setup, capture_server):
    policy = DigestPolicy.load()
    policy.hour = (timezone.localtime().hour + 1) % 24
    policy.save()
    quarantined("alice@example.org")
    from digests.tasks import send_due_digests

    this_hour = timezone.localtime().replace(minute=0, second=0, microsecond=0)
    Subscription.objects.create(kind="user", user=setup, last_run_at=this_hour - timedelta(minutes=1))
    assert send_due_digests() == 0
    policy.hour = timezone.localtime().hour
    policy.save()
    assert send_due_digests() == 1
    assert send_due_digests() == 0
