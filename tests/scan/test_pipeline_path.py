"""The path every message takes, scan then delivery in one task: few statements, and claims that hold.

The statements are hand-written `UPDATE … RETURNING` (gateway/db/statements.py); these tests pin how many a
message costs and that each claim still moves only what it owns.
"""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from gateway.delivery import attempt as delivery_attempt
from gateway.delivery.attempt import DeliveryAttempt
from gateway.models import MailFlowSettings, Message, Recipient, Verdict
from gateway.scan import record as scan_record
from gateway.scan import run as scan_run
from gateway.scan import verdict as scan_verdict
from tests.support.mail import message
from tests.support.servers import send

pytestmark = pytest.mark.usefixtures("scanners_off")

TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE SAVEPOINT")


def statements(ctx: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in ctx.captured_queries if not q["sql"].upper().startswith(TRANSACTION_CONTROL)]


@pytest.fixture
def received(gateway_smtp, protected_domain, capture_server, settings):
    """Messages stay 'received' after intake: the test runs the scan task itself."""
    settings.CELERY_TASK_ALWAYS_EAGER = False
    MailFlowSettings.cached()  # the settings snapshot of a running worker

    def receive(to=("bob@example.org",)) -> Message:
        return send(gateway_smtp, message(), to=to)

    return receive


def test_scan_and_delivery_of_a_one_recipient_message_take_two_statements(received, capture_server):
    msg = received()
    scan_run.run_scan(msg.pk)  # a first message warms the per-process snapshots (settings, lists, routes)
    msg = received()
    with CaptureQueriesContext(connection) as ctx:
        assert scan_run.run_scan(msg.pk) == Verdict.CLEAN
    # PostgreSQL: the claim and the read of the message, its bytes, its recipient count and its pending
    # recipients; after the delivery, the verdict, the recipient's outcome and the message's final state
    # (scan_record.HeldVerdict). Elsewhere: the claim; the verdict of the message and of its recipient,
    # claimed for delivery; the recipient's outcome and the message's final state, each pair of writes in
    # a transaction.
    if connection.vendor == "postgresql":
        assert len(ctx.captured_queries) == 2, ctx.captured_queries
    else:
        assert len(statements(ctx)) == 5, statements(ctx)
    msg.refresh_from_db()
    (recipient,) = msg.recipients.all()
    assert msg.state == Message.State.DELIVERED and msg.completed_at is not None
    assert (recipient.status, recipient.reply_code, recipient.attempts) == (Recipient.Status.DELIVERED, 250, 1)
    assert recipient.claimed_at is None and recipient.verdict == Verdict.CLEAN
    assert len(capture_server.messages) == 2


def test_a_deferral_writes_the_held_verdict_then_the_outcome(received, capture_server):
    """The downstream answers 451: the verdict is written first (the recipient claimed with it), then the
    deferral under that claim."""
    capture_server.handler.data_script.append("451 4.3.0 try later")
    msg = received()
    assert scan_run.run_scan(msg.pk) == Verdict.CLEAN
    msg.refresh_from_db()
    (recipient,) = msg.recipients.all()
    assert (msg.state, msg.verdict, msg.scanned_at is not None) == (Message.State.DELIVERING, Verdict.CLEAN, True)
    assert (recipient.status, recipient.reply_code, recipient.attempts) == (Recipient.Status.DEFERRED, 451, 1)
    assert recipient.claimed_at is None and recipient.verdict == Verdict.CLEAN and recipient.next_attempt_at


