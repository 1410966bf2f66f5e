"""ClamAV through clamd's INSTREAM command (pyclamd), over a Unix socket or TCP."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pyclamd
from django.conf import settings

from . import ScannerUnavailable

_local = threading.local()


@dataclass
class VirusScanResult:
    infected: bool
    virus_names: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def configured() -> bool:
    return bool(settings.CLAMD_URL)


def _client(url: str) -> pyclamd.ClamdUnixSocket | pyclamd.ClamdNetworkSocket:
    # pyclamd objects keep one socket at a time: one per thread (Celery threads, the embedded worker).
    cached = getattr(_local, "clients", {})
    if url in cached:
        return cached[url]
    parsed = urlparse(url)
    try:
        if parsed.scheme == "unix":
            client = pyclamd.ClamdUnixSocket(filename=parsed.path, timeout=settings.SCANNER_TIMEOUT)
        elif parsed.scheme == "tcp":
            client = pyclamd.ClamdNetworkSocket(host=parsed.hostname or "127.0.0.1", port=parsed.port or 3310,
                                                timeout=settings.SCANNER_TIMEOUT)
        else:
            raise ValueError(f"CLAMD_URL: use unix:///path or tcp://host:port, not {url!r}")
    except pyclamd.ConnectionError as exc:
        raise ScannerUnavailable(f"clamd at {url}: {exc}") from exc
    cached[url] = client
    _local.clients = cached
    return client


def scan(data: bytes, url: str | None = None) -> VirusScanResult:
    url = url or settings.CLAMD_URL
    client = _client(url)
    try:
        found = client.scan_stream(data)
    except pyclamd.BufferTooLongError as exc:
        # A message over clamd's StreamMaxLength cannot be scanned by it; say so, do not retry for ever.
        return VirusScanResult(False, errors=[f"clamd: {exc}"])
    except (pyclamd.ConnectionError, OSError) as exc:
        _local.clients.pop(url, None)
        raise ScannerUnavailable(f"clamd at {url}: {exc}") from exc
    if not found:
        return VirusScanResult(False)
    names, errors = [], []
    for status, reason in found.values():
        (names if status == "FOUND" else errors).append(reason)
    if errors and not names:
        # clamd answered ERROR (out of memory, a limit): a transient condition on its side.
        raise ScannerUnavailable(f"clamd error: {'; '.join(errors)}")
    return VirusScanResult(bool(names), virus_names=names, errors=errors)


def ping(url: str | None = None) -> bool:
    try:
        return bool(_client(url or settings.CLAMD_URL).ping())
    except (ScannerUnavailable, pyclamd.ConnectionError, OSError):
        return False
