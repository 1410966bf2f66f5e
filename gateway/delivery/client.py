"""The SMTP client side of a delivery: one transaction to one destination, on a session kept open for the
next message to the same place (as Postfix's connection cache does), with PIPELINING where offered.

Each recipient's outcome is handed to the caller's `record` (gateway.delivery.attempt writes it): this
module speaks SMTP and keeps sessions; it writes nothing.
"""

from __future__ import annotations

import smtplib
import ssl
import threading
import time
from collections.abc import Callable

from django.conf import settings

from gateway import mailbytes
from gateway.models import Message, Recipient

from .routing import Destination

# record(recipients, code, text, *, permanent=False, delivered=False, destination=None, tried=None): an outcome
# (`destination`: the server whose acceptance it was; `tried`: the server that answered otherwise).
Record = Callable[..., None]

# Kept sessions.
# A session to a destination is kept open after a delivery for the next message to the same place, as
# Postfix's connection cache does: the connection, greeting, EHLO (and STARTTLS) and QUIT of every
# message were a third of the exchanges with the downstream server. Per thread (smtplib is not
# thread-safe), for SESSION_IDLE_SECONDS at most between uses and SESSION_MAX_USES messages.
SESSION_IDLE_SECONDS = 2.0
SESSION_MAX_USES = 100


class _Sessions(threading.local):
    def __init__(self) -> None:
        self.cache: dict = {}  # destination -> (session, last used, messages carried)


_sessions = _Sessions()


def _session_cache() -> dict:
    return _sessions.cache