def test_a_claim_lost_during_the_delivery_records_nothing(received, capture_server, monkeypatch, caplog):
    """The sweeper judged the scan's claim stale and another worker claimed the message while this one
    delivered it: this pass writes neither verdict nor outcome over the other worker's claim."""

    if connection.vendor != "postgresql":
        pytest.skip("the verdict is held back on PostgreSQL only; elsewhere it is written before the delivery")
    msg = received()
    theirs = timezone.now()
    send_to = delivery_attempt.DeliveryAttempt._send_to

    def meanwhile(self, destination, group, data):
        Message.objects.filter(pk=msg.pk).update(claimed_at=theirs)
        return send_to(self, destination, group, data)

    monkeypatch.setattr(delivery_attempt.DeliveryAttempt, "_send_to", meanwhile)
    scan_run.run_scan(msg.pk)
    msg.refresh_from_db()
    (recipient,) = msg.recipients.all()
    assert (msg.state, msg.claimed_at, msg.verdict) == (Message.State.SCANNING, theirs, "")
    assert (recipient.status, recipient.attempts, recipient.verdict) == (Recipient.Status.PENDING, 0, "")
    assert len(capture_server.messages) == 1
    assert "the scan's claim was lost during its delivery" in caplog.text


def test_a_scan_claim_near_staleness_is_written_before_the_smtp_transaction(received, capture_server,
                                                                             monkeypatch):

    if connection.vendor != "postgresql":
        pytest.skip("the verdict is held back on PostgreSQL only")
    ages = iter([True, False])  # fresh when the scan ends, near stale before the connection
    monkeypatch.setattr(scan_record.HeldVerdict, "fresh", lambda self: next(ages))
    seen = []
    send_to = delivery_attempt.DeliveryAttempt._send_to

    def watched(self, destination, group, data):
        seen.append(list(Recipient.objects.filter(message=msg).values_list("status", "verdict")))
        return send_to(self, destination, group, data)

    monkeypatch.setattr(delivery_attempt.DeliveryAttempt, "_send_to", watched)
    msg = received()
    scan_run.run_scan(msg.pk)
    assert seen == [[(Recipient.Status.DELIVERING, Verdict.CLEAN)]]
    msg.refresh_from_db()
    assert msg.state == Message.State.DELIVERED and msg.recipients.get().status == Recipient.Status.DELIVERED


def test_recipients_already_done_are_left_as_they_are(received, capture_server):
    """Only carol is pending (bob was delivered before): she is delivered, the message's state follows
    from both."""
    msg = received(to=("bob@example.org", "carol@example.org"))
    Recipient.objects.filter(message=msg, address="bob@example.org").update(
        status=Recipient.Status.DELIVERED, reply_code=250, attempts=1)
    scan_run.run_scan(msg.pk)
    msg.refresh_from_db()
    statuses = dict(msg.recipients.values_list("address", "status"))
    assert statuses == {"bob@example.org": Recipient.Status.DELIVERED, "carol@example.org": Recipient.Status.DELIVERED}
    assert msg.state == Message.State.DELIVERED and msg.verdict == Verdict.CLEAN
    assert [m.recipients for m in capture_server.messages] == [["carol@example.org"]]


def test_a_delivery_is_recorded_once_the_database_answers_again(received, capture_server, monkeypatch, caplog):
    """The database stops answering just after the SMTP transaction: the record of what went is written
    again until it succeeds, so the mail is not sent a second time once its claim is stale."""
    from django.db import OperationalError

    from gateway.db import statements
    from gateway.delivery import record as delivery_record

    monkeypatch.setattr(delivery_record.time, "sleep", lambda seconds: None)
    failures = {"held": 1, "deferral": 1}
    write_delivered, write_outcome = scan_record.HeldVerdict.write_delivered, statements.write_outcome

    def down_once(kind):
        if failures[kind]:
            failures[kind] -= 1
            raise OperationalError("server closed the connection unexpectedly")

    def flaky_write_delivered(self, *args):
        down_once("held")
        return write_delivered(self, *args)

    def flaky_write_outcome(ids, claimed_at, outcome):
        if outcome.get("status") == Recipient.Status.DEFERRED:
            down_once("deferral")
        return write_outcome(ids, claimed_at, outcome)

    monkeypatch.setattr(scan_record.HeldVerdict, "write_delivered", flaky_write_delivered)
    monkeypatch.setattr(statements, "write_outcome", flaky_write_outcome)
    delivered = received()
    scan_run.run_scan(delivered.pk)
    capture_server.handler.data_script.append("451 4.3.0 try later")
    deferred = received()
    scan_run.run_scan(deferred.pk)
    delivered.refresh_from_db()
    deferred.refresh_from_db()
    assert (delivered.state, delivered.recipients.get().status) == (Message.State.DELIVERED,
                                                                     Recipient.Status.DELIVERED)
    assert (deferred.state, deferred.recipients.get().status) == (Message.State.DELIVERING, Recipient.Status.DEFERRED)
    assert failures["deferral"] == 0 and caplog.text.count("recording its delivery failed") >= 1
    if connection.vendor == "postgresql":
        assert failures["held"] == 0 and caplog.text.count("recording its delivery failed") == 2
    assert len(capture_server.messages) == 1


