"""The SMTP servers of the tests: a capture server standing in for the organisation's mail server, and our own
SMTP server (gateway.smtp.serve) on free ports, with the fixtures that start them.

- `capture_server`: a CaptureServer; `.messages` is what it received, `.handler` scripts failures on purpose.
- `gateway_smtp`: our SMTP server (GatewayServer), tasks run eagerly; `gateway_smtp_tls`: with the submission
  (STARTTLS + AUTH) and implicit-TLS listeners too (PolicyGatewayServer), `insecure_tls()` for its certificate.
- `protected_domain`: example.org is ours, routed to the capture server.
- `send(gateway_smtp, raw, ...)`: one message through our server, its logged Message back.

tests/conftest.py provides the fixtures to every test.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
from aiosmtpd.controller import Controller


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Captured:
    sender: str
    recipients: list[str]
    data: bytes
    options: list[str]


@dataclass
class CaptureHandler:
    """Receives like a real mail server; `script` makes chosen recipients or DATA fail on purpose."""

    messages: list[Captured] = field(default_factory=list)
    # recipient address -> replies to give to its RCPT, one per attempt; when used up, 250
    rcpt_script: dict[str, list[str]] = field(default_factory=dict)
    data_script: list[str] = field(default_factory=list)
    attempts: int = 0
    # Offer PIPELINING (RFC 2920), as most mail servers do; aiosmtpd reads pipelined commands either way.
    pipelining: bool = True

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        script = self.rcpt_script.get(address.lower())
        if script:
            return script.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.attempts += 1
        if self.data_script:
            return self.data_script.pop(0)
        self.messages.append(Captured(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                                      list(envelope.mail_options)))
        return "250 2.0.0 captured"


class CaptureServer:
    def __init__(self):
        self.handler = CaptureHandler()
        self.port = free_port()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, server_hostname="capture",
                                     data_size_limit=None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def messages(self) -> list[Captured]:
        return self.handler.messages

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Captured]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.messages


@pytest.fixture
def capture_server():
    server = CaptureServer()
    server.controller.start()
    yield server
    server.controller.stop()


class GatewayServer:
    """Our SMTP server (gateway.smtp.server.serve) in a thread with its own event loop."""

    def __init__(self):
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def _run(self) -> None:
        from gateway.smtp.serve import serve

        asyncio.set_event_loop(self.loop)

        async def main():
            self.stop_event = asyncio.Event()
            ready = asyncio.Event()
            task = asyncio.ensure_future(serve("127.0.0.1", self.port, ready=ready, stop=self.stop_event, grace=5,
                                               **self.serve_options()))
            await ready.wait()
            self.ready.set()
            await task

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
            self.ready.set()

    def serve_options(self) -> dict:
        return {}

    def start(self) -> GatewayServer:
        self.thread.start()
        self.ready.wait(10)
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(15)

    def client(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example.net", timeout=60)
        return client


@pytest.fixture
def gateway_smtp(transactional_db, settings):
    """Our SMTP server, with tasks run at once (eagerly) after each commit."""
    settings.CELERY_TASK_ALWAYS_EAGER = True
    settings.SMTP_REVERSE_DNS = False
    settings.SMTP_POLICY_TTL = 0  # every command sees the configuration the test just made
    server = GatewayServer().start()
    yield server
    server.stop()


@pytest.fixture
def protected_domain(transactional_db, capture_server):
    """example.org is ours; its route is the capture server."""
    from gateway.models import Domain, Route

    route = Route.objects.create(name="mailstore", host="127.0.0.1", port=capture_server.port)
    return Domain.objects.create(name="example.org", route=route)


def send(gateway_smtp, raw, to=("bob@example.org",), sender="alice@sender.example"):
    """One message through our SMTP server (accepted: 250); the Message it logged."""
    from gateway.models import Message

    with gateway_smtp.client() as client:
        client.ehlo()
        client.mail(sender)
        for address in to:
            client.rcpt(address)
        code, reply = client.data(raw)
    assert code == 250
    return Message.objects.get(queue_id=reply.decode().rsplit(" ", 1)[1])


class PolicyGatewayServer(GatewayServer):
    """Our SMTP server with the submission (STARTTLS + AUTH) and implicit-TLS (AUTH) listeners too."""

    def __init__(self):
        super().__init__()
        self.submission_port = free_port()
        self.smtps_port = free_port()

    def serve_options(self) -> dict:
        return {"submission": ("127.0.0.1", self.submission_port), "smtps": ("127.0.0.1", self.smtps_port)}

    def submission(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.submission_port, local_hostname="laptop.example.org", timeout=60)

    def smtps(self) -> smtplib.SMTP_SSL:
        import ssl

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return smtplib.SMTP_SSL("127.0.0.1", self.smtps_port, local_hostname="laptop.example.org", timeout=60,
                                context=context)


@pytest.fixture
def gateway_smtp_tls(transactional_db, settings, tmp_path):
    """Our SMTP server with all three listeners and a self-signed certificate made in a scratch DATA_DIR."""
    settings.CELERY_TASK_ALWAYS_EAGER = True
    settings.SMTP_REVERSE_DNS = False
    settings.SMTP_POLICY_TTL = 0
    settings.DATA_DIR = tmp_path
    settings.SMTP_TLS_CERT = ""
    server = PolicyGatewayServer().start()
    yield server
    server.stop()


def insecure_tls():
    """A client TLS context for our self-signed certificate."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
