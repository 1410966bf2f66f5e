"""Small readings of a message as the bytes it arrived as, shared by the SMTP server, the scanners and
the notices, so that each does not split a message its own way."""

from __future__ import annotations

HEADER_LIMIT = 64 * 1024  # of a message without a blank line: its first 64 KiB are taken as the header


def header_section(data: bytes) -> bytes:
    """The header section (RFC 5322 §2.1), without the blank line that ends it; CRLF or bare LF."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    return data[:end] if end >= 0 else data[:HEADER_LIMIT]
