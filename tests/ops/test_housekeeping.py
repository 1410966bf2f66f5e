"""The sweeper and the retention jobs: stuck claims handed back, old quarantine purged in batches."""

from datetime import timedelta

import pytest
from django.utils import timezone

from gateway import sweep, tasks
from gateway.models import MailFlowSettings, Message, RawMessage, Recipient, RecipientVerification

pytestmark = pytest.mark.django_db


def held(days_old: int) -> Message:
    msg = Message.objects.create(state=Message.State.QUARANTINED, quarantined=True, verdict="virus",
                                 received_at=timezone.now() - timedelta(days=days_old))
    RawMessage.objects.create(message=msg, data=b"Subject: x\r\n\r\nx\r\n")
    Recipient.objects.create(message=msg, address="bob@example.org", status=Recipient.Status.QUARANTINED)
    return msg


def test_quarantine_retention_drops_the_bytes_and_keeps_the_log():
    old, recent = held(40), held(2)
    assert sweep.purge_expired() == 1
    old.refresh_from_db()
    assert old.state == Message.State.DELETED and not RawMessage.objects.filter(message=old).exists()
    assert old.recipients.get().status == Recipient.Status.DELETED
    recent.refresh_from_db()
    assert recent.state == Message.State.QUARANTINED


def test_log_retention_keeps_work_in_progress():
    config = MailFlowSettings.load()
    config.log_retention_days = 30
    config.save()
    done = Message.objects.create(state=Message.State.DELIVERED, received_at=timezone.now() - timedelta(days=31))
    waiting = Message.objects.create(state=Message.State.SCAN_DEFERRED,
                                     received_at=timezone.now() - timedelta(days=31))
    sweep.purge_expired()
    assert not Message.objects.filter(pk=done.pk).exists()
    assert Message.objects.filter(pk=waiting.pk).exists()


def test_a_claim_left_by_a_dead_worker_is_handed_back():
    stuck = Message.objects.create(state=Message.State.SCANNING,
                                   claimed_at=timezone.now() - timedelta(hours=1))
    scans, _ = sweep.due_work()
    assert stuck.pk in scans
    stuck.refresh_from_db()
    assert stuck.state == Message.State.SCAN_DEFERRED


def test_housekeeping_forgets_expired_call_ahead_answers():
    RecipientVerification.objects.create(address="a@example.org", exists=True,
                                         expires_at=timezone.now() - timedelta(minutes=1))
    RecipientVerification.objects.create(address="b@example.org", exists=True,
                                         expires_at=timezone.now() + timedelta(days=1))
    assert tasks.housekeeping()["callahead"] == 1
    assert list(RecipientVerification.objects.values_list("address", flat=True)) == ["b@example.org"]
