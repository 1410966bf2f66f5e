"""The mail queue: /queue/ and `manage.py queue` list what is not yet final and act on it (retry delivers once,
bounce sends one DSN, delete audits, hold keeps mail back), for the recipients the caller may act for; delay
warnings go once per recipient. Mail goes through our SMTP server to the real capture servers."""

from __future__ import annotations

import email
import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from gateway import sweep
from gateway.delivery import delays
from gateway.delivery.attempt import run_delivery
from gateway.mailqueue.listing import failing_routes, queued
from gateway.models import AuditEvent, Domain, MailFlowSettings, Message, RawMessage, Recipient
from tests.support.mail import message
from tests.support.people import logged_in, make_user
from tests.support.servers import send

pytestmark = pytest.mark.usefixtures("scanners_off")


@pytest.fixture
def relay_to_capture(protected_domain, capture_server):
    """DSNs to senders outside our domains leave through the outbound relay: the capture server."""
    config = MailFlowSettings.load()
    config.outbound_relay = capture_server.address
    config.save()
    return capture_server


def deferred(gateway_smtp, capture_server, to=("bob@example.org",)) -> Message:
    """A message through our SMTP server whose delivery the route answered 451 to: in the queue, deferred."""
    capture_server.handler.data_script = ["451 4.3.0 mailbox store busy"]
    msg = send(gateway_smtp, message(to=", ".join(to)), to=to)
    assert set(msg.recipients.values_list("status", flat=True)) == {Recipient.Status.DEFERRED}
    assert capture_server.messages == []
    return msg


def delivered_to(capture_server, address: str) -> list:
    return [m for m in capture_server.messages if address in m.recipients]


def dsns_to(capture_server, address: str = "alice@sender.example") -> list:
    return [m for m in capture_server.messages if m.recipients == [address] and m.sender in ("", "<>")]


# --- from the page ------------------------------------------------------------------------------------------

def test_the_page_lists_a_deferred_recipient_grouped_by_route_and_reply(gateway_smtp, relay_to_capture, client):
    msg = deferred(gateway_smtp, relay_to_capture)
    admin = make_user("admin", role="admin", email="postmaster@example.org")
    page = logged_in(client, admin).get("/queue/")
    assert page.status_code == 200
    html = page.content.decode()
    assert msg.queue_id in html and "bob@example.org" in html
    destinations = page.context["destinations"]
    assert [(g.label, g.count) for g in destinations] == [(f"mailstore (127.0.0.1:{relay_to_capture.port})", 1)]
    (reply,) = page.context["replies"]
    assert reply.label.startswith("451 4.3.0 mailbox store busy") and reply.count == 1
    assert reply.next_attempt is not None and reply.oldest is not None
    assert dict((state, n) for _, state, n in page.context["counts"])["deferred"] == 1
    # Filtered by node: the message's node matches, another does not.
    assert logged_in(client, admin).get("/queue/", {"node": msg.node}).context["total"] == 1
    assert logged_in(client, admin).get("/queue/", {"node": "elsewhere"}).context["total"] == 0


def test_retry_from_the_page_delivers_once(gateway_smtp, relay_to_capture, client):
    msg = deferred(gateway_smtp, relay_to_capture)
    recipient = msg.recipients.get()
    admin = make_user("admin", role="admin", email="postmaster@example.org")
    client = logged_in(client, admin)
    answer = client.post("/queue/act", {"action": "retry", "target": "selected", "ids": [recipient.pk]})
    assert answer.status_code == 302
    assert len(delivered_to(relay_to_capture, "bob@example.org")) == 1
    recipient.refresh_from_db()
    assert recipient.status == Recipient.Status.DELIVERED
    # Clicked again, and the sweeper and a delivery task on top: nothing more is sent.
    client.post("/queue/act", {"action": "retry", "target": "selected", "ids": [recipient.pk]})
    for message_id in sweep.due_work()[1]:
        run_delivery(message_id)
    run_delivery(msg.pk)
    assert len(delivered_to(relay_to_capture, "bob@example.org")) == 1
    assert AuditEvent.objects.filter(action="queue_retry", message=msg, username="admin").count() == 1


