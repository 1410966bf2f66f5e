"""What the links of a digest do: find one by its token, say whether it still works, use it once.

A link is bound to one action on one recipient of one message: found by the SHA-256 of its token, and then
only under the queue id and the action it was made for. It acts through the quarantine's own actions, for that
one recipient only and with the rights of the login whose digest it was in (an address without a login: for
itself); a second use, an expired link or a message that left the quarantine acts no more and says why.
Every use is written to the audit log with the client's address.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from gateway.access import may_release_virus, recipients_in_scope
from gateway.models import Message, RawMessage, Recipient, SenderListEntry, Verdict, record_audit
from quarantine.actions import delete_message, release_message

from .models import DigestLink, Subscription, UnsubscribeLink, hash_token

MAX_TOKEN = 100


def find(queue_id: str, action: str, token: str) -> DigestLink | None:
    """The link this token is, if it was made for this message and this action; else None (a 404)."""
    if not token or len(token) > MAX_TOKEN or action not in DigestLink.Action.values:
        return None
    link = (DigestLink.objects.select_related("message", "recipient", "subscription__user")
            .filter(token_hash=hash_token(token)).first())
    if link is None or link.message.queue_id != queue_id or link.action != action:
        return None
    return link


def find_unsubscribe(token: str) -> UnsubscribeLink | None:
    if not token or len(token) > MAX_TOKEN:
        return None
    return (UnsubscribeLink.objects.select_related("subscription__user")
            .filter(token_hash=hash_token(token)).first())


def actor_of(link: DigestLink):
    """The login the link acts for (None: the address itself, no login)."""
    sub = link.subscription
    return sub.user if sub.kind in (Subscription.Kind.USER, Subscription.Kind.DOMAIN) else None


def _when(value) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M")


def why_not(link: DigestLink, now=None) -> str | None:
    """None when the link may act now; else why not, in words for the person who clicked."""
    now = now or timezone.now()
    recipient = Recipient.objects.get(pk=link.recipient_id)
    address = recipient.address
    before = f" Earlier it was used on {_when(link.used_at)}: {link.outcome}" if link.used_at else ""
    if now >= link.expires_at:
        return (f"This link expired on {_when(link.expires_at)}; it does nothing any more.{before} "
                "The quarantine page still shows the message while it is held.")
    if link.used_at and link.action != DigestLink.Action.PREVIEW:
        return f"This link was used already, on {_when(link.used_at)}: {link.outcome} Nothing was done again."
    if recipient.status != Recipient.Status.QUARANTINED:
        if recipient.released or recipient.status in (Recipient.Status.DELIVERED, Recipient.Status.PENDING,
                                                      Recipient.Status.DELIVERING, Recipient.Status.DEFERRED):
            return f"This message was released for {address} already; it is not in the quarantine any more."
        if recipient.status == Recipient.Status.DELETED:
            return f"This message was deleted for {address} already; it is not in the quarantine any more."
        return f"This message is no longer in the quarantine for {address} ({recipient.get_status_display()})."
    actor = actor_of(link)
    if actor is not None and not recipients_in_scope(Recipient.objects.filter(pk=recipient.pk), actor).exists():
        return f"{address} is no longer among the addresses of {actor.get_username()}: this link does nothing."
    if link.action == DigestLink.Action.PREVIEW and not RawMessage.objects.filter(message_id=link.message_id).exists():
        return "The original of this message is no longer stored."
    return None


def audit(link: DigestLink, *, ip: str | None, step: str, outcome: str) -> None:
    record_audit("digest_link", user=actor_of(link), ip=ip, message=link.message, target=link.recipient.address,
                 link_action=link.action, step=step, outcome=outcome, link=link.pk)


@transaction.atomic
def use(link: DigestLink, *, ip: str | None) -> tuple[bool, str]:
    """Do what the link is for, once: (done, what happened or why nothing did)."""
    link = (DigestLink.objects.select_for_update(of=("self",))
            .select_related("message", "recipient", "subscription__user").get(pk=link.pk))
    reason = why_not(link)
    if reason:
        audit(link, ip=ip, step="refused", outcome=reason)
        return False, reason
    message: Message = link.message
    address = link.recipient.address
    actor = actor_of(link)
    if link.action in (DigestLink.Action.RELEASE, DigestLink.Action.RELEASE_ALLOW):
        if message.verdict == Verdict.VIRUS and (actor is None or not may_release_virus(actor)):
            reason = "A message that carries a virus is released by an administrator only."
            audit(link, ip=ip, step="refused", outcome=reason)
            return False, reason
        try:
            done = release_message(message, by=actor, ip=ip, recipients=[address])
        except (PermissionDenied, ValidationError) as exc:
            reason = " ".join(getattr(exc, "messages", None) or [str(exc)])
            audit(link, ip=ip, step="refused", outcome=reason)
            return False, reason
        outcome = f"released to {address}; it is on its way."
        if done and link.action == DigestLink.Action.RELEASE_ALLOW:
            outcome += " " + _allow_sender(link, actor, ip)
    elif link.action == DigestLink.Action.DELETE:
        try:
            done = delete_message(message, by=actor, ip=ip, recipients=[address])
        except PermissionDenied as exc:
            audit(link, ip=ip, step="refused", outcome=str(exc))
            return False, str(exc)
        outcome = f"deleted for {address}."
    else:
        return False, "A preview link shows the message; it does nothing to it."
    if not done:
        reason = "Nothing was done: the message had left the quarantine meanwhile."
        audit(link, ip=ip, step="refused", outcome=reason)
        return False, reason
    now = timezone.now()
    DigestLink.objects.filter(pk=link.pk).update(used_at=now, used_ip=ip, outcome=outcome.capitalize())
    audit(link, ip=ip, step="used", outcome=outcome)
    return True, outcome[0].upper() + outcome[1:]


def _allow_sender(link: DigestLink, actor, ip: str | None) -> str:
    """The sender on the allow list of the digest's login: their own list, or for a domain administrator's
    digest the list of the recipient's domain."""
    sender = link.message.envelope_sender.lower()
    if link.subscription.kind == Subscription.Kind.DOMAIN:
        from gateway.models import Domain

        domain = Domain.objects.filter(name=link.recipient.domain).first()
        if domain is None:
            return ""
        entry, _ = SenderListEntry.objects.get_or_create(kind=SenderListEntry.Kind.ALLOW,
                                                         scope=SenderListEntry.Scope.DOMAIN, sender=sender,
                                                         domain=domain, user=None,
                                                         defaults={"created_by": actor, "comment": "digest link"})
        where = f"the allow list of {domain.name}"
    else:
        entry, _ = SenderListEntry.objects.get_or_create(kind=SenderListEntry.Kind.ALLOW,
                                                         scope=SenderListEntry.Scope.USER, sender=sender,
                                                         domain=None, user=actor,
                                                         defaults={"created_by": actor, "comment": "digest link"})
        where = "your allow list"
    record_audit("list_add", user=actor, ip=ip, message=link.message,
                 target=f"allow {entry.sender} ({entry.scope})", kind=entry.kind, sender=entry.sender,
                 scope=entry.scope, via="digest link")
    return f"{sender} is now on {where}."


def set_frequency(unsubscribe: UnsubscribeLink, frequency: str, *, ip: str | None, one_click: bool) -> None:
    sub = unsubscribe.subscription
    Subscription.objects.filter(pk=sub.pk).update(frequency=frequency)
    sub.frequency = frequency
    record_audit("digest_frequency", user=sub.user, ip=ip, target=str(sub), frequency=frequency,
                 via="one-click unsubscription" if one_click else "unsubscribe page")
