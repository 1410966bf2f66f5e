"""Zip archives opened within limits: the members' names, and their content read in bounded chunks against one
budget of decompressed bytes per message.

What is refused before a byte is inflated: more members than the limit, entries that overlap or run into the
central directory (the "quoted overlap" zip bomb, which zipfile itself refuses only from Python 3.11.8 on;
this check does not depend on the interpreter), a member whose declared size is over what is left of the
budget or over what clamd accepts, a member that would grow more than the ratio limit. While it is read, every
chunk counts against the budget: a member that declares a small size and inflates to more is stopped by
zipfile's own size and CRC check, and the budget stops the sum of them. Each of these makes the message
unscannable: an archive that could not be read whole was not checked.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

CHUNK = 64 * 1024
# Members smaller than this are not held to the ratio limit: a few kilobytes of zeros or of repeated XML
# compress a thousandfold and harm no one; the budget still counts them.
RATIO_GRACE_BYTES = 1024 * 1024
LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # APPNOTE.TXT 4.3.7, 30 bytes
END_OF_CENTRAL_DIRECTORY = b"PK\x05\x06"


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 2000
    max_depth: int = 3
    max_ratio: int = 100
    max_member_size: int = 25 * 1024 * 1024  # what clamd accepts in one stream


class Budget:
    """The decompressed bytes one message may still cost."""

    def __init__(self, total: int):
        self.total = total
        self.left = total

    def take(self, size: int) -> bool:
        self.left -= size
        return self.left >= 0


@dataclass
class Member:
    name: str
    size: int  # as the central directory declares it
    data: bytes  # the content; b"" for a directory or an encrypted member
    sha256: str
    encrypted: bool


class Unreadable(Exception):
    """The archive cannot be read whole within the limits: the message is unscannable."""


def declared_entries(payload: bytes) -> int | None:
    """The number of entries the end-of-central-directory record declares, read without parsing the
    directory (which zipfile does in Python, entry by entry); None when there is no such record."""
    at = payload.rfind(END_OF_CENTRAL_DIRECTORY, max(0, len(payload) - 65557))
    if at < 0 or at + 22 > len(payload):
        return None
    (entries,) = struct.unpack_from("<H", payload, at + 10)
    return None if entries == 0xFFFF else entries  # 0xFFFF: ZIP64, counted by zipfile instead


def overlap(archive: zipfile.ZipFile, payload: bytes) -> str:
    """Why the entries' local headers and data do not lie one after the other before the central directory,
    or ''. Each entry spans its local header, name, extra field and compressed data."""
    spans = []
    for info in archive.infolist():
        start = info.header_offset
        if start < 0 or start + LOCAL_HEADER.size > len(payload):
            return f"{info.filename!r} starts outside the archive"
        fields = LOCAL_HEADER.unpack_from(payload, start)
        if fields[0] != b"PK\x03\x04":
            return f"{info.filename!r} has no local header where the directory says"
        name_length, extra_length = fields[-2], fields[-1]
        spans.append((start, start + LOCAL_HEADER.size + name_length + extra_length + info.compress_size,
                      info.filename))
    spans.sort()
    for (_, end, name), (start, _, following) in zip(spans, spans[1:], strict=False):
        if end > start:
            return f"entries {name!r} and {following!r} overlap"
    if spans and spans[-1][1] > archive.start_dir:
        return f"entry {spans[-1][2]!r} runs into the central directory"
    return ""


def members(payload: bytes, label: str, limits: ArchiveLimits, budget: Budget) -> Iterator[Member]:
    """The archive's members with their content, in the order of its directory. Raises Unreadable (after the
    members already given) when a limit is reached or the archive cannot be read."""
    entries = declared_entries(payload)
    if entries is not None and entries > limits.max_members:
        raise Unreadable(f"{label}: {entries} archive members, more than {limits.max_members}")
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
        infos = archive.infolist()
        if len(infos) > limits.max_members:
            raise Unreadable(f"{label}: {len(infos)} archive members, more than {limits.max_members}")
        problem = overlap(archive, payload)
    except Unreadable:
        raise
    except Exception as exc:  # noqa: BLE001 - BadZipFile, NotImplementedError (a newer version), struct.error, ...
        raise Unreadable(f"{label}: not a readable zip archive ({exc.__class__.__name__})") from exc
    if problem:
        raise Unreadable(f"{label}: {problem}")
    for info in infos:
        if info.filename.endswith("/"):  # a directory (ZipInfo.is_dir() fails on an empty name)
            continue
        where = f"{label}/{info.filename}"
        if info.flag_bits & 0x1:
            yield Member(info.filename, info.file_size, b"", "", encrypted=True)
            continue
        if info.file_size > limits.max_member_size:
            raise Unreadable(f"{where}: declares {info.file_size} bytes, more than clamd takes "
                             f"({limits.max_member_size})")
        if info.file_size > budget.left:
            raise Unreadable(f"{where}: declares {info.file_size} bytes, more than the {budget.total} bytes of "
                             "decompression the message may cost")
        if info.file_size > RATIO_GRACE_BYTES and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise Unreadable(f"{where}: compressed {info.file_size // max(info.compress_size, 1)} to 1, more than "
                             f"{limits.max_ratio} to 1")
        yield Member(info.filename, info.file_size, *_read(archive, info, where, budget), encrypted=False)


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, budget: Budget) -> tuple[bytes, str]:
    digest = hashlib.sha256()
    chunks = []
    try:
        with archive.open(info) as member:
            while chunk := member.read(CHUNK):
                if not budget.take(len(chunk)):
                    raise Unreadable(f"{where}: the message's archives decompress to more than {budget.total} "
                                     "bytes")
                digest.update(chunk)
                chunks.append(chunk)
    except Unreadable:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt member, an unsupported method, a bad CRC, a lying size
        raise Unreadable(f"{where}: could not be read ({exc.__class__.__name__}: {exc})"[:300]) from exc
    return b"".join(chunks), digest.hexdigest()
