"""How accepted messages are written: group commit (gateway.smtp.writer), with PostgreSQL's one-statement
writer and the ORM's writer for other databases, and the per-connection set-up of the SMTP protocol."""

import asyncio
import smtplib
import threading

import pytest
from django.db import DatabaseError, DataError

from gateway.intake.rows import Arrival
from gateway.intake.writer import GroupCommit, IntakeWriter, PostgresIntakeWriter
from gateway.models import Message, RawMessage
from tests.support.services import require_postgres

pytestmark = pytest.mark.usefixtures("scanners_off")


def message(n: int) -> bytes:
    return (f"From: Sender {n} <s{n}@sender.example>\r\nTo: bob@example.org\r\nSubject: Number {n}\r\n"
            f"Message-ID: <{n}@sender.example>\r\n\r\nBody {n}\r\n").encode()


def envelope(n: int, recipients: int = 1) -> Arrival:
    return Arrival(client_ip="192.0.2.7", client_name="mail.sender.example", helo="mail.sender.example",
                    sender=f"s{n}@Sender.example", recipients=[f"user{r}@Example.org" for r in range(recipients)],
                    mail_options=["BODY=8BITMIME"], checks={"spf": {"result": "pass"}},
                    added_headers="Received-SPF: pass\r\n")


# --- group commit ------------------------------------------------------------------------------------------

def test_messages_arriving_during_a_commit_share_the_next_one():
    batches: list[list[int]] = []

    async def write(items):
        batches.append(list(items))
        await asyncio.sleep(0.05)  # a commit in flight
        return [item * 10 for item in items]

    async def main():
        group = GroupCommit(write, alone=lambda exc: True)
        first = asyncio.ensure_future(group.submit(0))
        await asyncio.sleep(0.01)  # the first write has started
        rest = await asyncio.gather(*(group.submit(n) for n in range(1, 8)))
        return [await first, *rest]

    assert asyncio.run(main()) == [n * 10 for n in range(8)]
    assert batches == [[0], list(range(1, 8))]


def test_a_write_holds_a_bounded_amount_of_message_data():
    batches: list[list[int]] = []

    async def write(items):
        batches.append(list(items))
        await asyncio.sleep(0.02)
        return list(items)

    async def main():
        group = GroupCommit(write, alone=lambda exc: True, size=lambda item: item, max_bytes=100)
        first = asyncio.ensure_future(group.submit(1))
        await asyncio.sleep(0.005)
        rest = await asyncio.gather(*(group.submit(n) for n in (60, 30, 20, 500, 5)))
        return [await first, *rest]

    assert asyncio.run(main()) == [1, 60, 30, 20, 500, 5]
    assert batches == [[1], [60, 30], [20], [500], [5]]  # a message larger than the bound goes alone


def test_a_refused_value_fails_only_its_own_message():
    async def write(items):
        if 3 in items:
            raise DataError("value refused")
        return list(items)

    async def main():
        group = GroupCommit(write, alone=lambda exc: isinstance(exc, DataError))
        return await asyncio.gather(*(group.submit(n) for n in range(6)), return_exceptions=True)

    results = asyncio.run(main())
    assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
    assert isinstance(results[3], DataError)


def test_a_lost_database_fails_the_batch_at_once():
    calls = []

    async def write(items):
        calls.append(list(items))
        await asyncio.sleep(0.05)
        raise DatabaseError("connection refused")

    async def main():
        group = GroupCommit(write, alone=lambda exc: isinstance(exc, DataError))
        first = asyncio.ensure_future(group.submit(0))
        await asyncio.sleep(0.01)
        rest = await asyncio.gather(*(group.submit(n) for n in range(1, 5)), return_exceptions=True)
        return [*(await asyncio.gather(first, return_exceptions=True)), *rest]

    results = asyncio.run(main())
    assert all(isinstance(r, DatabaseError) for r in results)
    assert calls == [[0], [1, 2, 3, 4]]  # no one-by-one retries against a database that is not there


# --- the writers against the test database ------------------------------------------------------------------

def store_concurrently(writer: IntakeWriter, count: int, recipients: int):
    async def main():
        stored = await asyncio.gather(*(writer.store(envelope(n, recipients), message(n)) for n in range(count)))
        await writer.close()
        return stored

    return asyncio.run(main())