def test_bounce_of_a_group_from_the_page_sends_one_dsn(gateway_smtp, relay_to_capture, client):
    msg = deferred(gateway_smtp, relay_to_capture, to=("bob@example.org", "carol@example.org"))
    admin = make_user("admin", role="admin", email="postmaster@example.org")
    client = logged_in(client, admin)
    key = client.get("/queue/").context["destinations"][0].key
    client.post("/queue/act", {"action": "bounce", "target": "destination", "key": key})
    client.post("/queue/act", {"action": "bounce", "target": "destination", "key": key})  # twice: one DSN
    (notice,) = dsns_to(relay_to_capture)
    report = email.message_from_bytes(notice.data)
    status = report.get_payload()[1].as_string()
    assert "Action: failed" in status
    assert "Final-Recipient: rfc822; bob@example.org" in status
    assert "Final-Recipient: rfc822; carol@example.org" in status
    human = " ".join(report.get_payload()[0].get_payload(decode=True).decode().split())
    assert "returned to the sender by the mail administrator" in human
    assert delivered_to(relay_to_capture, "bob@example.org") == []
    msg.refresh_from_db()
    assert msg.state == Message.State.BOUNCED
    assert set(msg.recipients.values_list("status", "dsn_sent")) == {(Recipient.Status.BOUNCED, True)}
    assert not queued().filter(message=msg).exists()


def test_delete_from_the_page_is_audited_and_drops_the_original(gateway_smtp, relay_to_capture, client):
    msg = deferred(gateway_smtp, relay_to_capture)
    admin = make_user("admin", role="admin", email="postmaster@example.org")
    client = logged_in(client, admin)
    client.post("/queue/act", {"action": "delete", "target": "all"}, REMOTE_ADDR="192.0.2.44")
    (event,) = AuditEvent.objects.filter(action="queue_delete")
    assert event.message_id == msg.pk and event.username == "admin" and event.ip == "192.0.2.44"
    assert event.detail["recipients"] == ["bob@example.org"]
    msg.refresh_from_db()
    assert msg.state == Message.State.DELETED
    assert not RawMessage.objects.filter(message=msg).exists()
    assert relay_to_capture.messages == []  # no DSN for a deletion


def test_hold_keeps_mail_back_until_released(gateway_smtp, relay_to_capture, client):
    msg = deferred(gateway_smtp, relay_to_capture)
    recipient = msg.recipients.get()
    admin = make_user("admin", role="admin", email="postmaster@example.org")
    client = logged_in(client, admin)
    client.post("/queue/act", {"action": "hold", "target": "selected", "ids": [recipient.pk]})
    recipient.refresh_from_db()
    assert recipient.status == Recipient.Status.HELD
    # Due, but on hold: neither the sweeper nor a retry sends it.
    Recipient.objects.filter(pk=recipient.pk).update(next_attempt_at=timezone.now())
    assert msg.pk not in sweep.due_work()[1]
    run_delivery(msg.pk)
    client.post("/queue/act", {"action": "retry", "target": "selected", "ids": [recipient.pk]})
    assert relay_to_capture.messages == []
    page = client.get("/queue/", {"state": "held"})
    assert page.context["total"] == 1
    client.post("/queue/act", {"action": "release-hold", "target": "selected", "ids": [recipient.pk]})
    assert len(delivered_to(relay_to_capture, "bob@example.org")) == 1
    recipient.refresh_from_db()
    assert recipient.status == Recipient.Status.DELIVERED


