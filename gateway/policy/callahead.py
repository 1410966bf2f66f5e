"""Recipient verification by call-ahead: ask the route's mail server whether it would take RCPT TO:<x>.

The answer is kept in the database (RecipientVerification, shared by the nodes) and for a few minutes in
memory: `callahead_positive_hours` for an address that exists, `callahead_negative_minutes` for one that does
not. A server that cannot be asked (down, 4xx) gives 'unknown', which is not kept.
"""

from __future__ import annotations

import smtplib
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from gateway.memo import ExpiringMemory
from gateway.models import RecipientVerification

MEMORY_SECONDS = 300


@dataclass(frozen=True)
class Answer:
    state: str  # exists | unknown_user | unreachable
    reply: str
    cached: bool = False


class CallAhead:
    def __init__(self):
        self._memory: ExpiringMemory[Answer] = ExpiringMemory(most_seconds=MEMORY_SECONDS)
        self.probes = 0

    def verify(self, address: str, host: str, port: int, *, positive_hours: int, negative_minutes: int) -> Answer:
        """Synchronous (database and SMTP): run it in a thread."""
        address = address.lower()
        hit = self._memory.get(address)
        if hit is not None:
            return hit
        close_old_connections()
        now = timezone.now()
        row = RecipientVerification.objects.filter(address=address, expires_at__gt=now).first()
        if row is not None:
            answer = Answer("exists" if row.exists else "unknown_user", row.reply, cached=True)
            self._remember(address, answer, (row.expires_at - now).total_seconds())
            return answer
        answer = self.probe(address, host, port)
        if answer.state != "unreachable":
            ttl = timedelta(hours=positive_hours) if answer.state == "exists" else timedelta(minutes=negative_minutes)
            RecipientVerification.objects.update_or_create(
                address=address, defaults={"exists": answer.state == "exists", "reply": answer.reply[:512],
                                           "checked_at": now, "expires_at": now + ttl})
            self._remember(address, answer, ttl.total_seconds())
        return answer

    def _remember(self, address: str, answer: Answer, ttl: float) -> None:
        self._memory.put(address, Answer(answer.state, answer.reply, cached=True), ttl)

    def probe(self, address: str, host: str, port: int) -> Answer:
        """EHLO, MAIL FROM, RCPT TO, RSET, QUIT: the server's answer to the RCPT is the answer."""
        self.probes += 1
        try:
            with smtplib.SMTP(host, port, local_hostname=settings.SMTP_HOSTNAME,
                              timeout=settings.SMTP_CALLAHEAD_TIMEOUT) as smtp:
                smtp.ehlo_or_helo_if_needed()
                code, text = smtp.mail(settings.SMTP_CALLAHEAD_SENDER or "")
                if code >= 400:
                    return Answer("unreachable", f"{code} {text.decode('utf-8', 'replace')}"[:300])
                code, text = smtp.rcpt(address)
                reply = f"{code} {text.decode('utf-8', 'replace')}"[:300]
                try:
                    smtp.rset()
                except smtplib.SMTPException:
                    pass
        except (OSError, smtplib.SMTPException) as exc:  # socket.timeout is an OSError
            return Answer("unreachable", f"{type(exc).__name__}: {exc}"[:300])
        if 200 <= code < 300:
            return Answer("exists", reply)
        if 500 <= code < 600:
            return Answer("unknown_user", reply)
        return Answer("unreachable", reply)
