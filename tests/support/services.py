"""The real services the tests talk to: where they are, and whether they answer.

`.ci/services.sh` (`make services`) starts spamd and clamd with the offline configuration and
writes their addresses to .ci/state/env; the defaults here are the same addresses, so a test run
finds them without that file too.

A test that needs a service asks for it with a fixture (`spamd`, `clamd`, `redis`) or calls
`require(name, url)`; for a program, `require_binary(path)`. Each does a real protocol exchange
(PING → PONG) with a short timeout. When the service is missing the test is skipped, so a
laptop without spamd still runs the rest; but with CI set (and not "0"/"false") a missing
service fails the test: on CI every service must be there, and a silent skip would hide it.
tests/conftest.py provides the fixtures to every test (and `scanners_off`, for tests without the scanners):

    def test_virus(clamd):
        ...  # clamd is the URL, e.g. unix:///run/mailgate-clamd/clamd.sock

`spamc(url, verb, body)` is one raw SPAMC exchange with spamd.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest

# The shared test corpus lies beside the repository (../shared/corpus); MAILGATE_CORPUS moves it.
CORPUS = Path(os.getenv("MAILGATE_CORPUS") or Path(__file__).resolve().parents[3] / "shared" / "corpus")

DEFAULT_SPAMD_URL = "tcp://127.0.0.1:7830"
DEFAULT_CLAMD_URL = "unix:///run/mailgate-clamd/clamd.sock"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
PING_TIMEOUT = 3.0

# Where Debian puts the programs some tests drive (require_binary also takes a bare name).
CHROMIUM = "/usr/bin/chromium"
SPAMD = "/usr/sbin/spamd"
SWAKS = "/usr/bin/swaks"
OPENDKIM_TESTMSG = "/usr/sbin/opendkim-testmsg"


def in_ci() -> bool:
    return os.getenv("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def spamd_url() -> str:
    return os.getenv("SPAMD_URL") or DEFAULT_SPAMD_URL


def clamd_url() -> str:
    return os.getenv("CLAMD_URL") or DEFAULT_CLAMD_URL


def redis_url() -> str:
    return os.getenv("REDIS_URL") or os.getenv("CELERY_BROKER_URL") or DEFAULT_REDIS_URL


def connect(url: str, timeout: float = PING_TIMEOUT) -> socket.socket:
    """A connected socket to tcp://host:port, redis://host:port/db or unix:///path."""
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(parsed.path)
        except OSError:
            sock.close()
            raise
        return sock
    port = parsed.port or {"redis": 6379, "rediss": 6379}.get(parsed.scheme)
    if not parsed.hostname or not port:
        raise ValueError(f"{url!r}: expected tcp://host:port or unix:///path")
    return socket.create_connection((parsed.hostname, port), timeout=timeout)


def _recv_until(sock: socket.socket, end: bytes, limit: int = 4096) -> bytes:
    data = b""
    while end not in data and len(data) < limit:
        chunk = sock.recv(limit)
        if not chunk:
            break
        data += chunk
    return data


def ping_spamd(url: str) -> str | None:
    """None when spamd answers PING with PONG, else why not."""
    with connect(url) as sock:
        sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
        answer = _recv_until(sock, b"\r\n")
    return None if answer.startswith(b"SPAMD/") and b"PONG" in answer else f"answered {answer[:80]!r}"


def ping_clamd(url: str) -> str | None:
    with connect(url) as sock:
        sock.sendall(b"zPING\0")
        answer = _recv_until(sock, b"\0")
    return None if answer.rstrip(b"\0\n") == b"PONG" else f"answered {answer[:80]!r}"


def ping_redis(url: str) -> str | None:
    import redis as redis_lib

    client = redis_lib.Redis.from_url(url, socket_timeout=PING_TIMEOUT, socket_connect_timeout=PING_TIMEOUT)
    try:
        return None if client.ping() else "PING did not answer PONG"
    finally:
        client.close()


PINGS = {"spamd": ping_spamd, "clamd": ping_clamd, "redis": ping_redis}


def unavailable(reason: str) -> None:
    """Skip the test, or fail it on CI, where every service must be there."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: every service is required; run `make services`)", pytrace=False)
    pytest.skip(f"{reason}; `make services` starts it")


def database_url_for(purpose: str) -> str:
    """The URL of the test database, for a process the test starts (runsmtp, a worker, maillog); such a test
    needs PostgreSQL (SQLite's file is not shared that way): skip without it, fail on CI."""
    from django.db import connection

    if connection.vendor != "postgresql":
        unavailable(f"{purpose} needs PostgreSQL (set DATABASE_URL)")
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def require(name: str, url: str | None = None) -> str:
    """The service's URL when it answers a real PING; else skip (fail on CI)."""
    url = url or {"spamd": spamd_url, "clamd": clamd_url, "redis": redis_url}[name]()
    try:
        problem = PINGS[name](url)
    except Exception as exc:  # noqa: BLE001 - any failure to talk to it means "not there"
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        unavailable(f"{name} at {url} does not answer: {problem}")
    return url


def require_postgres() -> None:
    """PostgreSQL as the database (DATABASE_URL), as `make test` sets it; else skip (fail on CI)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        unavailable("this test needs PostgreSQL as the database (DATABASE_URL=postgres://…)")


def require_binary(path: str) -> str:
    """The program's full path when it is installed and executable; else skip (fail on CI)."""
    found = path if os.sep in path else shutil.which(path)
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        unavailable(f"{path} is not installed")
    return found


def require_corpus(relative: str) -> Path:
    """A file or folder of the shared corpus (e.g. "virus/eicar/eicar.com"); else skip (fail on CI)."""
    path = CORPUS / relative
    if not path.exists():
        unavailable(f"{path} is missing (the corpus belongs beside the repository: ../shared/corpus)")
    return path


@pytest.fixture
def spamd() -> str:
    """The URL of a spamd that answers, e.g. tcp://127.0.0.1:7830."""
    return require("spamd")


@pytest.fixture
def clamd() -> str:
    """The URL of a clamd that answers, e.g. unix:///run/mailgate-clamd/clamd.sock."""
    return require("clamd")


@pytest.fixture
def redis() -> str:
    """The URL of a Redis that answers, e.g. redis://127.0.0.1:6379/15."""
    return require("redis")


@pytest.fixture
def scanners_off(settings):
    settings.SPAMD_URL = ""
    settings.CLAMD_URL = ""


def spamc(url: str, verb: str, body: bytes, **headers: str) -> tuple[bytes, dict[str, str], bytes]:
    """One raw SPAMC/1.5 exchange: (status line, headers, body) of spamd's answer."""
    lines = [f"{verb} SPAMC/1.5", f"Content-length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    with connect(url, timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(1)  # spamd reads the message to the end of the stream
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    status, *header_lines = head.split(b"\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.decode().partition(":")
        parsed[name.strip().lower()] = value.strip()
    return status, parsed, rest
