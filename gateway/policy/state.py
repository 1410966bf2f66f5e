"""What the checks keep about one connection and one mail transaction while the client talks: their
results, the checks still running, and the notes that go into Message.checks."""

from __future__ import annotations

import asyncio
from typing import Any

from .results import CheckResult

# The kinds of listener: the inbound MX port (STARTTLS offered, no AUTH), submission (STARTTLS required,
# then AUTH required) and implicit TLS (AUTH required).
MX, SUBMISSION, SMTPS = "mx", "submission", "smtps"


def envelope_sender(envelope) -> str:
    """The envelope sender of an aiosmtpd envelope, '' for the null sender (and before MAIL)."""
    sender = (envelope.mail_from or "") if envelope is not None else ""
    return "" if sender == "<>" else sender


class Connection:
    """What the server knows about one TCP connection; it outlives the SMTP session a STARTTLS restarts."""

    def __init__(self, mode: str, client_ip: str | None, local_ip: str | None, implicit_tls: bool):
        self.mode = mode
        self.client_ip = client_ip
        self.local_ip = local_ip
        self.implicit_tls = implicit_tls
        self.trusted = False
        self.counted = False
        self.shared_member = ""  # this connection's entry in the shared counts (gateway.policy.limits), if any
        self.results: list[CheckResult] = []  # connection checks done (rate limit, early talker, DNSBL, FCrDNS)
        self.pending: list[asyncio.Task] = []  # connection checks running
        self.tasks: set[asyncio.Task] = set()  # everything started for this connection
        self.name_task: asyncio.Future | None = None
        self.extra: dict[str, Any] = {}  # entries of Message.checks that are not check results (auth, tls)

    def start(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()


class Transaction:
    """One MAIL transaction's checks (a fresh one per MAIL, RSET and end of DATA)."""

    def __init__(self):
        self.results: list[CheckResult] = []
        self.pending: list[asyncio.Task] = []
        self.spf = None  # gateway.mailauth.spf.SPFResult, for DMARC and Authentication-Results
        self.added_headers: list[str] = []
        self.extra: dict[str, Any] = {}
        self.exempt = False  # a trusted network or an authenticated user
        self.greylist: dict[str, str] = {}
        self.greylist_seconds = 0.0
        self.callahead: dict[str, str] = {}
        self.callahead_seconds = 0.0
        self.directory: dict[str, str] = {}  # the recipient check of domains whose check is "ldap"
        self.directory_seconds = 0.0
