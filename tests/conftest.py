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
        from gateway.smtp.server import serve

        asyncio.set_event_loop(self.loop)

        async def main():
            self.stop_event = asyncio.Event()
            ready = asyncio.Event()
            task = asyncio.ensure_future(serve("127.0.0.1", self.port, ready=ready, stop=self.stop_event, grace=5))
            await ready.wait()
            self.ready.set()
            await task

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
            self.ready.set()

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
