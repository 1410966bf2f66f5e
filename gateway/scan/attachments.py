"""Attachment rules: file names and real content types, also inside (nested) zip archives.

Every MIME leaf part with a file name, or whose content is not text, is reported with its name,
declared and sniffed type, size and SHA-256. A part is blocked when its name matches a blocked
pattern (a double extension such as invoice.pdf.exe matches by its last extension), when its
declared type is an executable one, or when its bytes are an executable whatever the name says.
"""

from __future__ import annotations

import email
import email.policy
import fnmatch
import hashlib
import io
import re
import unicodedata
import zipfile
from dataclasses import dataclass, field

from gateway.mailbytes import header_section

MAX_ARCHIVE_DEPTH = 3
MAX_ARCHIVE_MEMBERS = 2000
MAX_PARTS = 1000

EXECUTABLE_TYPES = {
    "application/x-msdownload", "application/x-msdos-program", "application/x-dosexec",
    "application/x-executable", "application/x-ms-shortcut", "application/vnd.microsoft.portable-executable",
    "application/x-msi", "application/hta", "application/x-sh",
}


@dataclass
class AttachmentReport:
    attachments: list[dict] = field(default_factory=list)
    blocked: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def sniff(head: bytes) -> str:
    """The type the first bytes say, whatever the name and the MIME header claim."""
    if head.startswith(b"MZ"):
        return "application/x-dosexec"
    if head.startswith(b"\x7fELF"):
        return "application/x-executable"
    if head[:4] in (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe",
                    b"\xca\xfe\xba\xbe"):
        return "application/x-mach-binary"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "application/zip"
    if head.startswith(b"%PDF"):
        return "application/pdf"
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return "application/x-ole-storage"
    if head.startswith(b"Rar!"):
        return "application/x-rar"
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "application/x-7z-compressed"
    if head.startswith(b"\x1f\x8b"):
        return "application/gzip"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff") or head.startswith(b"GIF8"):
        return "image"
    return ""


def clean_name(name: str) -> str:
    """The name as a user's system would see it: no direction overrides, no trailing dots/spaces."""
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cf", "Cc"))
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    return name.strip().rstrip(". ").lower()


def name_blocked(name: str, patterns: list[str]) -> str:
    """The pattern that blocks this file name, or ''."""
    cleaned = clean_name(name)
    if not cleaned:
        return ""
    for pattern in patterns:
        if fnmatch.fnmatchcase(cleaned, pattern):
            return pattern
    return ""


_FOLD = re.compile(rb"\r?\n[ \t]+")
_CONTENT_HEADER = re.compile(rb"^content-(type|disposition)[ \t]*:(.*)$", re.IGNORECASE | re.MULTILINE)


def _plain_text_only(raw: bytes) -> bool:
    """True for a message that is one text part without a file name, read from its header section alone.

    Such a message has no attachment to report (the full walk below skips a nameless text part), so its
    body need not be parsed at all: for most mail that is the whole cost of this scanner. The test is
    conservative, a few byte searches instead of a parser: anything but a single `Content-Type: text/…`
    without a name-like parameter (multipart, message/*, another type, a Content-Disposition, a name,
    a second Content-Type) takes the full walk.
    """
    found = _CONTENT_HEADER.findall(_FOLD.sub(b" ", header_section(raw)))
    if not found:
        return True  # no Content-Type: text/plain (RFC 2045 §5.1), and no Content-Disposition
    if len(found) > 1 or found[0][0].lower() != b"type":
        return False
    value = found[0][1].strip().lower()
    return value.startswith(b"text/") and b"name" not in value


