"""Releasing from the quarantine: the stored original, unscanned, once; partial releases leave the rest held."""

import pytest
from django.core.exceptions import ValidationError

from gateway.models import Message, RawMessage, Recipient
from quarantine.actions import release_message
from tests.support.mail import message

pytestmark = pytest.mark.usefixtures("scanners_off")


@pytest.fixture
def held(protected_domain, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = True
    msg = Message.objects.create(envelope_sender="alice@sender.example", state=Message.State.QUARANTINED,
                                 quarantined=True, verdict="high_spam", action="quarantine", spam_score=1000)
    RawMessage.objects.create(message=msg, data=message(subject="Held"))
    for address in ("bob@example.org", "carol@example.org"):
        Recipient.objects.create(message=msg, address=address, status=Recipient.Status.QUARANTINED,
                                 verdict="high_spam", action="quarantine")
    return msg


def test_release_delivers_the_original_once(held, capture_server):
    assert release_message(held, by=None)
    assert not release_message(Message.objects.get(pk=held.pk), by=None)
    (delivered,) = capture_server.wait_for(1)
    assert sorted(delivered.recipients) == ["bob@example.org", "carol@example.org"]
    assert delivered.data.endswith(bytes(held.raw.data))
    held.refresh_from_db()
    assert held.state == Message.State.RELEASED and held.attempts == 0  # never scanned again


def test_partial_release_keeps_the_other_recipients_held(held, capture_server):
    assert release_message(held, by=None, recipients=["bob@example.org"])
    (delivered,) = capture_server.wait_for(1)
    assert delivered.recipients == ["bob@example.org"]
    held.refresh_from_db()
    assert held.state == Message.State.QUARANTINED
    assert held.recipients.get(address="carol@example.org").status == Recipient.Status.QUARANTINED
    with pytest.raises(ValidationError):  # bob's copy is no longer held
        release_message(held, by=None, recipients=["bob@example.org"])
    assert release_message(held, by=None, recipients=["carol@example.org"])
    assert len(capture_server.wait_for(2)) == 2
    held.refresh_from_db()
    assert held.state == Message.State.RELEASED


def test_release_to_another_address(held, capture_server):
    assert release_message(held, by=None, to_address="postmaster@example.org")
    (delivered,) = capture_server.wait_for(1)
    assert delivered.recipients == ["postmaster@example.org"]
    held.refresh_from_db()
    assert held.state == Message.State.RELEASED