def _quit(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()


def drop_sessions() -> None:
    """Close this thread's kept sessions."""
    cache = _session_cache()
    while cache:
        _quit(cache.popitem()[1][0])


def reply_text(code: int, text: bytes | str) -> str:
    """A reply as one line for the log and the DSN: the code, the text's words, at most 1000 characters."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {' '.join(text.split())}"[:1000]


def send(message: Message, destination: Destination, group: list[Recipient], data: bytes, record: Record) -> None:
    """One transaction for these recipients of the message; each outcome goes to `record`. Raises the
    connection's errors (refused, timed out, dropped), for the caller to try the next destination."""
    smtp, uses = _session(destination)
    try:
        try:
            first = _mail_from(smtp, message, group, data, record)
        except (OSError, smtplib.SMTPServerDisconnected):
            if not uses:
                raise
            first = (421, b"the kept session was closed")
        if uses and first is not None and first[0] == 421:
            # The kept session went stale (the server closed it, or is closing it): nothing of this
            # transaction was accepted, so it starts again on a new connection.
            smtp.close()
            smtp, uses = _connect(destination), 0
            first = _mail_from(smtp, message, group, data, record)
        reusable = _transaction(smtp, destination, group, data, first, record)
    except BaseException:
        smtp.close()
        raise
    if reusable and uses + 1 < SESSION_MAX_USES:
        _session_cache()[destination] = (smtp, time.monotonic(), uses + 1)
    else:
        _quit(smtp)


def _session(destination: Destination) -> tuple[smtplib.SMTP, int]:
    """This thread's kept session to the destination if it is fresh enough, else a new one; and how many
    messages the session carried before."""
    kept = _session_cache().pop(destination, None)
    if kept is not None:
        smtp, last_used, uses = kept
        if time.monotonic() - last_used <= SESSION_IDLE_SECONDS:
            return smtp, uses
        _quit(smtp)
    return _connect(destination), 0


def _connect(destination: Destination) -> smtplib.SMTP:
    smtp = smtplib.SMTP(destination.host, destination.port, local_hostname=settings.SMTP_HOSTNAME,
                        timeout=settings.DELIVERY_TIMEOUT)
    try:
        smtp.ehlo()
        if smtp.has_extn("starttls"):
            context = ssl.create_default_context()
            if not destination.require_tls:
                # Opportunistic TLS (RFC 7435): encrypt when offered, without authenticating the peer.
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            smtp.starttls(context=context)
            smtp.ehlo()
        elif destination.require_tls:
            raise smtplib.SMTPException(f"{destination} does not offer STARTTLS and the route requires it")
    except BaseException:
        smtp.close()
        raise
    return smtp


def _mail_from(smtp: smtplib.SMTP, message: Message, group: list[Recipient], data: bytes,
               record: Record) -> tuple[int, bytes] | None:
    """MAIL FROM with the parameters this message needs, and its reply; None when the message cannot be
    sent on this session at all (recorded: a non-ASCII address without SMTPUTF8).

    When the server offers PIPELINING (RFC 2920), the RCPT commands and DATA go in the same write, and
    their replies are read by `_transaction`: one round trip instead of two plus one per recipient."""
    options = []
    if smtp.has_extn("8bitmime") and "BODY=8BITMIME" in message.mail_options:
        options.append("BODY=8BITMIME")
    addresses = [message.envelope_sender, *(r.address for r in group)]
    utf8 = "SMTPUTF8" in message.mail_options or not all(a.isascii() for a in addresses)
    if utf8:
        if not smtp.has_extn("smtputf8"):
            record(group, 553, "5.6.7 the destination does not support SMTPUTF8", permanent=True)
            return None
        options.append("SMTPUTF8")
    if smtp.has_extn("size"):
        options.append(f"SIZE={len(data)}")
    # The addresses as the envelope gave them (checked at intake), not re-parsed as header addresses.
    commands = ["MAIL FROM:<" + message.envelope_sender + ">" + "".join(" " + o for o in options)]
    if smtp.has_extn("pipelining"):
        commands += [f"RCPT TO:<{r.address}>" for r in group] + ["DATA"]
    # Every command of this transaction (the RCPTs sent one at a time too) in UTF-8 only with SMTPUTF8;
    # a non-ASCII address without it raises UnicodeEncodeError.
    smtp.command_encoding = "utf-8" if utf8 else "ascii"
    smtp.send("".join(c + "\r\n" for c in commands))
    return smtp.getreply()


def _transaction(smtp: smtplib.SMTP, destination: Destination, group: list[Recipient], data: bytes,
                 first: tuple[int, bytes] | None, record: Record) -> bool:
    """The rest of the transaction after MAIL FROM; True when the session can carry another message."""
    if first is None:
        return True
    pipelined = smtp.has_extn("pipelining")  # the RCPTs and DATA went with MAIL FROM
    code, text = first
    if code != 250:
        record(group, code, reply_text(code, text), permanent=code >= 500, tried=destination)
        if code == 421:
            return False  # the server is closing the session
        if pipelined:
            for _ in range(len(group) + 1):  # the replies to the RCPTs and DATA sent with it
                smtp.getreply()
        smtp.rset()
        return True
    accepted = []
    for recipient in group:
        if pipelined:
            code, text = smtp.getreply()
        else:
            code, text = smtp.docmd("RCPT", f"TO:<{recipient.address}>")
        if code in (250, 251):
            accepted.append(recipient)
        else:
            record([recipient], code, reply_text(code, text), permanent=code >= 500, tried=destination)
    if pipelined:
        code, text = smtp.getreply()
    elif accepted:
        code, text = smtp.docmd("DATA")
    if not accepted:
        if pipelined and code == 354:
            # A server that opened DATA although it refused every recipient gets an empty message.
            smtp.send(b".\r\n")
            smtp.getreply()
        smtp.rset()
        return code != 421
    if code != 354:
        record(accepted, code, reply_text(code, text), permanent=code >= 500, tried=destination)
        smtp.rset()
        return code != 421
    smtp.send(mailbytes.dot_stuffed(data))
    code, text = smtp.getreply()
    record(accepted, code, reply_text(code, text), permanent=code >= 500,
                 delivered=code == 250, destination=destination)
    return code != 421