def check_stored(stored, recipients: int) -> None:
    assert len({s.queue_id for s in stored}) == len(stored)
    for n, entry in enumerate(stored):
        row = Message.objects.get(pk=entry.id)
        assert row.queue_id == entry.queue_id
        assert (row.state, row.direction, row.node) == ("received", "inbound", "test")
        assert row.envelope_sender == f"s{n}@Sender.example" and row.sender_domain == "sender.example"
        assert (row.header_from, row.subject, row.message_id) == (
            f"Sender {n} <s{n}@sender.example>", f"Number {n}", f"<{n}@sender.example>")
        assert row.client_ip == "192.0.2.7" and row.helo == "mail.sender.example"
        assert row.size == len(message(n)) and row.mail_options == ["BODY=8BITMIME"]
        assert row.checks == {"spf": {"result": "pass"}}
        assert row.spam_rules == [] and row.quarantined is False and row.attempts == 0
        assert row.added_headers.startswith("Received: from mail.sender.example (mail.sender.example [192.0.2.7])")
        assert f" id {row.queue_id}" in row.added_headers
        assert row.added_headers.endswith("Received-SPF: pass\r\n")
        assert bytes(RawMessage.objects.get(message=row).data) == message(n)
        assert sorted(row.recipients.values_list("address", "domain", "status")) == [
            (f"user{r}@example.org", "example.org", "pending") for r in range(recipients)]
        # A user's mail is paged by the recipient's own copy of the time (reports' migration 0005).
        assert set(row.recipients.values_list("received_at", flat=True)) == {row.received_at}


def run_sync(func, *args):
    return asyncio.to_thread(func, *args)


@pytest.mark.django_db(transaction=True)
def test_postgresql_writer_stores_a_batch_in_one_statement(settings):
    require_postgres()
    settings.NODE_NAME = "test"
    writer = PostgresIntakeWriter(run_sync)
    stored = store_concurrently(writer, 12, recipients=3)
    check_stored(stored, recipients=3)


@pytest.mark.parametrize("prepared", [True, False])
@pytest.mark.django_db(transaction=True)
def test_postgresql_writer_prepares_its_statement_unless_told_not_to(settings, prepared):
    """Prepared once per connection (parsing and planning the statement for every batch cost more than
    running it); not with DB_PREPARED_STATEMENTS off, for a pooler that cannot keep prepared statements.
    The raw bytes, sent in binary, come back byte for byte, every byte value included."""
    require_postgres()
    settings.NODE_NAME = "test"
    settings.DB_PREPARED_STATEMENTS = prepared
    raw = message(1) + bytes(range(256)) + b"\r\n"

    async def main():
        writer = PostgresIntakeWriter(run_sync)
        stored = [await writer.store(envelope(n), raw) for n in range(3)]
        cursor = await writer._connection.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'WITH d AS %%'")
        (count,) = await cursor.fetchone()
        await writer.close()
        return stored, count

    stored, count = asyncio.run(main())
    assert count == (1 if prepared else 0)
    assert [bytes(RawMessage.objects.get(message_id=s.id).data) for s in stored] == [raw] * 3


@pytest.mark.django_db(transaction=True)
def test_orm_writer_stores_a_batch_in_one_transaction(settings):
    settings.NODE_NAME = "test"
    writer = IntakeWriter(run_sync)
    stored = store_concurrently(writer, 12, recipients=2)
    check_stored(stored, recipients=2)


@pytest.mark.django_db(transaction=True)
def test_the_writer_follows_the_database():
    from django.db import connection

    writer = IntakeWriter.for_database(run_sync)
    assert isinstance(writer, PostgresIntakeWriter) == (connection.vendor == "postgresql")


# --- through SMTP ----------------------------------------------------------------------------------------------