def test_a_domain_administrator_acts_only_for_their_domains(gateway_smtp, relay_to_capture, client):
    Domain.objects.create(name="example.net", route=Domain.objects.get(name="example.org").route)
    msg = deferred(gateway_smtp, relay_to_capture, to=("bob@example.org", "eve@example.net"))
    dana = make_user("dana", role="domain_admin", email="dana@example.org",
                     domains=[Domain.objects.get(name="example.org")])
    client = logged_in(client, dana)
    page = client.get("/queue/")
    assert page.status_code == 200 and page.context["total"] == 1
    assert "eve@example.net" not in page.content.decode()
    # The other domain's recipient, ticked by hand: not hers, not touched.
    other = msg.recipients.get(address="eve@example.net")
    client.post("/queue/act", {"action": "delete", "target": "selected", "ids": [other.pk]})
    other.refresh_from_db()
    assert other.status == Recipient.Status.DEFERRED
    client.post("/queue/act", {"action": "bounce", "target": "all"})
    assert msg.recipients.get(address="bob@example.org").status == Recipient.Status.BOUNCED
    assert msg.recipients.get(address="eve@example.net").status == Recipient.Status.DEFERRED
    (notice,) = dsns_to(relay_to_capture)
    assert b"bob@example.org" in notice.data and b"eve@example.net" not in notice.data.split(b"text/rfc822")[0]


def test_users_and_strangers_do_not_see_the_queue(db, client):
    alice = make_user("alice", role="user", email="alice@example.org")
    assert logged_in(client, alice).get("/queue/").status_code == 403
    assert logged_in(client, alice).post("/queue/act", {"action": "delete", "target": "all"}).status_code == 403
    client.logout()
    assert client.get("/queue/").status_code == 302  # to the login


# --- from the shell -----------------------------------------------------------------------------------------

def run(*args) -> str:
    out = StringIO()
    call_command("queue", *args, stdout=out)
    return out.getvalue()


def test_queue_list_json_and_text(gateway_smtp, relay_to_capture):
    msg = deferred(gateway_smtp, relay_to_capture)
    listed = json.loads(run("list", "--json"))
    assert listed["count"] == 1
    (entry,) = listed["entries"]
    assert entry["queue_id"] == msg.queue_id and entry["recipient"] == "bob@example.org"
    assert entry["state"] == "deferred" and entry["last_reply"].startswith("451 4.3.0")
    assert entry["destination"] == f"mailstore (127.0.0.1:{relay_to_capture.port})"
    assert msg.queue_id in run("list")
    assert json.loads(run("list", "--json", "--route", "mailstore"))["count"] == 1
    assert json.loads(run("list", "--json", "--route", "other.example"))["count"] == 0


def test_queue_retry_from_the_command_delivers_once(gateway_smtp, relay_to_capture):
    msg = deferred(gateway_smtp, relay_to_capture)
    assert "1 recipient(s) of 1 message(s) retried" in run("retry", msg.queue_id)
    assert len(delivered_to(relay_to_capture, "bob@example.org")) == 1
    with pytest.raises(CommandError, match="not in the queue"):
        run("retry", msg.queue_id)  # delivered: no longer in the queue
    assert len(delivered_to(relay_to_capture, "bob@example.org")) == 1


def test_queue_bounce_all_deferred_sends_one_dsn(gateway_smtp, relay_to_capture):
    msg = deferred(gateway_smtp, relay_to_capture)
    run("bounce", "--all-deferred")
    (notice,) = dsns_to(relay_to_capture)
    assert b"Action: failed" in notice.data
    assert msg.recipients.get().status == Recipient.Status.BOUNCED


def test_queue_delete_by_route_is_audited(gateway_smtp, relay_to_capture):
    msg = deferred(gateway_smtp, relay_to_capture)
    run("delete", "--route", "127.0.0.1")
    (event,) = AuditEvent.objects.filter(action="queue_delete")
    assert event.message_id == msg.pk and event.username == ""  # the command line: the system
    assert msg.recipients.get().status == Recipient.Status.DELETED


def test_queue_hold_and_release_hold_from_the_command(gateway_smtp, relay_to_capture):
    msg = deferred(gateway_smtp, relay_to_capture)
    run("hold", msg.queue_id)
    assert msg.recipients.get().status == Recipient.Status.HELD
    run("release-hold", msg.queue_id)
    assert msg.recipients.get().status == Recipient.Status.DELIVERED
    assert len(delivered_to(relay_to_capture, "bob@example.org")) == 1


