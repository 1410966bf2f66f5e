"""Test messages built the way mail clients build them (the corpus holds the real-world ones), and the
corpus files: `corpus_path(relative)` (also the `corpus` fixture) and `read_mail(path)` (a file as a message)."""

from __future__ import annotations

import io
import logging
import zipfile
from email.message import EmailMessage

import pytest

from tests.support.services import CORPUS

GTUBE_PATH = "mime/spamassassin-t-data/t/data/spam/gtube.eml"
EICAR_PATH = "virus/eicar/eicar.com"


def eicar() -> bytes:
    return (CORPUS / EICAR_PATH).read_bytes()


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def message(*, subject: str = "Test", body: str = "Hello,\nthis is a test.\n", sender: str = "alice@sender.example",
            to: str = "bob@example.org", attachments: list[tuple[str, str, bytes]] | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{abs(hash((subject, body)))}@sender.example>"
    msg.set_content(body)
    for name, ctype, data in attachments or []:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


MZ_PROGRAM = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff" + b"\x00" * 200


def corpus_path(relative: str):
    path = CORPUS / relative
    if not path.exists():
        from tests.support.services import unavailable

        unavailable(f"the corpus file {path} is missing")
    return path


@pytest.fixture
def corpus():
    return corpus_path


def read_mail(path) -> bytes:
    """A corpus file as a message: without the mbox 'From ' line, with CRLF line ends."""
    data = path.read_bytes()
    if data.startswith(b"From "):
        data = data.split(b"\n", 1)[1]
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.fixture
def mail_log(tmp_path):
    """The Postfix-style lines of this test, in a file as MAIL_LOG_FILE would have them."""
    from appliance.celery import app
    from gateway import maillog

    # Celery's Django fix-up runs django.setup() (LOGGING again: handlers added since are dropped) when the
    # app first loads its task modules: the first eager task of the run. Done now, before the handler is added.
    app.loader.import_default_modules()
    path = tmp_path / "mail.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(maillog.PostfixFormatter(hostname="mx1"))
    loggers = [logging.getLogger(f"mailgate.{program}") for program in maillog.PROGRAMS]
    for logger in loggers:
        logger.addHandler(handler)
    yield path
    for logger in loggers:
        logger.removeHandler(handler)
    handler.close()
