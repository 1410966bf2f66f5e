"""What people do to quarantined mail. Each action is atomic, claims its rows, writes its audit row
and hands the work to the task queue on commit: a release clicked twice delivers once.

Every action works on the held recipients its caller may act for (quarantine.selection.held_recipients_for:
all of them for an administrator, those in their domains for a domain administrator, a user's own addresses)
and on those only: the copies of the other recipients stay held, and the message stays in the quarantine
while any copy is. Seeing a message is not acting for it: its sender sees it and may do nothing to it.
`by=None` is the command line, the machine's administrator, who acts for every recipient.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied, ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from gateway.access import may_release_to, may_release_virus
from gateway.dispatch import enqueue
from gateway.models import ACTIVE_RECIPIENT_STATUSES, Message, RawMessage, Recipient, Verdict, record_audit
from gateway.scan.run import learn
from gateway.smtp.addresses import AddressError, parse_address

from .selection import acts_for_a_recipient, held_copies_for

NOT_YOURS = "None of this message's held recipients is yours: you may see it, not act on it."
NOT_A_RECIPIENT = "You are not one of this message's recipients: you may see it, not act on it."


def may_release(message: Message, user) -> bool:
    """Viruses are released by administrators only (unless the settings allow domain admins)."""
    return message.verdict != Verdict.VIRUS or may_release_virus(user)


def release_address(value: str) -> str:
    """The address to release a message to, read by the SMTP server's own parser: what it refuses at RCPT (source
    routes, %-hacks, !-paths, quoted local parts with @, address literals) is refused here, in its words. Lower
    case, as the recipients of the log are."""
    try:
        address = str(parse_address(value)).lower()
    except AddressError as exc:
        raise ValidationError(exc.text, code="bad_address") from None
    # And an address in the plain sense: the parser lets through what only a client of ours could not send
    # ('<', '>', ',' or a stray quote in the local part), which must not reach the RCPT TO of a delivery.
    try:
        validate_email(address)
    except ValidationError:
        raise ValidationError(f"Bad address syntax: {address}", code="bad_address") from None
    return address


def _held_for(message: Message, by) -> QuerySet[Recipient]:
    """The held recipients `by` may act for (selection.held_copies_for); every held one for the command line."""
    if by is None:
        return message.recipients.filter(status=Recipient.Status.QUARANTINED).order_by("id")
    return held_copies_for(message, by)


def _settle(message: Message, now) -> None:
    """The message's state from all its recipients: quarantined while any copy is held; then released when
    anyone released it, being delivered while copies are on their way, else deleted. Its stored original goes
    once no copy is held or on its way."""
    recipients = list(message.recipients.values_list("status", "released"))
    statuses = {status for status, _ in recipients}
    if Recipient.Status.QUARANTINED in statuses:
        state = Message.State.QUARANTINED
    elif any(released for _, released in recipients):
        state = Message.State.RELEASED
    elif statuses & set(ACTIVE_RECIPIENT_STATUSES):
        state = Message.State.DELIVERING
    else:
        state = Message.State.DELETED
    quarantined = state == Message.State.QUARANTINED
    Message.objects.filter(pk=message.pk).update(state=state, quarantined=quarantined, claimed_at=now)
    message.state, message.quarantined, message.claimed_at = state, quarantined, now
    if not statuses & {Recipient.Status.QUARANTINED, *ACTIVE_RECIPIENT_STATUSES}:
        RawMessage.objects.filter(message=message).delete()


def _lock(message: Message) -> Message | None:
    """The message row, locked, if it is still in the quarantine: two actions on one message are serialised
    here, and the second finds what the first left."""
    locked = Message.objects.select_for_update().filter(pk=message.pk).first()
    if locked is None or locked.state != Message.State.QUARANTINED:
        return None
    return locked


def _refuse_if_none_held_for(locked: Message, mine: QuerySet[Recipient]) -> bool:
    """True when there is nothing to do (no copy held any more); PermissionDenied when copies are held but none
    for the caller."""
    if mine.exists():
        return False
    if locked.recipients.filter(status=Recipient.Status.QUARANTINED).exists():
        raise PermissionDenied(NOT_YOURS)
    return True


@transaction.atomic
def release_message(message: Message, *, by=None, ip: str | None = None, recipients: list[str] | None = None,
                    to_address: str | None = None) -> bool:
    """Deliver a quarantined message, as stored and without scanning it again, for the held recipients the
    caller may act for.

    `recipients` picks some of those (the others stay in quarantine); `to_address` sends it to another address
    instead of them (their copies are marked deleted: they do not get it; the copies of recipients the caller
    does not act for stay held). Returns False when there was nothing left to release (already released or
    deleted): a release clicked twice delivers once. PermissionDenied when the caller acts for none of the held
    recipients, for a virus (unless they may release one) or for an address they may not release to;
    ValidationError for a recipient that is not held for them or an address SMTP would refuse.
    """
    if not may_release(message, by):
        raise PermissionDenied("Only administrators may release a virus")
    if to_address is not None:
        to_address = release_address(to_address)
        if by is not None and not may_release_to(by, to_address):
            raise PermissionDenied(f"You may not release mail to {to_address}")
    locked = _lock(message)
    if locked is None:
        return False
    mine = _held_for(locked, by)
    if _refuse_if_none_held_for(locked, mine):
        return False
    if recipients:
        wanted = {r.strip().lower() for r in recipients}
        unknown = wanted - {r.lower() for r in mine.values_list("address", flat=True)}
        if unknown:
            raise ValidationError("not a held recipient of this message that you may release it for: "
                                  + ", ".join(sorted(unknown)))
        mine = mine.filter(address__in=wanted)
    ids = list(mine.values_list("pk", flat=True))
    chosen = list(mine.order_by("id").values_list("address", flat=True))
    now = timezone.now()
    if to_address:
        Recipient.objects.create(message=locked, address=to_address, released=True,
                                 verdict=locked.verdict, status=Recipient.Status.PENDING, next_attempt_at=now)
        # The recipients it was released for do not get it: it went to the other address instead.
        Recipient.objects.filter(pk__in=ids).update(status=Recipient.Status.DELETED)
    else:
        Recipient.objects.filter(pk__in=ids).update(status=Recipient.Status.PENDING, released=True,
                                                    next_attempt_at=now, claimed_at=None)
    _settle(message, now)
    if to_address:
        record_audit("release", user=by, ip=ip, message=message, recipients=chosen, to_address=to_address)
    else:
        record_audit("release", user=by, ip=ip, message=message, recipients=chosen)
    enqueue.delivery(message.pk)
    return True


@transaction.atomic
def delete_message(message: Message, *, by=None, ip: str | None = None, recipients: list[str] | None = None) -> bool:
    """Delete the caller's copies of a quarantined message: the held recipients they act for are marked deleted,
    the others' copies stay held; `recipients` narrows that to some of them (a digest link: one). The stored
    original goes once no copy is held or on its way; the log entry stays. Returns False when nothing was held
    any more (for `recipients`: none of them); PermissionDenied when copies are held, none for them."""
    locked = _lock(message)
    if locked is None:
        return False
    mine = _held_for(locked, by)
    if _refuse_if_none_held_for(locked, mine):
        return False
    if recipients:
        mine = mine.filter(address__in={r.strip().lower() for r in recipients})
        if not mine.exists():
            return False
    deleted = list(mine.order_by("id").values_list("address", flat=True))
    Recipient.objects.filter(pk__in=list(mine.values_list("pk", flat=True))).update(status=Recipient.Status.DELETED)
    _settle(message, timezone.now())
    record_audit("delete", user=by, ip=ip, message=message, recipients=deleted)
    return True


def learn_message(message: Message, *, as_spam: bool, by=None, ip: str | None = None) -> None:
    """Teach SpamAssassin's Bayes (spamd TELL) that this message is spam, or ham. For its recipients (and those
    who act for them) only: the Bayes database is everyone's, and a sender who sees their own message must not
    teach it that their spam is ham."""
    if by is not None and not acts_for_a_recipient(message, by):
        raise PermissionDenied(NOT_A_RECIPIENT)
    if not RawMessage.objects.filter(message=message).exists():
        raise ValidationError("the original of this message is no longer stored")
    with transaction.atomic():
        record_audit("learn_spam" if as_spam else "learn_ham", user=by, ip=ip, message=message)
        if enqueue.tasks_are_sent():
            enqueue.learn(message.pk, as_spam)
            return
    # No task queue (the embedded single-machine mode): tell spamd now.
    learn(message.pk, as_spam)