class AttachmentScanner:
    def __init__(self, patterns: list[str], *, block_executables: bool = True):
        self.patterns = patterns
        self.block_executables = block_executables

    def scan(self, raw: bytes) -> AttachmentReport:
        report = AttachmentReport()
        if _plain_text_only(raw):
            return report
        try:
            message = email.message_from_bytes(raw, policy=email.policy.compat32)
            parts = list(message.walk())
        except Exception as exc:  # noqa: BLE001 - broken MIME must never stop the scan
            report.notes.append(f"MIME structure could not be read: {exc.__class__.__name__}")
            return report
        if len(parts) > MAX_PARTS:
            report.notes.append(f"only the first {MAX_PARTS} of {len(parts)} MIME parts were inspected")
            parts = parts[:MAX_PARTS]
        for part in parts:
            if part.is_multipart():
                continue
            try:
                self._scan_part(part, report)
            except Exception as exc:  # noqa: BLE001
                report.notes.append(f"a MIME part could not be decoded: {exc.__class__.__name__}")
        return report

    def _scan_part(self, part, report: AttachmentReport) -> None:
        name = part.get_filename() or part.get_param("name") or ""
        if isinstance(name, tuple):  # RFC 2231 value that compat32 leaves undecoded
            name = email.utils.collapse_rfc2231_value(name)
        name = str(name)
        declared = part.get_content_type().lower()
        maintype = part.get_content_maintype().lower()
        if not name and maintype in ("text", "multipart", "message"):
            return
        payload = part.get_payload(decode=True) or b""
        self._record(name, declared, payload, report, inside="")

    def _record(self, name: str, declared: str, payload: bytes, report: AttachmentReport, inside: str,
                depth: int = 0) -> None:
        sniffed = sniff(payload[:16])
        entry = {
            "name": name, "type": declared, "sniffed_type": sniffed, "size": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(), "inside": inside, "blocked": False, "reason": "",
        }
        reason = self._blocked_reason(name, declared, sniffed)
        if reason:
            entry["blocked"], entry["reason"] = True, reason
            report.blocked.append(entry)
        report.attachments.append(entry)
        if sniffed == "application/zip" or clean_name(name).endswith(".zip"):
            self._scan_zip(name, payload, report, depth + 1)

    def _blocked_reason(self, name: str, declared: str, sniffed: str) -> str:
        pattern = name_blocked(name, self.patterns) if name else ""
        if pattern:
            return f"file name matches {pattern}"
        if self.block_executables:
            if sniffed in ("application/x-dosexec", "application/x-executable", "application/x-mach-binary"):
                return f"executable content ({sniffed})"
            if declared in EXECUTABLE_TYPES:
                return f"executable content type ({declared})"
        return ""

    def _scan_zip(self, name: str, payload: bytes, report: AttachmentReport, depth: int) -> None:
        label = name or "archive"
        if depth > MAX_ARCHIVE_DEPTH:
            report.notes.append(f"{label}: archives nested deeper than {MAX_ARCHIVE_DEPTH} were not opened")
            return
        try:
            archive = zipfile.ZipFile(io.BytesIO(payload))
            members = archive.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
            report.notes.append(f"{label}: not a readable zip archive ({exc.__class__.__name__})")
            return
        if len(members) > MAX_ARCHIVE_MEMBERS:
            report.notes.append(f"{label}: only the first {MAX_ARCHIVE_MEMBERS} of {len(members)} members inspected")
            members = members[:MAX_ARCHIVE_MEMBERS]
        for info in members:
            if info.is_dir():
                continue
            # Only a few bytes are read: names and magic numbers are enough, and a zip bomb stays shut.
            head, data = b"", b""
            encrypted = bool(info.flag_bits & 0x1)
            if not encrypted:
                try:
                    with archive.open(info) as member:
                        if info.file_size <= 10 * 1024 * 1024:
                            data = member.read(10 * 1024 * 1024 + 1)
                            head = data[:16]
                        else:
                            head = member.read(16)
                except Exception as exc:  # noqa: BLE001 - unsupported compression, corrupt member
                    report.notes.append(f"{label}/{info.filename}: could not be read ({exc.__class__.__name__})")
            sniffed = sniff(head)
            entry = {
                "name": info.filename, "type": "", "sniffed_type": sniffed, "size": info.file_size,
                "sha256": hashlib.sha256(data).hexdigest() if data else "", "inside": label,
                "blocked": False, "reason": "",
            }
            reason = self._blocked_reason(info.filename, "", sniffed)
            if reason:
                entry["blocked"], entry["reason"] = True, reason
                report.blocked.append(entry)
            report.attachments.append(entry)
            if data and (sniffed == "application/zip" or clean_name(info.filename).endswith(".zip")):
                self._scan_zip(f"{label}/{info.filename}", data, report, depth + 1)
