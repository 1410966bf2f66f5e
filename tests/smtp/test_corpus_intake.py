"""Every message of the broken-MIME collections through our SMTP server and the scan: each is either
accepted and logged or refused with a clear SMTP reply; nothing crashes, nothing is lost."""

import smtplib
from collections import Counter

import pytest

from gateway.models import Message
from gateway.scan import run as scan_run

NOT_MAIL = {"LICENSE", "NOTICE", "SOURCE.txt", "README", "README.md", "README.txt"}


def corpus_messages(root):
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in NOT_MAIL and path.suffix not in (".xml", ".py", ".json", ".md") \
                and path.stat().st_size:
            yield path


@pytest.fixture
def clamd_only(settings, clamd):
    settings.CLAMD_URL = clamd
    settings.SPAMD_URL = ""  # spamd's robustness is spamd's; its time is spent in test_scanning


def test_every_mime_corpus_message(clamd_only, gateway_smtp, protected_domain, capture_server, corpus, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = False  # accept first, scan below: intake and scan are judged apart
    paths = list(corpus_messages(corpus("mime")))
    assert len(paths) > 900
    accepted, refused, replies = 0, 0, {}
    client = None
    for path in paths:
        raw = path.read_bytes()
        if raw.startswith(b"From "):
            raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
        if client is None:
            client = gateway_smtp.client()
            client.ehlo()
        try:
            client.mail("corpus@sender.example", ["BODY=8BITMIME"])
            client.rcpt("bob@example.org")
            code, reply = client.data(raw)
        except smtplib.SMTPDataError as exc:
            code, reply = exc.smtp_code, exc.smtp_error
        except smtplib.SMTPServerDisconnected:
            pytest.fail(f"the server dropped the connection on {path}")
        assert 200 <= code < 600 and reply[:1] in b"245" and len(reply) > 6, (path, code, reply)
        if code == 250:
            accepted += 1
        else:
            refused += 1
            replies[path.name] = (code, reply)
            client.rset()
    client.quit()
    assert accepted + refused == len(paths)
    logged = Message.objects.exclude(state=Message.State.REFUSED)
    assert logged.count() == accepted, "one logged message per 250 reply"
    assert Message.objects.filter(state=Message.State.REFUSED).count() == refused
    for code, reply in replies.values():
        assert code in (500, 552, 554), reply  # too long a line, too big: each with its enhanced code
    # Now the scan of each: a verdict for every one, and no exception.
    for message_id in logged.values_list("pk", flat=True):
        assert scan_run.run_scan(message_id) not in ("gone", "taken", "deferred")
    assert not Message.objects.filter(state__in=["received", "scanning", "scan_deferred"]).exists()
    # Broken MIME that can be read more than one way, or not whole, is held as unscannable (fail closed).
    assert set(logged.values_list("verdict", flat=True)) <= {"clean", "virus", "blocked_attachment", "unscannable"}
    verdicts = Counter(logged.values_list("verdict", flat=True))
    print(f"{len(paths)} corpus messages: {accepted} accepted and logged, {refused} refused: {replies}; "
          f"verdicts {dict(verdicts)}")
