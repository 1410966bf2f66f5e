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


def header_fields(head: bytes, newline: bytes = b"\r\n") -> list[list[bytes]]:
    """The fields of a header section, each as its lines (a folded field has several: RFC 5322 §2.2.3)."""
    fields: list[list[bytes]] = []
    for line in head.split(newline):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields


def first_received(added_headers: str) -> bytes:
    """The Received field at the head of the headers we add to a message (our own trace, RFC 5321 §4.4),
    folded lines and all, with CRLF line ends; b"" when they do not start with one."""
    head = added_headers.encode("utf-8", "replace").replace(b"\r\n", b"\n")
    first = header_fields(head, b"\n")[0]
    if not first[0].lower().startswith(b"received:"):
        return b""
    return b"\r\n".join(first) + b"\r\n"
