"""SpamAssassin through spamd, spoken to over the SPAMC protocol (REPORT to score, TELL to learn).

The REPORT command answers with the score, the threshold and a table of every rule that hit,
with its score and description: all that the message log and the detail page show.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from urllib.parse import urlparse

from django.conf import settings

from . import ScannerUnavailable

PROTOCOL = b"SPAMC/1.5"


@dataclass
class SpamScanResult:
    score: float
    threshold: float
    is_spam: bool
    rules: list[dict] = field(default_factory=list)  # [{name, score, description}]


def configured() -> bool:
    return bool(settings.SPAMD_URL)


def _connect(url: str, timeout: float | None = None) -> socket.socket:
    parsed = urlparse(url)
    timeout = timeout or settings.SCANNER_TIMEOUT
    try:
        if parsed.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(parsed.path)
        elif parsed.scheme == "tcp":
            sock = socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 783), timeout=timeout)
        else:
            raise ValueError(f"SPAMD_URL: use tcp://host:port or unix:///path, not {url!r}")
    except OSError as exc:
        raise ScannerUnavailable(f"spamd at {url}: {exc}") from exc
    return sock


def _exchange(command: bytes, data: bytes, headers: dict[str, str], url: str) -> tuple[dict[str, str], bytes]:
    sock = _connect(url)
    try:
        head = [command + b" " + PROTOCOL, f"Content-length: {len(data)}".encode()]
        head += [f"{k}: {v}".encode() for k, v in headers.items()]
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError as exc:
        raise ScannerUnavailable(f"spamd at {url}: {exc}") from exc
    finally:
        sock.close()
    reply = b"".join(chunks)
    head_bytes, _, body = reply.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("SPAMD/"):
        raise ScannerUnavailable(f"spamd at {url}: unexpected reply {lines[0][:80]!r}")
    if status[1] != "0":
        raise ScannerUnavailable(f"spamd at {url}: {lines[0][:200]}")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return fields, body


_SPAM_HEADER = re.compile(r"(True|False|Yes|No)\s*;\s*(-?[\d.]+)\s*/\s*(-?[\d.]+)", re.I)
_RULE_LINE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+([A-Z0-9_]+)\s+(.*)$")


def parse_report(text: str) -> list[dict]:
    """Read the rule table of a REPORT: ` pts rule name   description`, then one line per rule.

    A long description continues on indented lines without a score; they are joined.
    """
    rules: list[dict] = []
    in_table = False
    for line in text.splitlines():
        if line.startswith("----"):
            in_table = True
            continue
        if not in_table or not line.strip():
            continue
        match = _RULE_LINE.match(line)
        if match:
            rules.append({"name": match.group(2), "score": float(match.group(1)),
                          "description": match.group(3).strip()})
        elif rules and line.startswith(" "):
            rules[-1]["description"] = f"{rules[-1]['description']} {line.strip()}".strip()
    return rules


def check(data: bytes, url: str | None = None, user: str = "mailgate") -> SpamScanResult:
    url = url or settings.SPAMD_URL
    fields, body = _exchange(b"REPORT", data, {"User": user}, url)
    match = _SPAM_HEADER.search(fields.get("spam", ""))
    if not match:
        raise ScannerUnavailable(f"spamd at {url}: no Spam: header in the reply")
    score, threshold = float(match.group(2)), float(match.group(3))
    return SpamScanResult(score=score, threshold=threshold, is_spam=match.group(1).lower() in ("true", "yes"),
                          rules=parse_report(body.decode("utf-8", "replace")))


def tell(data: bytes, *, as_spam: bool, url: str | None = None, user: str = "mailgate") -> bool:
    """Teach Bayes; True when spamd says it set (or already had) the class."""
    url = url or settings.SPAMD_URL
    headers = {"Message-class": "spam" if as_spam else "ham", "Set": "local", "User": user}
    fields, _ = _exchange(b"TELL", data, headers, url)
    return "local" in fields.get("didset", "") or "didset" not in fields and "didremove" not in fields


def ping_reply(url: str | None = None, *, timeout: float | None = None) -> str:
    """spamd's answer to PING (e.g. "SPAMD/1.5 0 PONG"). Raises ScannerUnavailable (its cause, when there is
    one, the OSError). `timeout`: seconds per step (a health probe's short one), else SCANNER_TIMEOUT."""
    url = url or settings.SPAMD_URL
    sock = _connect(url, timeout)
    try:
        sock.sendall(b"PING " + PROTOCOL + b"\r\n\r\n")
        answer = b""
        while b"\r\n" not in answer and len(answer) < 1024:
            chunk = sock.recv(1024)
            if not chunk:
                break
            answer += chunk
    except OSError as exc:
        raise ScannerUnavailable(f"spamd at {url}: {exc}") from exc
    finally:
        sock.close()
    return answer.decode("ascii", "replace").strip()


def ping(url: str | None = None) -> bool:
    try:
        return "PONG" in ping_reply(url)
    except ScannerUnavailable:
        return False
