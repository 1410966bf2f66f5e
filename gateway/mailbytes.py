"""Small readings of a message as the bytes it arrived as, shared by the SMTP server, the scanners and
the notices, so that each does not split a message its own way."""

from __future__ import annotations

import re

HEADER_LIMIT = 64 * 1024  # of a message without a blank line: its first 64 KiB are taken as the header


def header_section(data: bytes) -> bytes:
    """The header section (RFC 5322 §2.1), without the blank line that ends it; CRLF or bare LF."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    return data[:end] if end >= 0 else data[:HEADER_LIMIT]


_LINE_END = re.compile(rb"\r\n|\r|\n")
_DOT_AT_LINE_START = re.compile(rb"^\.", re.MULTILINE)


def dot_stuffed(data: bytes) -> bytes:
    """The message as SMTP's DATA sends it (RFC 5321 §4.5.2): CRLF line ends, a dot doubled at the start
    of a line, and the lone dot that ends the data."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:  # a bare CR or LF somewhere
        data = _LINE_END.sub(b"\r\n", data)
    if data.startswith(b".") or b"\n." in data:
        data = _DOT_AT_LINE_START.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def first_received(added_headers: str) -> bytes:
    """The Received field at the head of the headers we add to a message (our own trace, RFC 5321 §4.4),
    folded lines and all, with CRLF line ends; b"" when they do not start with one."""
    lines = added_headers.replace("\r\n", "\n").split("\n")
    if not lines[0].lower().startswith("received:"):
        return b""
    field = [lines[0]]
    for line in lines[1:]:
        if line[:1] not in (" ", "\t"):
            break
        field.append(line)
    return ("\r\n".join(field) + "\r\n").encode("utf-8", "replace")
