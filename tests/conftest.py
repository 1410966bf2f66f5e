"""Shared fixtures: a capture SMTP server standing in for the organisation's mail server, our own SMTP
server on a free port, the personas, and the corpus."""

from __future__ import annotations

import asyncio
import os
import smtplib
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
from aiosmtpd.controller import Controller
from django.conf import settings

from tests.services import CORPUS, clamd, redis, spamd  # noqa: F401  (fixtures)

os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


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


@pytest.fixture
def scanners_off(settings):
    settings.SPAMD_URL = ""
    settings.CLAMD_URL = ""


def corpus_path(relative: str):
    path = CORPUS / relative
    if not path.exists():
        from tests.services import unavailable

        unavailable(f"the corpus file {path} is missing")
    return path


@pytest.fixture
def corpus():
    return corpus_path


def read_mail(path) -> bytes:
    """A corpus file as a message: without the mbox 'From ' line, with CRLF line ends."""
    data = path.read_bytes()
    if data.startswith(b"From "):
        data = data.split(b"\n", 1)[1]
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


__all__ = ["settings"]


# --- SMTP-time policy (issue 3) --------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def smtp_policy_checks_off(settings, monkeypatch):
    """The DNS-based checks, greylisting and the greeting delay are off in every test unless it turns them on:
    tests have no DNS of their own (tests/dnsstub.py serves it to those that ask), and greylisting would
    answer 451 to every first message. The environment carries the same to the processes tests start
    (runsmtp in the end-to-end tests). tests/test_smtp_policy*.py and friends switch them on explicitly."""
    values = {"SMTP_DNS_CHECKS": "false", "SMTP_GREYLISTING": False, "SMTP_GREET_DELAY": 0.0}
    for name, value in values.items():
        setattr(settings, name, value)
        monkeypatch.setenv(name, str(value).lower())


from tests.dnsstub import DNSStub  # noqa: E402


@pytest.fixture(scope="session")
def policy_dns():
    """A DNS stub for the SMTP policy tests (zones set per test by `checks_on`)."""
    with DNSStub() as stub:
        yield stub


# What a well-run sending site publishes: the client 127.0.0.1 is client.example.net (forward-confirmed),
# sender.example has an MX, SPF allowing 127.0.0.0/8 and DMARC p=reject.
GOOD_ZONES = {
    "sender.example": [{"MX": [10, "mx.sender.example"]}, {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}],
    "mx.sender.example": [{"A": "192.0.2.10"}],
    "_dmarc.sender.example": [{"TXT": "v=DMARC1; p=reject"}],
    "client.example.net": [{"A": "127.0.0.1"}, {"A": "127.0.0.2"}],
    "1.0.0.127.in-addr.arpa": [{"PTR": "client.example.net"}],
    "2.0.0.127.in-addr.arpa": [{"PTR": "client.example.net"}],
}


@pytest.fixture
def checks_on(settings, policy_dns):
    """The DNS-based checks on, against the stub (no cache, short timeouts); greylisting stays off unless a
    test turns it on. Returns the stub: `checks_on.set_zones({...})` / `.add(...)` change what it serves."""
    settings.SMTP_DNS_CHECKS = "true"
    settings.DNS_NAMESERVERS = [policy_dns.host]
    settings.DNS_PORT = policy_dns.port
    settings.DNS_TIMEOUT = 0.5
    settings.SMTP_DNS_CACHE_TTL = 0
    policy_dns.set_zones(GOOD_ZONES)
    return policy_dns


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


@pytest.fixture(autouse=True)
def _fresh_cache():
    """The cache is shared by processes (login throttling): each test starts with an empty one."""
    from django.core.cache import cache

    from gateway.delivery import client as delivery_client
    from gateway.snapshot import Snapshot

    cache.clear()
    # The per-process snapshots of the mail-flow settings, the lists and the routes: a new test, a new database.
    for snapshot in Snapshot.every:
        snapshot.clear()
    delivery_client.drop_sessions()  # kept SMTP sessions of this thread belong to the last test's servers
    yield


def pytest_collection_modifyitems(config, items):
    """Browser tests last: Playwright's sync API keeps an event loop running in the main thread for as
    long as its browser lives (one per session), and asyncio.run() refuses to start inside it."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