def test_a_held_verdict_committed_before_the_connection_dropped_is_not_written_again(received, capture_server,
                                                                                      monkeypatch):
    """The verdict's statement was committed but its answer never came: the second try finds it written
    (and does not take the message for one without pending recipients)."""
    from django.db import OperationalError

    from gateway.delivery import record as delivery_record

    if connection.vendor != "postgresql":
        pytest.skip("the verdict is held back on PostgreSQL only")
    monkeypatch.setattr(delivery_record.time, "sleep", lambda seconds: None)
    in_one_statement, dropped = scan_record._in_one_statement, []

    def answer_lost(*args):
        result = in_one_statement(*args)
        if not dropped:
            dropped.append(result)
            raise OperationalError("server closed the connection unexpectedly")
        return result

    monkeypatch.setattr(scan_record, "_in_one_statement", answer_lost)
    capture_server.handler.data_script.append("451 4.3.0 try later")
    msg = received()
    scan_run.run_scan(msg.pk)
    msg.refresh_from_db()
    (recipient,) = msg.recipients.all()
    assert dropped and (msg.state, msg.verdict) == (Message.State.DELIVERING, Verdict.CLEAN)
    assert (recipient.status, recipient.attempts, recipient.reply_code) == (Recipient.Status.DEFERRED, 1, 451)
    assert msg.raw.data


def test_a_message_is_scanned_once_and_a_missing_one_is_gone(received):
    msg = received()
    assert scan_run.claim_scan(msg.pk) is not None
    # Claimed (state scanning): a second task for the same message leaves it alone.
    assert scan_run.claim_scan(msg.pk) is None
    assert scan_run.run_scan(msg.pk) == "taken"
    assert scan_run.run_scan(10**9) == "gone"
    msg.refresh_from_db()
    assert (msg.state, msg.attempts) == (Message.State.SCANNING, 1)


def test_a_stale_scan_claim_writes_no_verdict(received, capture_server):
    msg = received()
    claimed, raw, count, pending = scan_run.claim_scan(msg.pk)
    assert (raw, count) == (bytes(msg.raw.data), 1)
    outcome = scan_verdict.scan(claimed, raw, MailFlowSettings.cached())
    # Meanwhile the sweeper judged the claim stale and another worker claimed the message again.
    Message.objects.filter(pk=msg.pk).update(claimed_at=timezone.now())
    assert scan_record.apply_verdict(claimed, outcome, MailFlowSettings.cached()) is None
    msg.refresh_from_db()
    (recipient,) = msg.recipients.all()
    assert msg.state == Message.State.SCANNING and msg.verdict == ""
    assert (recipient.status, recipient.verdict, recipient.claimed_at) == (Recipient.Status.PENDING, "", None)
    assert capture_server.messages == []


def test_a_delivery_claim_moves_each_due_recipient_once(received):
    msg = received(to=("bob@example.org", "carol@example.org"))
    Message.objects.filter(pk=msg.pk).update(state=Message.State.DELIVERING)
    Recipient.objects.filter(message=msg).update(next_attempt_at=timezone.now())
    first, second = DeliveryAttempt(msg), DeliveryAttempt(msg)
    claimed = first.claim()
    assert [r.address for r in claimed] == ["bob@example.org", "carol@example.org"]
    assert all(r.status == Recipient.Status.DELIVERING and r.claimed_at == first.now for r in claimed)
    assert second.claim() == []


