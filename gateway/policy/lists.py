"""The allow and block lists: which entry applies to a message, for one recipient (read by the SMTP
server at RCPT and by the scan).

The most specific scope wins (the user's own list, then the domain's, then the global one);
within one scope a block entry beats an allow entry.
"""

from __future__ import annotations

import ipaddress

from django.contrib.auth import get_user_model
from django.db.models import Q

from gateway.models import SenderListEntry
from gateway.snapshot import Snapshot


def sender_matches(pattern: str, sender: str, client_ip: str | None) -> bool:
    sender = sender.lower()
    domain = sender.rpartition("@")[2]
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    if pattern.startswith("@"):
        return domain == pattern[1:]
    if "@" in pattern:
        return sender == pattern
    if client_ip:
        try:
            return ipaddress.ip_address(client_ip) in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    return False


def users_for_address(address: str) -> list[int]:
    """The logins that own an address (their e-mail, or one of their aliases)."""
    User = get_user_model()
    address = address.lower()
    ids = set(User.objects.filter(email__iexact=address).values_list("pk", flat=True))
    for user_id, aliases in User.objects.filter(mail_profile__addresses__icontains=address).values_list(
            "pk", "mail_profile__addresses"):
        if address in (line.strip().lower() for line in aliases.splitlines()):
            ids.add(user_id)
    return sorted(ids)


_any_entries = Snapshot(SenderListEntry.objects.exists).clear_on_change(SenderListEntry)


def lists_are_empty() -> bool:
    """True when no allow/block entry exists at all (checked at most every CONFIG_CACHE_SECONDS)."""
    return not _any_entries.get()


def list_decision(sender: str, client_ip: str | None, recipient: str) -> SenderListEntry | None:
    """The entry that decides for this sender and recipient, or None when no list names the sender."""
    if lists_are_empty():
        return None
    domain = recipient.rpartition("@")[2].lower()
    candidates = SenderListEntry.objects.filter(
        Q(scope=SenderListEntry.Scope.GLOBAL)
        | Q(scope=SenderListEntry.Scope.DOMAIN, domain__name=domain)
        | Q(scope=SenderListEntry.Scope.USER, user_id__in=users_for_address(recipient))
    )
    rank = {SenderListEntry.Scope.USER: 0, SenderListEntry.Scope.DOMAIN: 1, SenderListEntry.Scope.GLOBAL: 2}
    matching = [entry for entry in candidates if sender_matches(entry.sender, sender, client_ip)]
    if not matching:
        return None
    matching.sort(key=lambda e: (rank[e.scope], e.kind != SenderListEntry.Kind.BLOCK))
    return matching[0]
