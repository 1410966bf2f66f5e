"""What a directory holds: every address of every entry, kept as DirectoryAddress rows for the directory page
and printed by `manage.py directory sync` for scripts; optionally, the accounts of people no longer there
disabled. And a configuration tested (`check`): the connection, a login and an address, as the gateway would
see them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from gateway.access import Role
from gateway.models import Directory, DirectoryAddress, UserProfile, record_audit

from . import imap
from . import ldap as directory_ldap
from .login import grant, granted_domains, in_domains
from .tls import Unreachable

log = logging.getLogger(__name__)


@dataclass
class SyncResult:
    directory: str
    entries: int = 0
    addresses: list[tuple[str, str, str, str]] = field(default_factory=list)  # (address, primary, name, dn)
    added: int = 0
    removed: int = 0
    disabled: list[str] = field(default_factory=list)
    seconds: float = 0.0


def sync(directory: Directory, *, disable_missing: bool = False, user=None) -> SyncResult:
    """List the directory (LDAP) into DirectoryAddress: only addresses of the domains it speaks for. With
    `disable_missing`, its accounts whose address is no longer there are disabled (an administrator enables one
    again, on the user page); a listing that finds nobody disables nobody. Raises directory_ldap.Unreachable;
    writes nothing then."""
    if directory.kind != Directory.Kind.LDAP:
        raise ValueError(f"{directory.name} is an IMAP server: it cannot list its mailboxes")
    started = time.monotonic()
    result = SyncResult(directory=directory.name)
    allowed = granted_domains(directory)
    for entry in directory_ldap.entries(directory):
        own = in_domains(entry.addresses, allowed)
        if not own:
            continue
        result.entries += 1
        result.addresses += [(address, own[0], entry.name, entry.dn) for address in own]
    now = timezone.now()
    found = {row[0]: row for row in result.addresses}
    with transaction.atomic():
        before = set(DirectoryAddress.objects.filter(directory=directory).values_list("address", flat=True))
        gone = before - set(found)
        DirectoryAddress.objects.filter(directory=directory, address__in=gone).delete()
        existing = {a.address: a for a in DirectoryAddress.objects.filter(directory=directory)}
        new, changed = [], []
        for address, primary, name, dn in found.values():
            row = existing.get(address)
            if row is None:
                new.append(DirectoryAddress(directory=directory, address=address, primary=primary, name=name[:300],
                                            dn=dn[:1000], synced_at=now))
            else:
                row.primary, row.name, row.dn, row.synced_at = primary, name[:300], dn[:1000], now
                changed.append(row)
        DirectoryAddress.objects.bulk_create(new, batch_size=1000)
        DirectoryAddress.objects.bulk_update(changed, ["primary", "name", "dn", "synced_at"], batch_size=1000)
        result.added, result.removed = len(new), len(gone)
        if disable_missing and not result.entries:
            # An empty listing is far likelier a directory that stopped showing us its people (a changed base,
            # the service account's rights) than everyone gone: nobody is disabled on its word.
            log.warning("directory %s listed nobody: no account disabled", directory.name)
        elif disable_missing:
            User = get_user_model()
            primaries = {row[1] for row in result.addresses}
            for account in User.objects.filter(mail_profile__directory=directory, is_active=True):
                if account.get_username().lower() not in primaries:
                    account.is_active = False
                    account.save(update_fields=["is_active"])
                    result.disabled.append(account.get_username())
    result.seconds = round(time.monotonic() - started, 3)
    record_audit("directory_sync", user=user, target=f"directory {directory.name}", entries=result.entries,
                 addresses=len(result.addresses), added=result.added, removed=result.removed,
                 disabled=result.disabled)
    log.info("directory %s: %s entries, %s addresses (%s new, %s gone), %s accounts disabled, %.1f s",
             directory.name, result.entries, len(result.addresses), result.added, result.removed,
             len(result.disabled), result.seconds)
    return result


@dataclass
class CheckLine:
    ok: bool
    what: str


def check(directory: Directory, *, login: str = "", password: str = "", address: str = "") -> list[CheckLine]:
    """Test a configuration step by step, in words: the connection (TLS, the certificate, the service account),
    what a login finds (its entry, addresses and role) or, with a password, whether it would log in (IMAP), and
    what the recipient check answers for an address. Nothing is written."""
    lines: list[CheckLine] = []
    if directory.kind == Directory.Kind.IMAP:
        if login and password:
            try:
                ok = imap.login(directory, login.strip().lower(), password)
            except Unreachable as exc:
                return [CheckLine(False, f"cannot reach {directory.uri}: {exc}")]
            lines.append(CheckLine(True, f"connected to {directory.uri} over TLS, the certificate verified"))
            lines.append(CheckLine(ok, f"{login}: " + ("the server takes this password" if ok
                                                       else "the server refuses this password")))
        else:
            lines.append(CheckLine(False, "an IMAP server is tested with a login and its password"))
        return lines
    try:
        conn = directory_ldap.connect(directory)
        conn.unbind_s()
    except Unreachable as exc:
        return [CheckLine(False, f"cannot reach {directory.uri} or bind as "
                                 f"{directory.bind_dn or 'anonymous'}: {exc}")]
    how = "StartTLS" if directory_ldap.uses_start_tls(directory) else "LDAPS"
    lines.append(CheckLine(True, f"connected to {directory.uri} ({how}, the certificate verified) and bound as "
                                 f"{directory.bind_dn or 'anonymous'}"))
    if login:
        try:
            person = directory_ldap.lookup_person(directory, login)
        except Unreachable as exc:
            lines.append(CheckLine(False, f"{login}: the search failed: {exc}"))
            person = None
        else:
            if person is None:
                lines.append(CheckLine(False, f"{login}: no entry matches {directory.user_filter}"))
        if person is not None:
            account = UserProfile.objects.filter(directory=directory, user__username__in=person.addresses).first()
            given = grant(directory, person.addresses, admin=person.admin, domain_admin=person.domain_admin,
                          user_pk=account.user_id if account is not None else None)
            lines.append(CheckLine(True, f"{login}: {person.dn}"))
            lines.append(CheckLine(bool(given.addresses), "addresses: " + (
                ", ".join(given.addresses) or "none in the domains this directory speaks for")
                + (f" (not ours, left out: {', '.join(given.left_out)})" if given.left_out else "")
                + (f" (another account's, left out: {', '.join(given.taken)})" if given.taken else "")))
            role = Role(given.role).label
            if given.role == Role.DOMAIN_ADMIN:
                role += " of " + ", ".join(given.domains)
            lines.append(CheckLine(True, f"role: {role}"))
    if address:
        try:
            conn = directory_ldap.connect(directory)
            try:
                dn = directory_ldap.find_address(conn, directory, address.strip().lower())
            finally:
                conn.unbind_s()
        except Unreachable as exc:
            lines.append(CheckLine(False, f"<{address}>: the search failed: {exc}"))
        else:
            lines.append(CheckLine(dn is not None, f"<{address}>: " + (f"found, {dn}" if dn else
                                                                       "not found: the recipient check answers "
                                                                       "550 5.1.1")))
    return lines
