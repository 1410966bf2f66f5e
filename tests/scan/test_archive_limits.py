"""Zip archives within limits (issue 15, item 7): a decompression budget per message, a ratio limit, members
refused before they are read, and overlapping entries found by the gateway itself (Python's zipfile refuses
them only from 3.11.8 on); each makes the message unscannable, at little cost."""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import time
import zipfile

import pytest

from gateway.models import DEFAULT_BLOCKED_ATTACHMENTS, MailFlowSettings, Message, Verdict
from gateway.scan import verdict as scan_verdict
from gateway.scan.attachments import AttachmentScanner
from tests.support.mail import message

PATTERNS = [p.strip() for p in DEFAULT_BLOCKED_ATTACHMENTS.splitlines()]
MiB = 1024 * 1024


def rules(raw: bytes):
    return AttachmentScanner(PATTERNS).scan(raw)


def archive(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    return buffer.getvalue()


def attached(payload: bytes, name: str = "files.zip") -> bytes:
    return message(attachments=[(name, "application/zip", payload)])


@pytest.fixture(scope="module")
def bombs() -> bytes:
    """Eight members of 9 MiB of zeros each, a few kilobytes compressed: a message of ~100 KiB that inflates
    to 72 MiB, which the scan used to read and hash, 9 MiB at a time."""
    return archive({f"part{i}.txt": bytes(9 * MiB) for i in range(8)})


def test_a_member_that_would_grow_past_the_ratio_is_not_read(bombs):
    started = time.monotonic()
    report = rules(attached(bombs))
    assert time.monotonic() - started < 0.5
    assert any("to 1, more than 100 to 1" in reason for reason in report.unscannable), report.unscannable


def test_the_decompression_budget_counts_every_archive_of_the_message(settings):
    settings.SCAN_MAX_DECOMPRESSED_BYTES = 1 * MiB
    first, second = (archive({f"{n}.bin": os.urandom(600 * 1024)}, zipfile.ZIP_STORED) for n in ("a", "b"))
    raw = message(attachments=[("a.zip", "application/zip", first), ("b.zip", "application/zip", second)])
    report = rules(raw)
    assert any("more than the 1048576 bytes of decompression" in reason for reason in report.unscannable)
    assert rules(attached(first)).unscannable == []  # one alone is within the budget


def test_a_member_larger_than_clamd_takes_is_not_read(settings):
    settings.CLAMD_STREAM_MAX_LENGTH = 100_000
    report = rules(attached(archive({"big.bin": os.urandom(200_000)}, zipfile.ZIP_STORED)))
    assert any("declares 200000 bytes, more than clamd takes" in reason for reason in report.unscannable)


def test_members_within_the_limits_are_read_whole_and_checked():
    content = os.urandom(3 * MiB)
    report = rules(attached(archive({"data.bin": content, "setup.exe": b"not really"})))
    assert report.unscannable == [] and [e["name"] for e in report.blocked] == ["setup.exe"]
    assert next(e for e in report.attachments if e["name"] == "data.bin")["sha256"] == \
        hashlib.sha256(content).hexdigest()


def test_a_compressible_file_under_a_mebibyte_is_not_held_to_the_ratio():
    assert rules(attached(archive({"zeros.txt": bytes(512 * 1024)}))).unscannable == []


# --- Overlapping entries -----------------------------------------------------------------------------------

END = struct.Struct("<4s4H2LH")  # end of central directory record (APPNOTE.TXT 4.3.16)


def with_central_directory(payload: bytes, entries: list[bytes]) -> bytes:
    """The archive's local entries with another central directory."""
    at = payload.rfind(b"PK\x05\x06")
    fields = END.unpack_from(payload, at)
    start = fields[6]
    directory = b"".join(entries)
    end = END.pack(fields[0], 0, 0, len(entries), len(entries), len(directory), start, 0)
    return payload[:start] + directory + end


def central_entries(payload: bytes) -> list[bytes]:
    at = payload.rfind(b"PK\x05\x06")
    start, end = END.unpack_from(payload, at)[6], at
    entries, pos = [], start
    while pos < end:
        name_length, extra_length, comment_length = struct.unpack_from("<3H", payload, pos + 28)
        size = 46 + name_length + extra_length + comment_length
        entries.append(payload[pos:pos + size])
        pos += size
    return entries


def renamed(entry: bytes, name: bytes) -> bytes:
    name_length = struct.unpack_from("<H", entry, 28)[0]
    return entry[:28] + struct.pack("<H", len(name)) + entry[30:46] + name + entry[46 + name_length:]


def test_two_entries_over_the_same_data_are_unscannable():
    """The "quoted overlap" zip bomb's principle: several directory entries over the same compressed data,
    so a small archive inflates to many times its members. zipfile reads them before Python 3.11.8."""
    payload = archive({"a.txt": b"A" * 4000})
    (entry,) = central_entries(payload)
    overlapping = with_central_directory(payload, [entry, entry, entry])
    assert len(zipfile.ZipFile(io.BytesIO(overlapping)).infolist()) == 3
    report = rules(attached(overlapping))
    assert any("overlap" in reason for reason in report.unscannable), report.unscannable


def test_an_entry_under_another_name_over_the_same_data_is_unscannable():
    payload = archive({"a.txt": b"A" * 4000})
    (entry,) = central_entries(payload)
    report = rules(attached(with_central_directory(payload, [entry, renamed(entry, b"b.txt")])))
    assert any("overlap" in reason for reason in report.unscannable), report.unscannable


def test_an_entry_that_runs_into_the_central_directory_is_unscannable():
    payload = archive({"a.txt": b"A" * 4000})
    (entry,) = central_entries(payload)
    compressed = struct.unpack_from("<L", entry, 20)[0]
    longer = entry[:20] + struct.pack("<L", compressed + 30) + entry[24:]
    report = rules(attached(with_central_directory(payload, [longer])))
    assert any("runs into the central directory" in reason for reason in report.unscannable), report.unscannable


def test_entries_one_after_the_other_are_fine():
    payload = archive({"a.txt": b"A" * 4000, "b.txt": b"B" * 4000, "c/": b""})
    assert rules(attached(payload)).unscannable == []


def overlapping() -> bytes:
    payload = archive({"a.txt": b"A" * 4000})
    (entry,) = central_entries(payload)
    return with_central_directory(payload, [entry, entry, entry])


@pytest.mark.parametrize("case", ["ratio", "overlap", "budget"])
def test_each_gives_the_verdict_unscannable_with_the_real_clamd(settings, clamd, db, bombs, case):
    settings.CLAMD_URL, settings.SPAMD_URL = clamd, ""
    settings.SCAN_MAX_DECOMPRESSED_BYTES = 1 * MiB
    payload = {"ratio": lambda: bombs, "overlap": overlapping,
               "budget": lambda: archive({f"{n}.bin": os.urandom(600 * 1024) for n in "ab"}, zipfile.ZIP_STORED)}
    outcome = scan_verdict.scan(Message(queue_id="0A1B2C3D4E5F"), attached(payload[case]()), MailFlowSettings.cached())
    assert outcome.verdict == Verdict.UNSCANNABLE, (case, outcome.notes)


def test_a_corrupt_archive_is_unscannable_never_a_crash():
    """Seeded random damage to small archives of every compression method zipfile knows: each is read, or the
    message is unscannable; nothing raises (a newer zip version, an empty name, a bad CRC, a cut header...)."""
    rnd = random.Random(15)
    methods = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
    scanner = AttachmentScanner(PATTERNS)
    for _ in range(400):
        payload = bytearray(archive({f"f{i}.txt": rnd.randbytes(rnd.randint(0, 2000)) for i in range(3)},
                                    rnd.choice(methods)))
        for _ in range(rnd.randint(1, 6)):
            payload[rnd.randrange(len(payload))] = rnd.randrange(256)
        report = scanner.scan(attached(bytes(payload)))
        assert all(reason.startswith("files.zip") for reason in report.unscannable), report.unscannable
