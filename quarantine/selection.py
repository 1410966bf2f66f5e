"""Which quarantined mail a login may see and act on, and which allow/block list entries it may manage.

Every rule is built on the one scoping rule (`Message.objects.visible_to`) and the roles of gateway.access;
the pages, the actions and the bulk jobs all ask here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import date, datetime, time, timedelta

from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils import timezone

from gateway.access import Role, domains_of, recipients_in_scope, role_of
from gateway.models import Domain, Message, Recipient, SenderListEntry, Verdict

# --- Who may do what to which quarantined message ------------------------------------------------------


def quarantine_of(user) -> QuerySet[Message]:
    """The quarantined messages this user may see, always through the one scoping function: those with a copy
    still held for them, and those they see as their sender only. A message whose copies for them are released
    or deleted leaves their quarantine, though other recipients' copies keep it in the quarantine."""
    return _held_for(Message.objects.visible_to(user), user)


def quarantine_parts(user) -> list[QuerySet[Message]] | None:
    """`quarantine_of(user)` as parts that each come newest first from one index (a user's: see
    `MessageQuerySet.newest_visible_parts`), for paging; None when one query already does."""
    parts = Message.objects.newest_visible_parts(user)
    return None if parts is None else [_held_for(part, user) for part in parts]


def _held_for(seen: QuerySet[Message], user) -> QuerySet[Message]:
    held = seen.filter(state=Message.State.QUARANTINED)
    if role_of(user) == Role.ADMIN:
        return held  # every copy is theirs: a quarantined message has one held
    theirs = recipients_in_scope(Recipient.objects.filter(message_id=OuterRef("pk")), user)
    return held.filter(Exists(theirs.filter(status=Recipient.Status.QUARANTINED)) | ~Exists(theirs))


def held_copies_for(message: Message, user) -> QuerySet[Recipient]:
    """The held recipients (the copies still in the quarantine) of `message` that this user may act for.

    Seeing a message is not enough to act on it: a user sees mail *from* their addresses too, and a
    domain administrator mail from their domains, and neither may push someone else's quarantined mail
    into another organisation's mailboxes, nor delete it from theirs. So: administrators all; domain
    administrators the recipients in their domains; users their own addresses; nobody else any.
    """
    held = message.recipients.filter(status=Recipient.Status.QUARANTINED).order_by("id")
    return recipients_in_scope(held, user)


def held_recipients_for(message: Message, user) -> list[str]:
    """The addresses of the held recipients of `message` this user may release or delete the message for."""
    return list(held_copies_for(message, user).values_list("address", flat=True))


def acts_for_a_recipient(message: Message, user) -> bool:
    """Whether this user acts for any recipient of `message`, held or not: what learning from it asks. Not so
    for someone who sees it only as its sender."""
    return recipients_in_scope(message.recipients.all(), user).exists()


# --- The quarantine filter -----------------------------------------------------------------------------

MAX_ADDRESS = 320
MAX_SUBJECT = 200


@dataclass(frozen=True)
class QuarantineFilter:
    """What the quarantine list and a bulk action on 'all that match' select. Empty fields select all.

    Kept with a bulk job as plain strings (`as_query`) and read back with `from_query`, which refuses what
    it cannot read: a stored filter that no longer reads selects nothing, never everything."""

    verdict: str = ""
    sender: str = ""
    recipient: str = ""
    subject: str = ""
    date_from: date | None = None
    date_to: date | None = None

    @classmethod
    def from_query(cls, data: Mapping[str, str]) -> QuarantineFilter | None:
        try:
            found = cls(
                verdict=str(data.get("verdict") or ""), sender=str(data.get("sender") or "").strip(),
                recipient=str(data.get("recipient") or "").strip(), subject=str(data.get("subject") or "").strip(),
                date_from=date.fromisoformat(data["date_from"]) if data.get("date_from") else None,
                date_to=date.fromisoformat(data["date_to"]) if data.get("date_to") else None)
        except (TypeError, ValueError):
            return None
        return found if found.valid() else None

    def valid(self) -> bool:
        if self.verdict and self.verdict not in Verdict.values:
            return False
        if len(self.sender) > MAX_ADDRESS or len(self.recipient) > MAX_ADDRESS or len(self.subject) > MAX_SUBJECT:
            return False
        return not (self.date_from and self.date_to and self.date_from > self.date_to)

    def apply(self, qs: QuerySet[Message]) -> QuerySet[Message]:
        if self.verdict:
            qs = qs.filter(verdict=self.verdict)
        if self.sender:
            qs = qs.filter(envelope_sender__icontains=self.sender)
        if self.recipient:
            # EXISTS rather than a join: a message with two matching recipients is listed once.
            qs = qs.filter(Exists(Recipient.objects.filter(message=OuterRef("pk"), address__icontains=self.recipient)))
        if self.subject:
            qs = qs.filter(subject__icontains=self.subject)
        zone = timezone.get_current_timezone()
        if self.date_from:
            qs = qs.filter(received_at__gte=datetime.combine(self.date_from, time.min, zone))
        if self.date_to:
            qs = qs.filter(received_at__lt=datetime.combine(self.date_to + timedelta(days=1), time.min, zone))
        return qs

    def as_query(self) -> dict[str, str]:
        """The filter as plain strings: stored with a bulk job, put back into links."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name)}


def filtered_quarantine(user, filters: Mapping[str, str]) -> QuerySet[Message]:
    """The user's quarantine narrowed by a stored filter; an invalid filter selects nothing, never everything."""
    selected = QuarantineFilter.from_query(filters)
    if selected is None:
        return Message.objects.none()
    return selected.apply(quarantine_of(user))


# --- Allow and block lists -----------------------------------------------------------------------------


def list_scopes_for(user) -> list[tuple[str, str]]:
    """The lists this login may add to: (scope, how the page names it)."""
    role = role_of(user)
    if role == Role.ADMIN:
        return [(SenderListEntry.Scope.GLOBAL, "Everyone (global)"), (SenderListEntry.Scope.DOMAIN, "A domain"),
                (SenderListEntry.Scope.USER, "Only me")]
    if role == Role.DOMAIN_ADMIN:
        return [(SenderListEntry.Scope.DOMAIN, "A domain of mine"), (SenderListEntry.Scope.USER, "Only me")]
    if role == Role.USER:
        return [(SenderListEntry.Scope.USER, "Only me")]
    return []


def list_domains_for(user) -> QuerySet[Domain]:
    """The domains whose list this login may change."""
    role = role_of(user)
    if role == Role.ADMIN:
        return Domain.objects.all()
    if role == Role.DOMAIN_ADMIN:
        return Domain.objects.filter(name__in=domains_of(user))
    return Domain.objects.none()


def list_entries_for(user) -> QuerySet[SenderListEntry]:
    """The entries this user may see and remove: all (administrators), their domains' and their own."""
    entries = SenderListEntry.objects.select_related("domain", "user", "created_by")
    role = role_of(user)
    if role == Role.ADMIN:
        return entries
    own = Q(scope=SenderListEntry.Scope.USER, user=user)
    if role == Role.DOMAIN_ADMIN:
        return entries.filter(own | Q(scope=SenderListEntry.Scope.DOMAIN, domain__name__in=domains_of(user)))
    if role == Role.USER:
        return entries.filter(own)
    return entries.none()
