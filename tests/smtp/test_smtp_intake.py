"""The SMTP server with a real client (smtplib): what it accepts, what it refuses and with which code,
and that every accepted message and every refusal is in the mail log."""


import pytest

from gateway.models import MailFlowSettings, Message, RawMessage, TrustedNetwork
from gateway.smtp.protocol import with_enhanced_code

pytestmark = pytest.mark.usefixtures("scanners_off")

HAM = (b"From: Alice <alice@sender.example>\r\nTo: bob@example.org\r\nSubject: Lunch\r\n"
       b"Message-ID: <lunch-1@sender.example>\r\n\r\nShall we meet at noon?\r\n")


def test_ehlo_advertises_the_extensions(gateway_smtp, protected_domain):
    with gateway_smtp.client() as client:
        code, _ = client.ehlo()
        assert code == 250
        for extension in ("size", "8bitmime", "pipelining", "smtputf8", "enhancedstatuscodes"):
            assert client.has_extn(extension), extension
        assert int(client.esmtp_features["size"]) == MailFlowSettings.load().max_message_size


def test_accepted_message_is_stored_whole_and_logged(gateway_smtp, protected_domain, capture_server):
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("alice@sender.example")
        client.rcpt("bob@example.org")
        code, reply = client.data(HAM)
    assert code == 250
    assert reply.startswith(b"2.0.0 Ok: queued as ")
    queue_id = reply.decode().rsplit(" ", 1)[1]
    message = Message.objects.get(queue_id=queue_id)
    assert bytes(RawMessage.objects.get(message=message).data) == HAM
    assert message.envelope_sender == "alice@sender.example"
    assert message.header_from == "Alice <alice@sender.example>"
    assert message.subject == "Lunch"
    assert message.message_id == "<lunch-1@sender.example>"
    assert message.helo == "client.example.net"
    assert message.client_ip == "127.0.0.1"
    assert message.size == len(HAM)
    assert [r.address for r in message.recipients.all()] == ["bob@example.org"]
    # Scanners are off here: the message was delivered, and the log says what was not scanned.
    delivered = capture_server.wait_for(1)
    assert delivered[0].data.endswith(HAM)
    message.refresh_from_db()
    assert message.state == Message.State.DELIVERED
    assert "virus scan off: CLAMD_URL is not configured" in message.scan_notes
    assert "spam scan off: SPAMD_URL is not configured" in message.scan_notes


def test_open_relay_refused_and_logged(gateway_smtp, protected_domain):
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("spammer@outside.example")
        code, reply = client.rcpt("victim@foreign.example")
    assert code == 550
    assert reply.startswith(b"5.7.1")
    refused = Message.objects.get(state=Message.State.REFUSED)
    assert refused.refusal_reason == Message.Refusal.RELAY_DENIED
    assert refused.envelope_sender == "spammer@outside.example"
    assert refused.recipients.get().address == "victim@foreign.example"
    assert refused.smtp_reply.startswith("550 5.7.1")


def test_trusted_network_may_relay(gateway_smtp, protected_domain):
    TrustedNetwork.objects.create(network="127.0.0.0/8")
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("app@example.org")
        code, _ = client.rcpt("someone@foreign.example")
    assert code == 250


@pytest.mark.parametrize("address", [
    "user%foreign.example@example.org", "foreign.example!user@example.org", '"user@foreign.example"@example.org',
    "@example.org:user@foreign.example", "user@[192.0.2.1]",
])
def test_relay_tricks_refused(gateway_smtp, protected_domain, address):
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("spammer@outside.example")
        code, reply = client.docmd(f"RCPT TO:<{address}>")
    assert code in (550, 553), reply
    assert Message.objects.filter(state=Message.State.REFUSED).count() == 1


def test_recipient_domain_case_and_trailing_dot_are_ours(gateway_smtp, protected_domain):
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("alice@sender.example")
        assert client.rcpt("Bob@Example.ORG.")[0] == 250


def test_unknown_user_refused_when_the_domain_lists_its_users(gateway_smtp, protected_domain):
    protected_domain.recipient_check = "list"
    protected_domain.save()
    protected_domain.valid_recipients.create(address="bob@example.org")
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("alice@sender.example")
        assert client.rcpt("bob@example.org")[0] == 250
        code, reply = client.rcpt("nobody@example.org")
        assert (code, reply[:5]) == (550, b"5.1.1")
        assert client.rcpt("postmaster@example.org")[0] == 250
    assert Message.objects.get(state="refused").refusal_reason == "unknown_user"


def test_over_size_refused_at_mail_and_at_data(gateway_smtp, protected_domain):
    config = MailFlowSettings.load()
    config.max_message_size = 2000
    config.save()
    from gateway.policy.config import ServerConfigCache  # noqa: F401  (the server reloads within its TTL)

    gateway_smtp.stop()
    from tests.support.servers import GatewayServer

    server = GatewayServer().start()
    try:
        with server.client() as client:
            client.ehlo()
            code, reply = client.docmd("MAIL FROM:<alice@sender.example> SIZE=50000")
            assert (code, reply[:5]) == (552, b"5.3.4")
            client.rset()
            client.mail("alice@sender.example")
            client.rcpt("bob@example.org")
            code, reply = client.data(HAM + (b"x" * 70 + b"\r\n") * 50)
            assert (code, reply[:5]) == (552, b"5.3.4")
    finally:
        server.stop()
    assert Message.objects.filter(refusal_reason="over_size").count() == 2
    assert not Message.objects.exclude(state="refused").exists()


