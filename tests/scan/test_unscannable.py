"""Attachment rules fail closed (issue 15, item 4): file names as mail clients decode them (RFC 2047, RFC 2231),
and a limit reached or a structure that cannot be read makes the message *unscannable*, a verdict of its own
that is held (quarantine by default), logged with its reason, counted, and not undone by an allow list."""

from __future__ import annotations

import io
import logging
import time
import zipfile

import pytest

from gateway.models import DEFAULT_BLOCKED_ATTACHMENTS, MailFlowSettings, Message, Recipient, SenderListEntry, Verdict
from gateway.scan import verdict as scan_verdict
from gateway.scan.attachments import AttachmentScanner
from tests.support.mail import MZ_PROGRAM, eicar, message, zipped
from tests.support.servers import send

PATTERNS = [p.strip() for p in DEFAULT_BLOCKED_ATTACHMENTS.splitlines()]


def rules(raw: bytes):
    return AttachmentScanner(PATTERNS).scan(raw)


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def with_part(part_headers: str, body: str = "echo hello\n") -> bytes:
    return crlf("From: alice@sender.example\nTo: bob@example.org\nSubject: Files\nMIME-Version: 1.0\n"
                'Content-Type: multipart/mixed; boundary="b1"\n\n'
                f"--b1\nContent-Type: text/plain\n\nThe file.\n--b1\n{part_headers}\n{body}--b1--\n")


# --- File names as clients show them ------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    # RFC 2047 encoded word in the Content-Type name (clients decode it though RFC 2047 §5 forbids it there)
    "Content-Type: application/octet-stream; name==?UTF-8?B?ZXZpbC5qcw==?=\n",
    # ... quoted, and in the Content-Disposition filename
    'Content-Type: application/octet-stream\nContent-Disposition: attachment; filename="=?UTF-8?B?ZXZpbC5qcw==?="\n',
    # ... split over two encoded words, the white space between them dropped (RFC 2047 §6.2)
    'Content-Type: application/octet-stream; name="=?UTF-8?Q?ev?= =?UTF-8?Q?il=2Ejs?="\n',
    # RFC 2231 §4: charset, language and percent-encoding
    "Content-Type: application/octet-stream\nContent-Disposition: attachment; filename*=UTF-8''evil%2Ejs\n",
    # RFC 2231 §3 and §4.1: continuations, the first one encoded
    "Content-Type: application/octet-stream\nContent-Disposition: attachment;\n"
    " filename*0*=UTF-8''ev; filename*1=il.js\n",
    # Two names, one harmless: some clients show the one, some the other (every one is checked)
    'Content-Type: application/octet-stream; name="report.txt"\nContent-Disposition: attachment; filename="evil.js"\n',
    'Content-Type: application/octet-stream\nContent-Disposition: attachment; filename="report.txt";\n'
    ' filename="evil.js"\n',
])
def test_a_blocked_name_is_found_as_mail_clients_decode_it(headers):
    report = rules(with_part(headers))
    assert report.blocked, report.attachments
    assert any(name.lower() == "evil.js" for entry in report.blocked for name in entry.get("names", [entry["name"]]))


def test_the_decoded_name_is_the_one_reported():
    report = rules(with_part("Content-Type: application/octet-stream; name==?UTF-8?B?cmVwb3J0LnBkZg==?=\n"))
    (entry,) = report.attachments
    assert entry["name"] == "report.pdf" and not entry["blocked"]


# --- Limits: unscannable, never a note on a clean verdict -----------------------------------------------------

def many_parts(count: int, last: str) -> bytes:
    parts = "".join(f"--b1\nContent-Type: text/plain; name=\"note{i}.txt\"\n\nnote {i}\n" for i in range(count))
    return crlf("From: alice@sender.example\nTo: bob@example.org\nSubject: Many\nMIME-Version: 1.0\n"
                f'Content-Type: multipart/mixed; boundary="b1"\n\n{parts}'
                f'--b1\nContent-Type: text/plain; name="{last}"\n\necho hello\n--b1--\n')


