"""What people do to quarantined mail. Each action is atomic, claims its rows, writes its audit row
and hands the work to the task queue on commit: a release clicked twice delivers once."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied, ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.utils import timezone

from gateway.access import may_release_virus
from gateway.dispatch import enqueue
from gateway.models import ACTIVE_RECIPIENT_STATUSES, Message, RawMessage, Recipient, Verdict, record_audit
from gateway.scan.run import learn


def may_release(message: Message, user) -> bool:
    """Viruses are released by administrators only (unless the settings allow domain admins)."""
    return message.verdict != Verdict.VIRUS or may_release_virus(user)


@transaction.atomic
def release_message(message: Message, *, by=None, ip: str | None = None, recipients: list[str] | None = None,
                    to_address: str | None = None) -> bool:
    """Deliver a quarantined message, as stored and without scanning it again.

    `recipients` picks some of the original recipients (the others stay in quarantine); `to_address`
    sends it to another address instead of the original recipients. Returns False when there was
    nothing left to release (already released or deleted): a release clicked twice delivers once.
    """
    if not may_release(message, by):
        raise PermissionDenied("Only administrators may release a virus")
    if to_address is not None:
        to_address = to_address.strip()
        validate_email(to_address)
    # The message row is the lock: two releases of one message are serialised here, and the second
    # finds nothing held any more.
    locked = Message.objects.select_for_update().filter(pk=message.pk).first()
    if locked is None or locked.state != Message.State.QUARANTINED:
        return False
    held = locked.recipients.filter(status=Recipient.Status.QUARANTINED)
    if recipients:
        wanted = {r.strip().lower() for r in recipients}
        unknown = wanted - {r.lower() for r in held.values_list("address", flat=True)}
        if unknown:
            raise ValidationError(f"not a quarantined recipient of this message: {', '.join(sorted(unknown))}")
        held = held.filter(address__in=wanted)
    if not held.exists():
        return False
    now = timezone.now()
    if to_address:
        Recipient.objects.create(message=locked, address=to_address.lower(), released=True,
                                 verdict=locked.verdict, status=Recipient.Status.PENDING, next_attempt_at=now)
        released = [to_address.lower()]
        # The original recipients do not get it: it went to the other address instead.
        held.update(status=Recipient.Status.DELETED)
    else:
        released = list(held.values_list("address", flat=True))
        held.update(status=Recipient.Status.PENDING, released=True, next_attempt_at=now, claimed_at=None)
    if not locked.recipients.filter(status=Recipient.Status.QUARANTINED).exists():
        Message.objects.filter(pk=locked.pk).update(state=Message.State.RELEASED, quarantined=False,
                                                    claimed_at=now)
        message.state, message.quarantined = Message.State.RELEASED, False
    record_audit("release", user=by, ip=ip, message=message, recipients=released)
    enqueue.delivery(message.pk)
    return True


@transaction.atomic
def delete_message(message: Message, *, by=None, ip: str | None = None) -> bool:
    """Delete a quarantined message: its raw bytes go, its log entry stays (marked deleted)."""
    if not message.claim([Message.State.QUARANTINED], Message.State.DELETED, quarantined=False):
        return False
    message.recipients.filter(status=Recipient.Status.QUARANTINED).update(status=Recipient.Status.DELETED)
    if message.recipients.filter(status__in=ACTIVE_RECIPIENT_STATUSES).exists():
        # Other recipients' copies are still on their way: they keep the bytes, the message stays in delivery.
        Message.objects.filter(pk=message.pk).update(state=Message.State.DELIVERING)
        message.state = Message.State.DELIVERING
    else:
        RawMessage.objects.filter(message=message).delete()
    record_audit("delete", user=by, ip=ip, message=message)
    return True


def learn_message(message: Message, *, as_spam: bool, by=None, ip: str | None = None) -> None:
    """Teach SpamAssassin's Bayes (spamd TELL) that this message is spam, or ham."""
    if not hasattr(message, "raw"):
        raise ValidationError("the original of this message is no longer stored")
    with transaction.atomic():
        record_audit("learn_spam" if as_spam else "learn_ham", user=by, ip=ip, message=message)
        if enqueue.tasks_are_sent():
            enqueue.learn(message.pk, as_spam)
            return
    # No task queue (the embedded single-machine mode): tell spamd now.
    learn(message.pk, as_spam)
