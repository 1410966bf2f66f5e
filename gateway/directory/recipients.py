"""The recipient check of a domain whose check is "ldap": is the address in the domain's directory?

The domain's own LDAP directories are asked first, then those without a domain; an address one of them holds
exists. Answers are kept in the database (DirectoryLookup, shared by the SMTP nodes) for the directory's
`positive_minutes` / `negative_minutes`, and for at most a few minutes in this process's memory. A directory
that cannot be asked gives "unreachable", which is not kept: the SMTP side answers 451 4.4.3 or accepts, as the
directory's `unreachable` says. Each thread keeps its connection to each directory for the next lookup.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from django.db import close_old_connections
from django.utils import timezone

from gateway.memo import ExpiringMemory
from gateway.models import Directory, DirectoryLookup

from . import ldap as directory_ldap

MEMORY_SECONDS = 300
DIRECTORIES_SECONDS = 30  # how long the list of directories is read from the database for


@dataclass(frozen=True)
class Answer:
    state: str  # exists | unknown_user | unreachable
    detail: str  # the entry's DN, or why the directory could not be asked
    directory: str = ""
    cached: bool = False
    unreachable_action: str = Directory.Unreachable.TEMPFAIL


class DirectoryRecipients:
    def __init__(self):
        self._memory: ExpiringMemory[Answer] = ExpiringMemory(most_seconds=MEMORY_SECONDS)
        self._local = threading.local()
        self._directories: tuple[float, list[Directory]] = (0.0, [])
        self.lookups = 0  # searches sent to a directory (the tests see the cache work)

    def verify(self, address: str, domain: str) -> Answer:
        """Synchronous (database and LDAP): run it in a thread."""
        address = address.lower()
        hit = self._memory.get(address)
        if hit is not None:
            return hit
        close_old_connections()
        directories = self._for_domain(domain)
        if not directories:
            return Answer("unreachable", f"no LDAP directory is configured for {domain}")
        now = timezone.now()
        row = DirectoryLookup.objects.filter(address=address, expires_at__gt=now).select_related("directory").first()
        if row is not None and any(d.pk == row.directory_id for d in directories):
            answer = Answer("exists" if row.exists else "unknown_user", row.dn, row.directory.name, cached=True)
            self._remember(address, answer, (row.expires_at - now).total_seconds())
            return answer
        unreachable: Answer | None = None
        for directory in directories:
            try:
                dn = self._search(directory, address)
            except directory_ldap.Unreachable as exc:
                unreachable = unreachable or Answer("unreachable", f"{directory.name}: {exc}", directory.name,
                                                    unreachable_action=directory.unreachable)
                continue
            if dn:
                return self._keep(address, directory, Answer("exists", dn, directory.name), now)
        if unreachable is not None:
            # Not found where it could be asked, and another directory could not be: it may be there.
            return unreachable
        return self._keep(address, directories[0], Answer("unknown_user", "", directories[0].name), now)

    def _keep(self, address: str, directory: Directory, answer: Answer, now) -> Answer:
        minutes = directory.positive_minutes if answer.state == "exists" else directory.negative_minutes
        if minutes:
            ttl = timedelta(minutes=minutes)
            DirectoryLookup.objects.update_or_create(
                address=address, defaults={"directory": directory, "exists": answer.state == "exists",
                                           "dn": answer.detail[:1000], "checked_at": now, "expires_at": now + ttl})
            self._remember(address, answer, ttl.total_seconds())
        return answer

    def _remember(self, address: str, answer: Answer, ttl: float) -> None:
        self._memory.put(address, Answer(answer.state, answer.detail, answer.directory, cached=True), ttl)

    def forget(self) -> None:
        """Forget what this process remembers (the tests; an administrator's change is seen within minutes)."""
        self._memory.clear()
        self._directories = (0.0, [])

    def _for_domain(self, domain: str) -> list[Directory]:
        loaded_at, directories = self._directories
        if time.monotonic() - loaded_at > DIRECTORIES_SECONDS:
            directories = list(Directory.objects.filter(active=True, kind=Directory.Kind.LDAP)
                               .select_related("domain"))
            self._directories = (time.monotonic(), directories)
        own = [d for d in directories if d.domain is not None and d.domain.name == domain]
        return own + [d for d in directories if d.domain is None]

    def _search(self, directory: Directory, address: str) -> str | None:
        self.lookups += 1
        connections: dict = self._local.__dict__.setdefault("connections", {})
        key = (directory.pk, directory.uri, directory.bind_dn, directory.bind_password, directory.ca_certificate)
        conn = connections.get(key)
        for attempt in (1, 2):
            if conn is None:
                conn = connections[key] = directory_ldap.connect(directory)
            try:
                return directory_ldap.find_address(conn, directory, address)
            except directory_ldap.Unreachable:
                # A kept connection the server closed since: once more on a new one, then it is unreachable.
                connections.pop(key, None)
                try:
                    conn.unbind_s()
                except Exception:  # noqa: BLE001 (the connection is broken already)
                    pass
                conn = None
                if attempt == 2:
                    raise
        return None