def test_a_list_entry_gives_recipients_their_own_verdict(received, capture_server):
    from gateway.models import SenderListEntry

    msg = received(to=("bob@example.org", "carol@example.org"))
    SenderListEntry.objects.create(kind="block", scope="global", sender="alice@sender.example")
    Recipient.objects.filter(message=msg, address="bob@example.org").update(status=Recipient.Status.DELIVERED)
    scan_run.run_scan(msg.pk)
    msg.refresh_from_db()
    statuses = dict(msg.recipients.values_list("address", "status"))
    # bob's row was no longer pending: the scan leaves it; carol's sender is blocked: held.
    assert statuses == {"bob@example.org": Recipient.Status.DELIVERED,
                        "carol@example.org": Recipient.Status.QUARANTINED}
    assert (msg.state, msg.verdict, msg.quarantined) == (Message.State.QUARANTINED, Verdict.BLOCKED_SENDER, True)
    assert capture_server.messages == []


def test_a_partial_failure_reads_the_recipients_back_and_sends_a_dsn(received, capture_server):
    capture_server.handler.rcpt_script["carol@example.org"] = ["550 5.1.1 no such user"]
    msg = received(to=("bob@example.org", "carol@example.org"))
    scan_run.run_scan(msg.pk)
    msg.refresh_from_db()
    statuses = dict(msg.recipients.values_list("address", "status"))
    assert statuses == {"bob@example.org": Recipient.Status.DELIVERED, "carol@example.org": Recipient.Status.BOUNCED}
    assert msg.state == Message.State.PARTIAL
    assert msg.recipients.get(address="carol@example.org").dsn_sent
    assert [m.recipients for m in capture_server.messages] == [["bob@example.org"]]


def test_the_statements_of_the_path_are_prepared_once_per_connection(received, settings):
    from tests.support.services import require_postgres

    require_postgres()  # server-side prepared statements are PostgreSQL's

    def prepared() -> set[str]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement FROM pg_prepared_statements")
            return {row[0] for row in cursor.fetchall()}

    before = prepared()
    for _ in range(2):
        assert scan_run.run_scan(received().pk) == Verdict.CLEAN
    new = prepared() - before
    # The scan claim, the verdict with the outcome and the final state: prepared once and reused for the
    # second message (psycopg keys them by text and parameter types).
    assert len(new) == 2 and all(text.startswith(("UPDATE", "WITH")) for text in new), new
    settings.DB_PREPARED_STATEMENTS = False
    assert scan_run.run_scan(received().pk) == Verdict.CLEAN
    assert prepared() - before == new


def _scanned_and_claimed(msg: Message):
    claimed_message, raw, count, _ = scan_run.claim_scan(msg.pk)
    config = MailFlowSettings.cached()
    applied = scan_record.apply_verdict(claimed_message, scan_verdict.scan(claimed_message, raw, config), config)
    assert applied.deliver and [r.status for r in applied.claimed] == [Recipient.Status.DELIVERING]
    return claimed_message, raw, count, applied.claimed


def test_the_last_outcome_leaves_a_state_someone_else_set(received, capture_server):

    msg = received()
    claimed_message, raw, count, claimed = _scanned_and_claimed(msg)
    Message.objects.filter(pk=msg.pk).update(state=Message.State.QUARANTINED)  # an administrator, meanwhile
    delivery_attempt.deliver(claimed_message, raw, recipient_count=count, claimed=claimed)
    msg.refresh_from_db()
    assert msg.state == Message.State.QUARANTINED
    assert msg.recipients.get().status == Recipient.Status.DELIVERED


def test_an_outcome_is_not_recorded_over_a_claim_another_worker_holds(received, capture_server):

    msg = received()
    claimed_message, raw, count, claimed = _scanned_and_claimed(msg)
    # The sweeper judged the claim stale and another worker claimed the recipient again.
    theirs = timezone.now()
    Recipient.objects.filter(message=msg).update(claimed_at=theirs)
    delivery_attempt.deliver(claimed_message, raw, recipient_count=count, claimed=claimed)
    msg.refresh_from_db()
    (recipient,) = msg.recipients.all()
    assert (recipient.status, recipient.claimed_at, recipient.attempts) == (Recipient.Status.DELIVERING, theirs, 0)
    assert msg.state == Message.State.DELIVERING