def test_queue_command_refuses_bad_input(db):
    with pytest.raises(CommandError, match="one of them"):
        run("retry")
    with pytest.raises(CommandError, match="not in the queue: NOSUCHID"):
        run("delete", "NOSUCHID")
    with pytest.raises(CommandError, match="nothing in the queue goes to"):
        run("bounce", "--route", "nowhere.example")


def test_bounce_of_a_message_waiting_for_its_scan(relay_to_capture, settings):
    """A message whose scan is deferred (clamd away) bounces before its scan: the scan then finds it gone."""
    settings.CELERY_TASK_ALWAYS_EAGER = True
    msg = Message.objects.create(envelope_sender="alice@sender.example", state=Message.State.SCAN_DEFERRED,
                                 last_error="clamd at unix:///nowhere: connection refused",
                                 next_attempt_at=timezone.now() + timedelta(minutes=5))
    RawMessage.objects.create(message=msg, data=message(subject="Waiting"))
    Recipient.objects.create(message=msg, address="bob@example.org")
    (entry,) = json.loads(run("list", "--json"))["entries"]
    assert entry["state"] == "scan_deferred" and "clamd" in entry["last_reply"]
    assert "skipped 1 waiting for the scan" in run("hold", msg.queue_id)  # not before its scan
    assert msg.recipients.get().status == Recipient.Status.PENDING
    run("bounce", msg.queue_id)
    msg.refresh_from_db()
    assert msg.state == Message.State.BOUNCED
    (notice,) = dsns_to(relay_to_capture)
    assert b"Subject: Waiting" in notice.data  # the original's headers
    from gateway.scan.run import run_scan

    assert run_scan(msg.pk) == "taken"  # the scan no longer claims it


# --- delay warnings and failing routes ----------------------------------------------------------------------

def test_a_delay_warning_is_sent_once_per_recipient(gateway_smtp, relay_to_capture, settings):
    settings.DELAY_WARNING_HOURS = 4
    msg = deferred(gateway_smtp, relay_to_capture)
    assert delays.send_delay_warnings() == 0  # not yet four hours
    Message.objects.filter(pk=msg.pk).update(received_at=timezone.now() - timedelta(hours=4, minutes=1))
    assert delays.send_delay_warnings() == 1
    assert delays.send_delay_warnings() == 0
    (warning,) = dsns_to(relay_to_capture)
    report = email.message_from_bytes(warning.data)
    assert report["Subject"] == "Delayed Mail (still being retried)"
    status = report.get_payload()[1].as_string()
    assert "Action: delayed" in status and "Status: 4.3.0" in status
    assert "Final-Recipient: rfc822; bob@example.org" in status and "Will-Retry-Until:" in status
    recipient = msg.recipients.get()
    assert recipient.delay_warned and recipient.status == Recipient.Status.DEFERRED  # still tried


def test_no_delay_warning_when_switched_off(gateway_smtp, relay_to_capture, settings):
    settings.DELAY_WARNING_HOURS = 0
    msg = deferred(gateway_smtp, relay_to_capture)
    Message.objects.filter(pk=msg.pk).update(received_at=timezone.now() - timedelta(days=1))
    assert delays.send_delay_warnings() == 0
    assert dsns_to(relay_to_capture) == []


def test_a_route_whose_last_attempts_all_failed_shows_on_the_dashboard(gateway_smtp, relay_to_capture, client,
                                                                      settings):
    settings.ROUTE_FAILING_AFTER = 3
    admin = make_user("admin", role="admin", email="postmaster@example.org")
    for _ in range(2):
        deferred(gateway_smtp, relay_to_capture)
    assert failing_routes() == []  # two failures of three
    deferred(gateway_smtp, relay_to_capture)
    (failing,) = failing_routes()
    assert failing.route.name == "mailstore" and failing.last_reply.startswith("451 4.3.0")
    page = logged_in(client, admin).get("/")
    assert "failing" in page.content.decode() and "mailstore" in page.content.decode()
    # One delivery that goes through, and it is no longer failing.
    send(gateway_smtp, message())
    assert failing_routes() == []
