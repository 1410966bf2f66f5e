"""Attachment rules: file names and real content types, also inside (nested) zip archives, on the gateway's own
reading of the MIME structure (gateway.scan.mime), and the decoded content handed to clamd on the same walk.

Every MIME leaf part with a file name, or whose content is not text, is reported with its name, declared and
sniffed type, size and SHA-256. A part is blocked when one of the names a reader could show for it matches a
blocked pattern (a double extension such as invoice.pdf.exe matches by its last extension; RFC 2047 and RFC
2231 names are decoded as mail clients decode them), when a declared type is an executable one, or when its
bytes are an executable whatever the name says.

Whatever keeps a message from being read whole (a limit of gateway.scan.limits reached, MIME that cannot be
read one way only, an archive that cannot be opened) is reported in `unscannable`: the message is then not
taken as clean.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.mailbytes import header_section

from . import archives, mime
from .limits import ScanLimits

EXECUTABLE_TYPES = {
    "application/x-msdownload", "application/x-msdos-program", "application/x-dosexec",
    "application/x-executable", "application/x-ms-shortcut", "application/vnd.microsoft.portable-executable",
    "application/x-msi", "application/hta", "application/x-sh",
}

# Given each decoded leaf and archive member for the virus scan: (label, content, its SHA-256).
Inspect = Callable[[str, bytes, str], None]


@dataclass
class AttachmentReport:
    attachments: list[dict] = field(default_factory=list)
    blocked: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unscannable: list[str] = field(default_factory=list)


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
_CONTENT_HEADER = re.compile(rb"^content-(type|disposition|transfer-encoding)[ \t]*:(.*)$",
                             re.IGNORECASE | re.MULTILINE)


def plain_text_only(raw: bytes) -> bool:
    """True for a message that is one text part without a file name, read from its header section alone.

    Such a message has no attachment to report and no part for clamd beyond the whole message (whose one
    body it reads itself), so its body need not be parsed at all: for most mail that is the whole cost of
    this scanner. The test is conservative, a few byte searches instead of a parser: anything but a single
    `Content-Type: text/…` without a name-like parameter and at most one Content-Transfer-Encoding
    (multipart, message/*, another type, a Content-Disposition, a name, a second Content-Type or encoding, a
    bare CR in the header section) takes the full walk.
    """
    head = header_section(raw)
    if head.count(b"\r") != head.count(b"\r\n"):
        return False  # a bare CR: a line break to some readers, so the fields may not be what they seem
    found = _CONTENT_HEADER.findall(_FOLD.sub(b" ", head))
    kinds = [kind.lower() for kind, _ in found]
    if b"disposition" in kinds or kinds.count(b"type") > 1 or kinds.count(b"transfer-encoding") > 1:
        return False
    if b"type" not in kinds:
        return True  # no Content-Type: text/plain (RFC 2045 §5.1)
    value = next(value for kind, value in found if kind.lower() == b"type").strip().lower()
    return value.startswith(b"text/") and b"name" not in value


class AttachmentScanner:
    def __init__(self, patterns: list[str], *, block_executables: bool = True, limits: ScanLimits | None = None):
        self.patterns = patterns
        self.block_executables = block_executables
        self.limits = limits or ScanLimits.from_settings()

    def scan(self, raw: bytes, structure: mime.Structure | None = None, inspect: Inspect | None = None
             ) -> AttachmentReport:
        """The attachment rules on the message (its structure when the caller read it already), each decoded
        leaf and archive member given to `inspect` on the way."""
        report = AttachmentReport()
        if structure is None:
            if plain_text_only(raw):
                return report
            structure = mime.read(raw, self.limits.mime)
        walk = _Walk(self, report, inspect or _ignore, archives.Budget(self.limits.max_decompressed_bytes))
        report.notes += structure.notes
        report.unscannable += structure.unscannable
        whole = _one_body_as_it_is(structure)
        for leaf in structure.leaves:
            walk.leaf(leaf, send=not whole)
        return report

    def blocked_reason(self, names: list[str], declared: list[str], sniffed: str) -> str:
        for name in names:
            pattern = name_blocked(name, self.patterns)
            if pattern:
                return f"file name matches {pattern}" + (f" ({name})" if len(names) > 1 else "")
        if self.block_executables:
            if sniffed in ("application/x-dosexec", "application/x-executable", "application/x-mach-binary"):
                return f"executable content ({sniffed})"
            for kind in declared:
                if kind in EXECUTABLE_TYPES:
                    return f"executable content type ({kind})"
        return ""


def _ignore(label: str, data: bytes, sha256: str) -> None:
    return None


def _one_body_as_it_is(structure: mime.Structure) -> bool:
    """A message that is one part, taken as it is (not decoded) and read one way only: its content is the
    body of the whole message, which clamd reads itself; sending it again would scan the same bytes twice."""
    if len(structure.leaves) != 1 or structure.notes or structure.unscannable:
        return False
    (leaf,) = structure.leaves
    return leaf.number == "" and not leaf.decoded and len(leaf.bodies) == 1


class _Walk:
    """One walk over a message's leaves: the report, the archives already opened, the decompression budget."""

    def __init__(self, scanner: AttachmentScanner, report: AttachmentReport, inspect: Inspect,
                 budget: archives.Budget):
        self.scanner, self.report, self.inspect, self.budget = scanner, report, inspect, budget
        self.opened: set[str] = set()

    def leaf(self, leaf: mime.Leaf, *, send: bool) -> None:
        is_text = all(kind.startswith(("text/", "multipart/", "message/")) for kind in leaf.types)
        for body in leaf.bodies:
            sha256 = hashlib.sha256(body).hexdigest()
            if send and body:
                self.inspect(leaf.label, body, sha256)
            if leaf.names or not is_text:
                self.record(leaf.names, leaf.types, body, sha256, inside="", depth=0)

    def record(self, names: list[str], declared: list[str], payload: bytes, sha256: str, inside: str,
               depth: int) -> None:
        name = names[0] if names else ""
        sniffed = sniff(payload[:16])
        entry = {
            "name": name, "type": declared[0] if declared else "", "sniffed_type": sniffed, "size": len(payload),
            "sha256": sha256, "inside": inside, "blocked": False, "reason": "",
        }
        if len(names) > 1:
            entry["names"] = names  # every name a reader could show: each was checked
        reason = self.scanner.blocked_reason(names, declared, sniffed)
        if reason:
            entry["blocked"], entry["reason"] = True, reason
            self.report.blocked.append(entry)
        self.report.attachments.append(entry)
        if payload and (sniffed == "application/zip" or any(clean_name(n).endswith(".zip") for n in names)):
            self.archive(inside + "/" + name if inside else name or "archive", payload, sha256, depth + 1)

    def archive(self, label: str, payload: bytes, sha256: str, depth: int) -> None:
        if sha256 in self.opened:
            return  # the same archive under another reading of its part
        self.opened.add(sha256)
        limits = self.scanner.limits
        if depth > limits.archives.max_depth:
            self.report.unscannable.append(f"{label}: archives nested deeper than {limits.archives.max_depth}")
            return
        try:
            for member in archives.members(payload, label, limits.archives, self.budget):
                if member.encrypted:
                    self.report.notes.append(f"{label}/{member.name}: encrypted, its content not checked")
                if member.data:
                    self.inspect(f"{label}/{member.name}", member.data, member.sha256)
                self.record([member.name], [], member.data, member.sha256 or "", label, depth)
                if member.encrypted:
                    self.report.attachments[-1]["size"] = member.size
        except archives.Unreadable as exc:
            self.report.unscannable.append(str(exc))
