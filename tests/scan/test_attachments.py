"""Attachment rules on real MIME: names, double extensions, content sniffing, zip archives."""

import pytest

from gateway.models import DEFAULT_BLOCKED_ATTACHMENTS
from gateway.scan.attachments import AttachmentScanner, clean_name, name_blocked
from tests.support.mail import MZ_PROGRAM, message, read_mail, zipped

PATTERNS = [p.strip() for p in DEFAULT_BLOCKED_ATTACHMENTS.splitlines()]


def scan(raw: bytes):
    return AttachmentScanner(PATTERNS).scan(raw)


@pytest.mark.parametrize("name", ["setup.exe", "invoice.pdf.exe", "INVOICE.PDF.EXE", "run.scr", "a.js", "b.vbs",
                                  "c.bat", "d.cmd", "e.com", "f.pif", "invoice.pdf.exe.", "photo\u202egpj.exe"])
def test_blocked_names(name):
    assert name_blocked(name, PATTERNS)


@pytest.mark.parametrize("name", ["report.pdf", "notes.txt", "exe.pdf", "archive.zip", "com.docx"])
def test_allowed_names(name):
    assert not name_blocked(name, PATTERNS)


def test_clean_name_strips_direction_overrides_and_paths():
    assert clean_name("C:\\temp\\Rechnung\u202efdp.exe ") == "rechnungfdp.exe"


def test_exe_inside_zip_is_blocked():
    raw = message(attachments=[("documents.zip", "application/zip", zipped({"invoice.pdf.exe": MZ_PROGRAM}))])
    report = scan(raw)
    assert [e["name"] for e in report.blocked] == ["invoice.pdf.exe"]
    assert report.blocked[0]["inside"] == "documents.zip"


def test_executable_renamed_to_txt_is_found_by_content():
    report = scan(message(attachments=[("readme.txt", "text/plain", MZ_PROGRAM)]))
    assert report.blocked and "executable content" in report.blocked[0]["reason"]


def test_nested_zip():
    inner = zipped({"tool.scr": b"not really"})
    report = scan(message(attachments=[("outer.zip", "application/zip", zipped({"inner.zip": inner}))]))
    assert [e["name"] for e in report.blocked] == ["tool.scr"]
    assert report.blocked[0]["inside"] == "outer.zip/inner.zip"


def test_plain_attachments_reported_with_hash():
    report = scan(message(attachments=[("report.pdf", "application/pdf", b"%PDF-1.4 test")]))
    assert not report.blocked
    (entry,) = report.attachments
    assert entry["name"] == "report.pdf" and entry["size"] == 13 and len(entry["sha256"]) == 64
    assert entry["sniffed_type"] == "application/pdf"


def test_broken_zip_is_unscannable_not_a_crash():
    # An archive that cannot be opened was not checked: the message is unscannable, not clean with a note.
    report = scan(message(attachments=[("broken.zip", "application/zip", b"PK\x03\x04garbage")]))
    assert any("not a readable zip" in reason for reason in report.unscannable)


def test_every_corpus_message_scans_without_crashing(corpus):
    root = corpus("mime")
    count = 0
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix not in (".xml", ".txt", ".md", ".py", ".json") and path.stat().st_size:
            scan(read_mail(path))
            count += 1
    assert count > 300


def test_one_text_part_is_judged_from_its_header_section_alone(monkeypatch):
    from gateway.scan import attachments

    parsed = []
    real = attachments.mime.read
    monkeypatch.setattr(attachments.mime, "read", lambda *a, **k: parsed.append(1) or real(*a, **k))
    plain = b"From: a@example.org\r\nSubject: hi\r\n\r\nMZ is not an attachment here\r\n"
    typed = b"Content-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
    assert scan(plain).attachments == [] and scan(typed).attachments == [] and parsed == []
    # A named text part, a non-text body, a message/rfc822 wrapper: the whole structure is walked.
    named = b"Content-Type: text/plain; name=run.bat\r\n\r\necho hi\r\n"
    assert scan(named).blocked[0]["name"] == "run.bat"
    exe = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA//8=\r\n"
    assert scan(exe).blocked[0]["sniffed_type"] == "application/x-dosexec"
    inner = message(attachments=[("setup.exe", "application/octet-stream", MZ_PROGRAM)])
    wrapped = b"Content-Type: message/rfc822\r\n\r\n" + inner
    assert [a["name"] for a in scan(wrapped).blocked] == ["setup.exe"]
    assert len(parsed) == 3
