"""ClamAV through clamd, spoken to over its own protocol (zINSTREAM to scan, zPING, zVERSION; clamd(8)), over a
Unix socket or TCP, as gateway/scan/spamassassin.py speaks SPAMC.

Each command has one deadline, SCANNER_TIMEOUT seconds from its start, for the whole exchange: the connection,
every write (all of the data is written, `sendall`) and every read of the reply. When it passes, or clamd
cannot be reached, or its reply makes no sense, ScannerUnavailable is raised at once (no retries: the scan is
deferred and tried again later, never delivered unscanned).

The several streams of one message (the whole message, its decoded parts, the members of its archives) go
over one connection in a session (zIDSESSION … zEND), each answered before the next is sent. A stream over
CLAMD_STREAM_MAX_LENGTH is not sent, and one clamd refuses for its size ("INSTREAM size limit exceeded"), or
whose scan stopped at one of clamd's own limits (Heuristics.Limits.Exceeded, with AlertExceedsMax), is
*unscannable*: never taken as clean, never tried again for ever.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from django.conf import settings

from . import ScannerUnavailable

CHUNK = 1024 * 1024  # bytes per INSTREAM chunk; clamd takes any size up to StreamMaxLength
SMALL = 64 * 1024  # a stream up to this is written in one call, command and end marker included
MAX_REPLY = 64 * 1024
LIMIT_EXCEEDED = "Heuristics.Limits.Exceeded"
_REQUEST_NUMBER = re.compile(r"^\d+: ")


@dataclass
class VirusScanResult:
    infected: bool
    virus_names: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unscannable: list[str] = field(default_factory=list)  # why a stream could not be scanned whole


def configured() -> bool:
    return bool(settings.CLAMD_URL)


class _Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer within {self.seconds:g} s")
        return left


def _connect(url: str, deadline: _Deadline) -> socket.socket:
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(deadline.left())
            sock.connect(parsed.path)
        except BaseException:
            sock.close()
            raise
        return sock
    if parsed.scheme == "tcp":
        return socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 3310),
                                        timeout=deadline.left())
    raise ScannerUnavailable(f"CLAMD_URL: use unix:///path or tcp://host:port, not {url!r}")


def _reply(sock: socket.socket, deadline: _Deadline) -> str:
    """One reply: up to its NUL (the delimiter of z-commands) or the end of the connection."""
    data = b""
    while not data.endswith(b"\0") and len(data) < MAX_REPLY:
        sock.settimeout(deadline.left())
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.rstrip(b"\0").decode("utf-8", "replace").strip()


def _send_stream(sock: socket.socket, data: bytes, deadline: _Deadline) -> None:
    length = struct.Struct("!L")
    if len(data) <= SMALL:
        sock.settimeout(deadline.left())
        sock.sendall(b"zINSTREAM\0" + length.pack(len(data)) + data + length.pack(0))
        return
    view = memoryview(data)
    sock.settimeout(deadline.left())
    sock.sendall(b"zINSTREAM\0")
    for start in range(0, len(data), CHUNK):
        chunk = view[start:start + CHUNK]
        sock.settimeout(deadline.left())
        sock.sendall(length.pack(len(chunk)))
        sock.settimeout(deadline.left())
        sock.sendall(chunk)
    sock.settimeout(deadline.left())
    sock.sendall(length.pack(0))


class Session:
    """The streams of one message over one connection to clamd (zIDSESSION … zEND), opened at the first
    stream; `scan()` adds each stream's findings to `result`."""

    def __init__(self, url: str | None = None, *, session: bool = True):
        self.url = url or settings.CLAMD_URL
        self.session = session
        self.result = VirusScanResult(False)
        self._sock: socket.socket | None = None
        self._sent = 0

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            if self.session:
                sock.settimeout(1.0)
                sock.sendall(b"zEND\0")
        except OSError:
            pass  # clamd closes its side too: nothing is lost
        finally:
            sock.close()

    def scan(self, data: bytes, label: str = "the message") -> None:
        """Scan one stream. Raises ScannerUnavailable when clamd does not answer within the deadline."""
        limit = settings.CLAMD_STREAM_MAX_LENGTH
        if len(data) > limit:
            self.result.unscannable.append(f"{label}: {len(data)} bytes, more than clamd takes "
                                           f"(CLAMD_STREAM_MAX_LENGTH {limit})")
            return
        reply = _REQUEST_NUMBER.sub("", self._exchange(data), count=1)  # "3: stream: OK" in a session
        if reply.endswith(" FOUND"):
            name = reply[:-len(" FOUND")].removeprefix("stream:").strip()
            if name.startswith(LIMIT_EXCEEDED):
                self.result.unscannable.append(f"{label}: clamd stopped at one of its limits ({name})")
            else:
                self.result.infected = True
                if name not in self.result.virus_names:
                    self.result.virus_names.append(name)
        elif reply.endswith(" OK"):
            pass
        elif "size limit exceeded" in reply:
            # clamd's StreamMaxLength is below CLAMD_STREAM_MAX_LENGTH: it read no further, and has closed.
            self._drop()
            self.result.unscannable.append(f"{label}: {len(data)} bytes, refused by clamd for its size ({reply})")
        elif reply.endswith("ERROR"):
            # Out of memory, a file it could not write: a condition on clamd's side, tried again later.
            self._drop()
            raise ScannerUnavailable(f"clamd at {self.url}: {reply[:200]}")
        else:
            self._drop()
            raise ScannerUnavailable(f"clamd at {self.url}: unexpected reply {reply[:200]!r}")

    def _exchange(self, data: bytes) -> str:
        deadline = _Deadline(settings.SCANNER_TIMEOUT)
        try:
            if self._sock is None:
                self._sock = _connect(self.url, deadline)
                if self.session:
                    self._sock.settimeout(deadline.left())
                    self._sock.sendall(b"zIDSESSION\0")
            sock = self._sock
            try:
                _send_stream(sock, data, deadline)
            except (BrokenPipeError, ConnectionResetError):
                # clamd stops reading a stream over its StreamMaxLength and closes after saying so.
                reply = _reply(sock, deadline)
                if "size limit exceeded" not in reply:
                    raise
                return reply
            reply = _reply(sock, deadline)
        except ScannerUnavailable:
            self._drop()
            raise
        except OSError as exc:  # refused, reset, timed out (TimeoutError is an OSError)
            self._drop()
            raise ScannerUnavailable(f"clamd at {self.url}: {exc.__class__.__name__}: {exc}") from exc
        if not self.session:
            self._drop()
        return reply

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def scan(data: bytes, url: str | None = None) -> VirusScanResult:
    """One stream (a whole message): infected or not, or unscannable (too large for clamd)."""
    with Session(url, session=False) as session:
        session.scan(data)
    return session.result


def _command(command: bytes, url: str | None, timeout: float | None = None) -> str:
    url = url or settings.CLAMD_URL
    deadline = _Deadline(timeout or settings.SCANNER_TIMEOUT)
    try:
        sock = _connect(url, deadline)
    except OSError as exc:
        raise ScannerUnavailable(f"clamd at {url}: {exc}") from exc
    try:
        sock.settimeout(deadline.left())
        sock.sendall(b"z" + command + b"\0")
        return _reply(sock, deadline)
    except OSError as exc:
        raise ScannerUnavailable(f"clamd at {url}: {exc}") from exc
    finally:
        sock.close()


def ping(url: str | None = None, *, timeout: float | None = None) -> bool:
    try:
        return _command(b"PING", url, timeout) == "PONG"
    except ScannerUnavailable:
        return False


def version(url: str | None = None, *, timeout: float | None = None) -> str:
    """clamd's version line, e.g. "ClamAV 1.4.6/27000/Tue Oct 1 08:00:00 2026". Raises ScannerUnavailable
    (its cause, when there is one, the OSError). `timeout`: seconds for the whole exchange (a health probe's
    short one), else SCANNER_TIMEOUT."""
    return _command(b"VERSION", url, timeout)