def test_a_session_is_kept_for_the_next_message_and_replaced_when_stale(received, capture_server, monkeypatch):
    from gateway.delivery import client as delivery_client

    scan_run.run_scan(received().pk)
    ((destination, (kept, _, uses)),) = delivery_client._session_cache().items()
    assert (destination.port, uses) == (capture_server.port, 1)
    scan_run.run_scan(received().pk)
    assert delivery_client._session_cache()[destination][0] is kept  # no new connection, greeting, EHLO
    # The server closed the kept session meanwhile: the next message goes on a new one, once.
    kept.close()
    scan_run.run_scan(received().pk)
    replaced, _, uses = delivery_client._session_cache()[destination]
    assert replaced is not kept and uses == 1
    # Idle too long: not used again.
    monkeypatch.setattr(delivery_client, "SESSION_IDLE_SECONDS", 0.0)
    scan_run.run_scan(received().pk)
    assert delivery_client._session_cache()[destination][0] is not replaced
    assert len(capture_server.messages) == 4
    assert set(Message.objects.values_list("state", flat=True)) == {Message.State.DELIVERED}


def test_with_lists_the_recipients_to_deliver_are_claimed_with_their_verdict(received, capture_server):
    """A domain's block entry holds its recipient; the other one is claimed in the verdict's write and
    delivered in the same task."""
    from gateway.models import Domain, SenderListEntry

    org = Domain.objects.get(name="example.org")
    net = Domain.objects.create(name="example.net", route=org.route)
    SenderListEntry.objects.create(kind="block", scope="domain", domain=net, sender="alice@sender.example")
    msg = received(to=("bob@example.org", "carol@example.net"))
    scan_run.run_scan(msg.pk)
    msg.refresh_from_db()
    statuses = dict(msg.recipients.values_list("address", "status"))
    assert statuses == {"bob@example.org": Recipient.Status.DELIVERED,
                        "carol@example.net": Recipient.Status.QUARANTINED}
    assert (msg.state, msg.quarantined) == (Message.State.QUARANTINED, True)
    assert [m.recipients for m in capture_server.messages] == [["bob@example.org"]]
    assert msg.recipients.get(address="bob@example.org").attempts == 1


@pytest.mark.django_db
def test_the_snapshots_follow_a_change_saved_in_this_process():
    """The routes, the settings and 'are there list entries' are read once per CONFIG_CACHE_SECONDS, but
    a change saved in this process is seen at once."""
    from gateway.delivery.routing import active_routes
    from gateway.models import Domain, Route, SenderListEntry
    from gateway.policy.lists import lists_are_empty

    assert "example.com" not in active_routes() and lists_are_empty()
    route = Route.objects.create(name="store", host="127.0.0.1", port=2525)
    Domain.objects.create(name="example.com", route=route)
    assert active_routes()["example.com"].route.port == 2525
    route.port = 2526
    route.save()
    assert active_routes()["example.com"].route.port == 2526
    SenderListEntry.objects.create(kind="block", scope="global", sender="x@y.example")
    assert not lists_are_empty()
    config = MailFlowSettings.cached()
    config.spam_threshold = 7.5
    config.save()
    assert MailFlowSettings.cached().spam_threshold == 7.5


@pytest.mark.django_db
def test_the_log_tables_carry_no_pattern_matching_indexes():
    """Every index on the message and recipient rows takes a new entry at each of their writes; the
    varchar_pattern_ops copies Django adds for `startswith` serve no query here (gateway 0004)."""
    from importlib import import_module

    from tests.support.services import require_postgres

    require_postgres()
    migration = import_module("gateway.migrations.0004_drop_pattern_indexes")
    with connection.cursor() as cursor:
        assert migration.pattern_indexes(cursor) == []
        # A Django-made pattern index is found, so that the migration has something to find.
        cursor.execute("CREATE INDEX gateway_message_subject_probe_like ON gateway_message "
                       "(subject varchar_pattern_ops)")
        assert migration.pattern_indexes(cursor) == ["gateway_message_subject_probe_like"]
