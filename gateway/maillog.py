"""The mail log in Postfix's shape: one line per event, that pflogsumm, fail2ban and an administrator's grep read
as they read Postfix's (docs/operations.md, "The mail log").

Each process logs under the name of the Postfix program that does the same job, so that tools keyed on
those names count our lines as theirs (pflogsumm: `--syslog-name=mailgate`):

    mailgate/smtpd[pid]: 4Xk2...: client=mail.example.net[192.0.2.7]
    mailgate/qmgr[pid]:  4Xk2...: from=<alice@example.net>, size=2048, nrcpt=1 (queue active)
    mailgate/smtpd[pid]: NOQUEUE: reject: RCPT from mail.example.net[192.0.2.7]: 550 5.1.1 <x@example.org>:
                         Recipient address rejected: User unknown; from=<alice@example.net> to=<x@example.org>
                         proto=ESMTP helo=<mail.example.net>
    mailgate/smtpd[pid]: warning: unknown[192.0.2.9]: SASL PLAIN authentication failed: user=<bob>
    mailgate/scan[pid]:  4Xk2...: verdict=clean, action=deliver, score=0.4
    mailgate/smtp[pid]:  4Xk2...: to=<bob@example.org>, relay=10.0.0.5[10.0.0.5]:25, delay=1.2, dsn=2.0.0,
                         status=sent (250 2.0.0 Ok: queued as 1234)
    mailgate/web[pid]:   warning: unknown[192.0.2.9]: web login authentication failed: user=<bob>

The SMTP server is `smtpd` and delivery `smtp`, as in Postfix (the server receives, the client sends). These
lines go to the logger `mailgate.<program>`; settings.LOGGING gives them their own handlers: syslog (facility
mail) with LOG_SYSLOG, a file in syslog's format with MAIL_LOG_FILE, else standard error in that format. What
a client sends (addresses, HELO names, logins) is written with its control characters escaped, so that no
client can write a line of its own into the log.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Iterable

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_HOSTNAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})$")
_ENHANCED = re.compile(r"^(?:\d{3}[ -])?([245])\.(\d{1,3})\.(\d{1,3})\b")


# The programs whose names the lines carry (mailgate/<program>).
PROGRAMS = ("smtpd", "cleanup", "qmgr", "scan", "smtp", "bounce", "web")


def _logger(program: str) -> logging.Logger:
    return logging.getLogger(f"mailgate.{program}")


def clean(value: object, limit: int = 320) -> str:
    """A value from outside, safe on one log line: control characters escaped, at most `limit` characters."""
    text = str(value if value is not None else "")[:limit]
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def client(name: str | None, ip: str | None) -> str:
    """`name[ip]` as Postfix writes the client: 'unknown' when it has no name, or one that is not a DNS name
    (a PTR record says what its owner likes, brackets included: fail2ban reads the address after the name)."""
    name = name if name and _HOSTNAME.match(name) else "unknown"
    try:
        address = str(ipaddress.ip_address(ip or ""))
    except ValueError:
        address = "unknown"
    return f"{name}[{address}]"


def relay(host: str, port: int) -> str:
    """`host[ip]:port` of a destination; a host given by name is written as named (we do not resolve it again)."""
    try:
        ip = str(ipaddress.ip_address(host.strip("[]")))
        return f"{ip}[{ip}]:{port}"
    except ValueError:
        return f"{clean(host, 255)}:{port}"


def dsn_of(code: int, text: str) -> str:
    """The enhanced status code of a reply (`5.1.1`), or the class of its basic code when it has none."""
    found = _ENHANCED.match(text.strip())
    if found and found.group(1) == str(code)[:1]:
        return ".".join(found.groups())
    return f"{str(code)[:1] or '4'}.0.0"


# --- the SMTP server -------------------------------------------------------------------------------------


def accepted(queue_id: str, *, client_name: str | None, client_ip: str | None, sender: str, size: int,
             recipients: int, message_id: str = "", sasl_method: str = "", sasl_username: str = "") -> None:
    """A message taken (after the commit that holds it): the client, its Message-ID, its sender and size."""
    line = f"{queue_id}: client={client(client_name, client_ip)}"
    if sasl_username:
        line += f", sasl_method={clean(sasl_method, 20)}, sasl_username={clean(sasl_username, 150)}"
    _logger("smtpd").info(line)
    if message_id:
        _logger("cleanup").info("%s: message-id=%s", queue_id, clean(message_id, 998))
    _logger("qmgr").info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", queue_id, clean(sender), size, recipients)


def rejected(command: str, *, client_name: str | None, client_ip: str | None, reply: str, sender: str | None,
             recipients: Iterable[str] = (), helo: str = "", proto: str = "ESMTP") -> None:
    """An attempt refused at SMTP time: `NOQUEUE: reject: RCPT from name[ip]: 550 5.1.1 ...; from=<> to=<>`."""
    line = f"NOQUEUE: reject: {command} from {client(client_name, client_ip)}: {clean(reply, 512)}"
    details = []
    if sender is not None:
        details.append(f"from=<{clean(sender)}>")
    first = next(iter(recipients), None)  # Postfix names one recipient per line
    if first is not None:
        details.append(f"to=<{clean(first)}>")
    details.append(f"proto={proto}")
    if helo:
        details.append(f"helo=<{clean(helo, 255)}>")
    _logger("smtpd").info(f"{line}; {' '.join(details)}")


def auth_failed(*, client_name: str | None, client_ip: str | None, mechanism: str, username: str) -> None:
    """A failed SMTP AUTH, as Postfix logs it (fail2ban's filter keys on it: conf/fail2ban/)."""
    _logger("smtpd").warning("warning: %s: SASL %s authentication failed: user=<%s>",
                             client(client_name, client_ip), clean(mechanism, 20).upper(), clean(username, 150))


def web_login_failed(*, client_ip: str | None, username: str, throttled: bool = False) -> None:
    """A failed login to the web UI or the admin (fail2ban's filter keys on it too)."""
    what = "refused (throttled)" if throttled else "failed"
    _logger("web").warning("warning: %s: web login authentication %s: user=<%s>", client(None, client_ip), what,
                           clean(username, 150))


# --- the workers -----------------------------------------------------------------------------------------


def scanned(queue_id: str, *, verdict: str, action: str, score: float | None, viruses: Iterable[str] = (),
            policy: str = "") -> None:
    """The scan's verdict; `policy`: the spam policy that decided when it is not the global one ("per
    recipient" when the recipients' differ: each has a line of its own, `recipient_verdict`)."""
    line = f"{queue_id}: verdict={verdict}, action={action}"
    if score is not None:
        line += f", score={score:.1f}"
    names = [clean(v, 100) for v in viruses]
    if names:
        line += f", viruses={' '.join(names)}"
    if policy:
        line += f", policy={clean(policy, 400)}"
    _logger("scan").info(line)


def recipient_verdict(queue_id: str, *, recipient: str, verdict: str, action: str, policy: str) -> None:
    """One recipient's verdict, when a message's recipients had different spam policies:
    `to=<...>, verdict=..., action=..., policy=...`."""
    _logger("scan").info("%s: to=<%s>, verdict=%s, action=%s, policy=%s", queue_id, clean(recipient), verdict,
                         action, clean(policy, 400))


def delivery(queue_id: str, *, recipient: str, relay_to: str, delay: float, code: int, text: str,
             status: str) -> None:
    """One recipient's outcome: `to=<...>, relay=..., delay=..., dsn=..., status=sent|deferred|bounced (reply)`."""
    _logger("smtp").info("%s: to=<%s>, relay=%s, delay=%s, dsn=%s, status=%s (%s)", queue_id, clean(recipient),
                         relay_to or "none", _seconds(delay), dsn_of(code, text), status, clean(text, 512))


def notice(queue_id: str, dsn_queue_id: str, kind: str = "non-delivery") -> None:
    """A DSN sent to the sender of `queue_id`, as Postfix's bounce daemon logs it."""
    _logger("bounce").info("%s: sender %s notification: %s", queue_id, kind, dsn_queue_id)


def _seconds(value: float) -> str:
    # Postfix: two significant digits under a second, a tenth of a second above.
    value = max(0.0, value)
    return f"{value:.2g}" if value < 1 else f"{value:.1f}"


# --- where the lines go ----------------------------------------------------------------------------------


class PostfixFormatter(logging.Formatter):
    """`mailgate/<program>[pid]: text`, with syslog's traditional `Mmm dd hh:mm:ss host ` before it unless
    the line goes to syslog (which adds its own)."""

    def __init__(self, *args, header: bool = True, hostname: str = "", **kwargs):
        super().__init__()
        self.header = header
        name = hostname or os.getenv("NODE_NAME", "") or socket.gethostname()
        self.hostname = name.split(".")[0] or "localhost"

    def format(self, record: logging.LogRecord) -> str:
        program = record.name.replace(".", "/", 1)
        line = f"{program}[{record.process}]: {record.getMessage()}"
        if not self.header:
            return line
        t = time.localtime(record.created)
        stamp = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        return f"{stamp} {self.hostname} {line}"


def syslog_address(value: str) -> str | tuple[str, int]:
    """LOG_SYSLOG_ADDRESS: a Unix socket path (/dev/log), or HOST:PORT for syslog over UDP."""
    if value.startswith("/"):
        return value
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"LOG_SYSLOG_ADDRESS: write a socket path (/dev/log) or HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


def handlers(*, syslog: bool, syslog_address_value: str, log_file: str, node_name: str) -> tuple[dict, dict]:
    """The `formatters` and `handlers` of settings.LOGGING for the logger `mailgate`."""
    formatters = {
        "postfix": {"()": PostfixFormatter, "hostname": node_name},
        "postfix-syslog": {"()": PostfixFormatter, "header": False, "hostname": node_name},
    }
    found: dict[str, dict] = {}
    if syslog:
        found["mail-syslog"] = {"class": "logging.handlers.SysLogHandler", "formatter": "postfix-syslog",
                                "address": syslog_address(syslog_address_value), "facility": "mail"}
    if log_file:
        # WatchedFileHandler opens the file again when logrotate moved it away.
        found["mail-file"] = {"class": "logging.handlers.WatchedFileHandler", "formatter": "postfix",
                              "filename": log_file}
    if not found:
        found["mail-stderr"] = {"class": "logging.StreamHandler", "formatter": "postfix"}
    return formatters, found
