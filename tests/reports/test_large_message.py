"""The message detail page answers at once for any stored message: the parts and bytes it reads are limited
before parsing, and it says when it shows only the beginning (the original stays whole for download)."""

from __future__ import annotations

import base64
import os
import time

import pytest

from tests.support.people import logged_in, make_message

pytestmark = pytest.mark.django_db

# Loose on purpose: a loaded CI machine; the figure itself is printed (the whole parse took 25 s).
SECONDS = 5.0


def many_parts(count: int = 200_000) -> bytes:
    head = (b"From: flood@sender.test\r\nTo: alice@example.com\r\nSubject: Many parts\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n')
    first = b"--B\r\nContent-Type: text/plain\r\n\r\nThe first part, shown.\r\n"
    part = b"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    return head + first + part * (count - 1) + b"--B--\r\n"


def one_large_attachment(megabytes: int = 25) -> bytes:
    payload = base64.encodebytes(os.urandom(megabytes * 1024 * 1024 * 3 // 4)).replace(b"\n", b"\r\n")
    return (b"From: big@sender.test\r\nTo: alice@example.com\r\nSubject: Large\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n'
            b"See the attachment.\r\n--B\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=data.bin\r\n\r\n"
            + payload + b"--B--\r\n")


def timed_get(client, path: str):
    started = time.monotonic()
    response = client.get(path)
    return response, time.monotonic() - started


def test_a_message_of_200000_parts_is_shown_at_once(client, personas):
    raw = many_parts()
    assert len(raw) > 7_000_000
    message = make_message(recipients=["alice@example.com"], raw=raw, subject="Many parts", state="quarantined",
                           verdict="spam", action="quarantine")
    logged_in(client, personas.admin)
    response, seconds = timed_get(client, f"/messages/{message.queue_id}/")
    print(f"detail page of a {len(raw):,}-byte, 200,000-part message: {seconds:.3f} s")
    assert response.status_code == 200
    assert seconds < SECONDS
    page = response.content.decode()
    assert "This message is 6.9 MB: only its first 1.0 MB are read for this page." in page
    assert "This message has more than 499 MIME parts: only the first 499 are read." in page
    assert f"/messages/{message.queue_id}/original" in page  # the whole of it, for administrators

    preview, seconds = timed_get(client, f"/messages/{message.queue_id}/preview")
    print(f"its preview: {seconds:.3f} s")
    assert preview.status_code == 200 and seconds < SECONDS
    assert "The first part, shown." in preview.content.decode()

    original = client.get(f"/messages/{message.queue_id}/original")
    assert original.content == raw


def test_a_25_mb_message_is_shown_at_once(client, personas):
    raw = one_large_attachment()
    message = make_message(recipients=["alice@example.com"], raw=raw, subject="Large")
    logged_in(client, personas.alice)
    response, seconds = timed_get(client, f"/messages/{message.queue_id}/")
    print(f"detail page of a {len(raw):,}-byte message: {seconds:.3f} s")
    assert response.status_code == 200 and seconds < SECONDS
    page = response.content.decode()
    assert "This message is 25.7 MB: only its first 1.0 MB are read for this page." in page
    # A user cannot download originals: the page says who can.
    assert "which administrators can download" in page
    assert f"/messages/{message.queue_id}/original" not in page


def test_a_message_within_the_limits_is_read_whole(client, personas):
    raw = (b"From: a@sender.test\r\nTo: alice@example.com\r\nSubject: Small\r\n"
           b"Received: from mail.sender.test (mail.sender.test [192.0.2.10]) by mx.example.com; "
           b"Mon, 7 Dec 2026 12:00:00 +0000\r\n\r\nHello.\r\n")
    message = make_message(recipients=["alice@example.com"], raw=raw)
    logged_in(client, personas.alice)
    response = client.get(f"/messages/{message.queue_id}/")
    assert response.status_code == 200
    parsed = response.context["parsed"]
    assert not parsed.truncated and parsed.problems == []
    assert [hop.ip for hop in parsed.hops] == ["192.0.2.10"]