def test_many_clients_at_once_each_get_their_own_queue_id(gateway_smtp, protected_domain):
    """Twenty sessions in parallel: every 250 names a stored message with its own bytes."""
    replies: dict[int, bytes] = {}

    def send(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", gateway_smtp.port, timeout=30) as client:
            client.ehlo("client.example.net")
            client.mail(f"s{n}@sender.example")
            client.rcpt("bob@example.org")
            code, reply = client.data(message(n))
            assert code == 250
            replies[n] = reply

    threads = [threading.Thread(target=send, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(replies) == 20
    for n, reply in replies.items():
        row = Message.objects.get(queue_id=reply.decode().rsplit(" ", 1)[1])
        assert bytes(row.raw.data) == message(n)
        assert row.envelope_sender == f"s{n}@sender.example"


def test_nul_and_raw_utf8_in_headers_are_logged_readably(gateway_smtp, protected_domain):
    """PostgreSQL's text cannot hold NUL: the log shows U+FFFD instead, and the message is stored whole."""
    data = ("From: Jürgen <j@sender.example>\r\nTo: bob@example.org\r\nSubject: Grüße\x00 aus Köln\r\n\r\nHallo\r\n"
            ).encode()
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("j@sender.example")
        client.rcpt("bob@example.org")
        code, reply = client.data(data)
    assert code == 250, reply
    row = Message.objects.get(queue_id=reply.decode().rsplit(" ", 1)[1])
    assert row.subject == "Grüße\ufffd aus Köln"
    assert row.header_from == "Jürgen <j@sender.example>"
    assert bytes(row.raw.data) == data


def test_nul_in_a_refused_session_is_logged_readably(gateway_smtp, protected_domain):
    """The refusal log has the same limits: a HELO with NUL, refused at RCPT (relay denied), is logged."""
    with gateway_smtp.client() as client:
        assert client.ehlo("bad\x00name.example")[0] == 250
        client.mail("j@sender.example")
        code, _ = client.rcpt("someone@elsewhere.example")
    assert code == 550
    row = Message.objects.get(state="refused")
    assert row.helo == "bad\ufffdname.example" and row.refusal_reason == "relay_denied"


# --- the protocol's set-up per connection ----------------------------------------------------------------------

def test_protocol_set_up_matches_aiosmtpd():
    """GatewaySMTP builds itself without aiosmtpd's per-connection introspection: the result must be what
    aiosmtpd's own SMTP.__init__ makes of the same options (this fails when an aiosmtpd upgrade changes it)."""
    from aiosmtpd.smtp import SMTP

    from gateway.smtp.handler import GatewayHandler
    from gateway.smtp.protocol import GatewaySMTP

    async def build():
        handler = GatewayHandler()
        options = dict(hostname="mx.example.org", ident="Mailgate ESMTP", data_size_limit=1234,
                       timeout=60, tls_context=None, require_starttls=False)
        ours = GatewaySMTP(handler, **options)
        theirs = GatewaySMTP.__new__(GatewaySMTP)
        theirs.gateway, theirs.mode, theirs.conn = handler, "mx", None
        SMTP.__init__(theirs, handler, auth_require_tls=False, enable_SMTPUTF8=True, decode_data=False,
                      **options)
        return ours, theirs

    ours, theirs = asyncio.run(build())
    assert set(vars(ours)) == set(vars(theirs))
    differ = {"_stream_reader_wr", "_strong_reader", "_closed", "_drain_waiters", "_source_traceback"}
    for name, value in vars(theirs).items():
        if name in differ:
            continue
        mine = getattr(ours, name)
        if name == "_handle_hooks":
            assert mine == value, name  # bound to the same handler
        elif name == "_smtp_methods":
            assert {k: v.__func__ for k, v in mine.items()} == {k: v.__func__ for k, v in value.items()}
            assert all(v.__self__ is ours for v in mine.values())
        elif name == "_auth_methods":
            assert {k: (v.method.__func__, v.is_builtin) for k, v in mine.items()} == {
                k: (v.method.__func__, v.is_builtin) for k, v in value.items()}
            assert all(v.method.__self__ is (ours if v.is_builtin else ours.gateway) for v in mine.values())
        elif name == "_client_connected_cb":
            assert mine.__func__ is value.__func__
        else:
            assert mine == value, name


PLAIN_PATHS = ["<a@b.c>", "<a@b.c> SIZE=100 BODY=8BITMIME", " <Alice.Smith+tag@Example.ORG>", "<a@b> ",
               "<a@b>\t SIZE=1", "<a@b.c> <d@e>", "<a!b@c>", "<a%b@c>", "<{a}@b>", "<a'b@c.d>", "<a@b.c>>",
               "<a@-b.c>", "<user@localhost>"]
OTHER_PATHS = ["<a@b> (c) SIZE=1", "<a@b>(x)", "<a..b@c>", "<.a@b>", "<a@b..c>", "<a@[192.0.2.1]>", '<"a@b"@c>',
               "<a(comment)@b>", "<a@b.c.>", "<@x,@y:a@b>", "<ä@b.example>", "a@b.c", "<>", "<> SIZE=10"]


@pytest.mark.parametrize("argument", PLAIN_PATHS)
def test_plain_addresses_take_the_quick_path_with_aiosmtpds_result(argument):
    """The quick path for plain <local@domain> paths gives what aiosmtpd's RFC 5322 parser gives."""
    from aiosmtpd.smtp import SMTP

    from gateway.smtp.protocol import _PLAIN_PATH, GatewaySMTP

    protocol = GatewaySMTP.__new__(GatewaySMTP)
    assert _PLAIN_PATH.match(argument)
    assert GatewaySMTP._getaddr(protocol, argument) == SMTP._getaddr(protocol, argument)


@pytest.mark.parametrize("argument", OTHER_PATHS)
def test_other_addresses_go_to_the_parser(argument):
    """Comments, quoting, literals, source routes, UTF-8 and broken dot-atoms are left to aiosmtpd's parser
    (and to the server's own handling of <> and of what the parser cannot read)."""
    from gateway.smtp.protocol import _PLAIN_PATH

    assert _PLAIN_PATH.match(argument) is None