def test_sender_syntax(gateway_smtp, protected_domain):
    with gateway_smtp.client() as client:
        client.ehlo()
        assert client.docmd("MAIL FROM:<tom@example>")[0] == 550
        assert client.docmd("MAIL FROM:<user@192.0.2.6>")[0] == 553
        assert client.docmd("MAIL FROM:<>")[0] == 250  # bounces must get through


def test_null_sender_and_many_recipients(gateway_smtp, protected_domain, capture_server):
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("")
        for n in range(5):
            assert client.rcpt(f"user{n}@example.org")[0] == 250
        assert client.data(HAM)[0] == 250
    message = Message.objects.get()
    assert message.envelope_sender == ""
    assert message.recipients.count() == 5
    assert capture_server.wait_for(1)[0].recipients == [f"user{n}@example.org" for n in range(5)]


def test_database_down_answers_451_and_the_retry_is_stored(gateway_smtp, protected_domain, monkeypatch):
    """The database does not answer (here: its port is closed): 451 4.3.0, nothing stored; the client keeps
    the message, and its retry once the database is back is stored once."""
    from django.db import connections

    from tests.support.servers import free_port
    from tests.support.services import require_postgres

    require_postgres()
    settings_dict = connections.settings["default"]
    monkeypatch.setitem(settings_dict, "HOST", "127.0.0.1")
    monkeypatch.setitem(settings_dict, "PORT", str(free_port()))
    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail("alice@sender.example")
        client.rcpt("bob@example.org")
        code, reply = client.data(HAM)
        assert (code, reply[:5]) == (451, b"4.3.0")
        assert not Message.objects.exclude(state="refused").exists()
        monkeypatch.undo()
        client.rset()
        client.mail("alice@sender.example")
        client.rcpt("bob@example.org")
        code, reply = client.data(HAM)
    assert code == 250, reply
    assert Message.objects.exclude(state="refused").count() == 1


def test_lost_database_connection_costs_at_most_one_retry(gateway_smtp, protected_domain):
    """PostgreSQL restarted, or the intake's connection killed: the message in hand may get 451 (the client
    keeps it), the next ones are stored on a new connection; every 250 is a stored message."""
    from django.db import connection

    from tests.support.services import require_postgres

    require_postgres()

    def send() -> int:
        with gateway_smtp.client() as client:
            client.ehlo()
            client.mail("alice@sender.example")
            client.rcpt("bob@example.org")
            return client.data(HAM)[0]

    assert send() == 250
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name = 'mailgate smtp intake' AND datname = current_database()")
        assert cursor.fetchall(), "the intake's own connection was not found"
    codes = [send() for _ in range(3)]
    assert codes[0] in (250, 451) and codes[1:] == [250, 250]
    assert Message.objects.exclude(state="refused").count() == 1 + codes.count(250)


def test_pipelined_session(gateway_smtp, protected_domain):
    """A client that sends MAIL, RCPT, RCPT and DATA in one packet gets the replies in order."""
    import socket

    with socket.create_connection(("127.0.0.1", gateway_smtp.port), timeout=30) as sock:
        stream = sock.makefile("rwb")
        stream.readline()
        stream.write(b"EHLO client.example.net\r\n")
        stream.flush()
        while not stream.readline().startswith(b"250 "):
            pass
        stream.write(b"MAIL FROM:<alice@sender.example>\r\nRCPT TO:<bob@example.org>\r\n"
                     b"RCPT TO:<x@foreign.example>\r\nDATA\r\n")
        stream.flush()
        replies = [stream.readline()[:3] for _ in range(4)]
        assert replies == [b"250", b"250", b"550", b"354"]
        stream.write(HAM + b".\r\nQUIT\r\n")
        stream.flush()
        assert stream.readline().startswith(b"250 2.0.0")


def test_enhanced_codes_added_to_aiosmtpd_replies():
    assert with_enhanced_code("552 Error: Too much mail data") == "552 5.3.4 Message too big"
    assert with_enhanced_code("503 Error: need RCPT command") == "503 5.5.1 Need RCPT command first"
    assert with_enhanced_code("501 Syntax: MAIL FROM: <address>") == "501 5.5.4 Syntax: MAIL FROM: <address>"
    assert with_enhanced_code("250 2.1.0 Sender OK") == "250 2.1.0 Sender OK"
    assert with_enhanced_code("220 host ESMTP") == "220 host ESMTP"
    assert with_enhanced_code("250 HELP") == "250 HELP"  # the last EHLO line is a keyword, not a reply text


def test_smtputf8_address(gateway_smtp, protected_domain, capture_server):
    with gateway_smtp.client() as client:
        client.ehlo()
        code, _ = client.mail("jörg@sender.example", ["SMTPUTF8"])
        assert code == 250
        assert client.rcpt("bob@example.org")[0] == 250
        assert client.data(HAM)[0] == 250
    message = Message.objects.get()
    assert message.envelope_sender == "jörg@sender.example"
    assert "SMTPUTF8" in message.mail_options
