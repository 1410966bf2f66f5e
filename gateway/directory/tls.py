"""The encrypted connection to a directory: TLS with the server's certificate verified, always.

A directory's CA certificate (Directory.ca_certificate, PEM) is written to a file under DATA_DIR once per
content, because OpenLDAP's client library takes a file name; an empty one means the system's trusted CAs.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings

from gateway.models import Directory


class Unreachable(Exception):
    """The directory could not be asked: down, too slow, TLS refused or not verified, the service account
    refused, a configuration the client library cannot use. Never "no such user": the recipient check defers
    on it instead of refusing mail for people who may exist, and a login fails with it logged as such."""


def ca_file(directory: Directory) -> str | None:
    """The path of a file holding the directory's CA certificate(s), or None for the system's CAs."""
    pem = directory.ca_certificate.strip()
    if not pem:
        return None
    folder = Path(settings.DATA_DIR) / "directory-ca"
    path = folder / f"{hashlib.sha256(pem.encode()).hexdigest()[:32]}.pem"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        # Written whole under another name, then renamed: a reader never sees half a certificate.
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            out.write(pem + "\n")
        os.replace(temporary, path)
    return str(path)


def ssl_context(directory: Directory) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and name (for IMAP)."""
    context = ssl.create_default_context(cafile=ca_file(directory))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_of(uri: str, *, default_ports: dict[str, int]) -> tuple[str, str, int]:
    """(scheme, host, port) of one URI such as imaps://mail.example.org or ldap://dc1:389."""
    parts = urlsplit(uri)
    return parts.scheme, parts.hostname or "", parts.port or default_ports[parts.scheme]