def test_a_file_after_the_thousandth_part_makes_the_message_unscannable():
    report = rules(many_parts(1000, "run.bat"))
    assert any("more than 1000 MIME parts" in reason for reason in report.unscannable)


def test_a_thousand_parts_are_read_whole():
    report = rules(many_parts(997, "run.bat"))  # 997 + 1 named + the multipart itself = 999 parts
    assert report.unscannable == [] and [e["name"] for e in report.blocked] == ["run.bat"]


def many_members(count: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for i in range(count):
            archive.writestr(f"page{i}.txt", b"x")
        archive.writestr("evil.exe", b"not really")
    return buffer.getvalue()


def test_the_2001st_member_of_a_zip_makes_the_message_unscannable():
    report = rules(message(attachments=[("pages.zip", "application/zip", many_members(2000))]))
    assert any("2001 archive members, more than 2000" in reason for reason in report.unscannable)


def test_2000_members_are_read_whole():
    report = rules(message(attachments=[("pages.zip", "application/zip", many_members(1999))]))
    assert report.unscannable == [] and [e["name"] for e in report.blocked] == ["evil.exe"]


def nested_zips(depth: int) -> bytes:
    data = zipped({"tool.scr": b"not really"})
    for level in range(depth - 1):
        data = zipped({f"level{level}.zip": data})
    return data


def test_a_zip_nested_four_deep_makes_the_message_unscannable():
    report = rules(message(attachments=[("outer.zip", "application/zip", nested_zips(4))]))
    assert any("archives nested deeper than 3" in reason for reason in report.unscannable)


def test_a_zip_nested_three_deep_is_read_whole():
    report = rules(message(attachments=[("outer.zip", "application/zip", nested_zips(3))]))
    assert report.unscannable == [] and [e["name"] for e in report.blocked] == ["tool.scr"]


def nested_multiparts(depth: int) -> bytes:
    head = "".join(f'Content-Type: multipart/mixed; boundary="level{i}x"\n\n--level{i}x\n' for i in range(depth))
    return crlf("From: alice@sender.example\nTo: bob@example.org\nSubject: Deep\nMIME-Version: 1.0\n" + head
                + 'Content-Type: text/plain; name="run.bat"\n\necho hello\n')


def test_multipart_nested_1200_deep_is_unscannable_not_a_recursion_error():
    started = time.monotonic()
    report = rules(nested_multiparts(1200))
    assert any("nested deeper than 50" in reason for reason in report.unscannable)
    assert time.monotonic() - started < 2


def test_fifty_levels_are_read_whole():
    report = rules(nested_multiparts(49))
    assert report.unscannable == [] and [e["name"] for e in report.blocked] == ["run.bat"]


def test_the_limits_are_settings(settings):
    settings.SCAN_MAX_PARTS = 10
    assert any("more than 10 MIME parts" in reason for reason in rules(many_parts(20, "a.txt")).unscannable)


# --- Through the pipeline ----------------------------------------------------------------------------------------

@pytest.fixture
def no_spamd(settings, clamd):
    settings.CLAMD_URL = clamd
    settings.SPAMD_URL = ""


@pytest.mark.parametrize("case", ["1001 parts", "2001 zip members", "zip four deep", "1200 levels"])
def test_each_limit_gives_the_verdict_unscannable(no_spamd, db, case):
    raw = {"1001 parts": lambda: many_parts(1000, "run.bat"),
           "2001 zip members": lambda: message(attachments=[("pages.zip", "application/zip", many_members(2000))]),
           "zip four deep": lambda: message(attachments=[("outer.zip", "application/zip", nested_zips(4))]),
           "1200 levels": lambda: nested_multiparts(1200)}[case]()
    outcome = scan_verdict.scan(Message(queue_id="0A1B2C3D4E5F"), raw, MailFlowSettings.cached())
    assert outcome.verdict == Verdict.UNSCANNABLE, (case, outcome.notes)
    assert any(note.startswith("unscannable: ") for note in outcome.notes)


def test_an_encoded_name_gives_the_verdict_blocked_attachment(no_spamd, db):
    raw = with_part("Content-Type: application/octet-stream; name==?UTF-8?B?ZXZpbC5qcw==?=\n")
    outcome = scan_verdict.scan(Message(queue_id="0A1B2C3D4E5F"), raw, MailFlowSettings.cached())
    assert outcome.verdict == Verdict.BLOCKED_ATTACHMENT


def test_unscannable_is_quarantined_logged_and_its_reason_noted(no_spamd, gateway_smtp, protected_domain,
                                                                capture_server, caplog):
    # On the scan's own logger: while the server and its eager tasks run, logging is configured again
    # (LOGGING's console handler), which takes pytest's handlers off the root logger.
    logger = logging.getLogger("gateway.scan.verdict")
    logger.addHandler(caplog.handler)
    try:
        msg = send(gateway_smtp, nested_multiparts(1200))
    finally:
        logger.removeHandler(caplog.handler)
    msg.refresh_from_db()
    assert msg.verdict == Verdict.UNSCANNABLE and msg.state == Message.State.QUARANTINED
    assert msg.recipients.get().status == Recipient.Status.QUARANTINED
    assert any("nested deeper than 50" in note for note in msg.scan_notes)
    assert any(msg.queue_id in r.getMessage() and "nested deeper than 50" in r.getMessage() for r in caplog.records)
    assert capture_server.messages == []


def test_unscannable_delivered_when_the_administrator_says_so_says_so_in_its_header(no_spamd, gateway_smtp,
                                                                                    protected_domain,
                                                                                    capture_server):
    config = MailFlowSettings.load()
    config.action_unscannable = "deliver"
    config.save()
    msg = send(gateway_smtp, nested_multiparts(1200))
    (delivered,) = capture_server.wait_for(1)
    assert b"X-Mailgate-Verdict: unscannable" in delivered.data
    msg.refresh_from_db()
    assert msg.verdict == Verdict.UNSCANNABLE and msg.state == Message.State.DELIVERED


def test_an_allowed_sender_does_not_make_unscannable_clean(no_spamd, gateway_smtp, protected_domain, capture_server):
    SenderListEntry.objects.create(kind="allow", scope="global", sender="@sender.example")
    msg = send(gateway_smtp, nested_multiparts(1200))
    msg.refresh_from_db()
    recipient = msg.recipients.get()
    assert (recipient.verdict, recipient.status) == (Verdict.UNSCANNABLE, Recipient.Status.QUARANTINED)
    assert msg.verdict == Verdict.UNSCANNABLE and capture_server.messages == []


def test_a_blocked_sender_keeps_the_unscannable_verdict(db):
    msg = Message(envelope_sender="mallory@sender.example", client_ip="192.0.2.7")
    SenderListEntry.objects.create(kind="block", scope="global", sender="@sender.example")
    assert scan_verdict.recipient_verdict(msg, Recipient(address="bob@example.org"), Verdict.UNSCANNABLE)[0] == \
        Verdict.UNSCANNABLE


def test_unscannable_ranks_after_virus_before_the_others():
    assert scan_verdict.worst([Verdict.SPAM, Verdict.UNSCANNABLE, Verdict.BLOCKED_ATTACHMENT]) == Verdict.UNSCANNABLE
    assert scan_verdict.worst([Verdict.UNSCANNABLE, Verdict.VIRUS]) == Verdict.VIRUS
    assert scan_verdict.VERDICT_RANK.index(Verdict.UNSCANNABLE) == 1


def test_a_virus_outranks_an_unscannable_reason(no_spamd, db):
    """An archive that cannot be read and a virus in what could be: the verdict is the virus."""
    raw = message(attachments=[("broken.zip", "application/zip", b"PK\x03\x04garbage"),
                               ("eicar.com", "application/octet-stream", eicar())])
    outcome = scan_verdict.scan(Message(queue_id="0A1B2C3D4E5F"), raw, MailFlowSettings.cached())
    assert outcome.verdict == Verdict.VIRUS
    assert any("not a readable zip" in note for note in outcome.notes)


def test_an_executable_zip_member_is_still_found_by_content():
    report = rules(message(attachments=[("docs.zip", "application/zip", zipped({"readme.txt": MZ_PROGRAM}))]))
    assert report.blocked and "executable content" in report.blocked[0]["reason"]
