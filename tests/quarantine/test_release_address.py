"""Release to another address reads the address with the SMTP server's own parser: what intake refuses at RCPT
(a relay through the local part, a quoted @, a source route, an address literal) is not released to either, even
by someone who may release to addresses of their domain; then the role's rule decides."""

from __future__ import annotations

from unittest import mock

import pytest
from django.core.exceptions import ValidationError

from gateway.models import Recipient
from quarantine import actions
from tests.support.people import People, logged_in, make_people, quarantined

pytestmark = pytest.mark.django_db

RELAY_TRICKS = ['"x@evil.test"@example.org', "x%evil.test@example.org", "evil.test!x@example.org",
                "@example.org:x@evil.test", "x@[192.0.2.1]", "evil.test>@example.org"]


@pytest.fixture
def people(db) -> People:
    return make_people()


@pytest.fixture
def no_delivery():
    with mock.patch("gateway.dispatch.enqueue.delivery") as enqueue:
        yield enqueue


@pytest.mark.parametrize("address", RELAY_TRICKS)
def test_a_domain_administrator_cannot_release_through_relay_syntax(client, people, no_delivery, address):
    message = quarantined("carol@example.org")
    logged_in(client, people.dana)
    response = client.post(f"/quarantine/{message.queue_id}/release", {"to_address": address})
    assert response.status_code == 400
    assert "is not an e-mail address this gateway delivers to" in response.content.decode()
    assert list(message.recipients.values_list("address", "status")) == [
        ("carol@example.org", Recipient.Status.QUARANTINED)]
    no_delivery.assert_not_called()


@pytest.mark.parametrize("address", RELAY_TRICKS)
def test_the_action_refuses_them_too(people, no_delivery, address):
    message = quarantined("carol@example.org")
    with pytest.raises(ValidationError):
        actions.release_message(message, by=None, to_address=address)
    assert message.recipients.count() == 1
    no_delivery.assert_not_called()


def test_a_plain_address_of_her_domain_is_released_to(client, people, no_delivery):
    message = quarantined("carol@example.org")
    logged_in(client, people.dana)
    client.post(f"/quarantine/{message.queue_id}/release", {"to_address": "Helpdesk@Example.ORG."})
    released = message.recipients.get(released=True)
    assert released.address == "helpdesk@example.org"
    no_delivery.assert_called_once_with(message.pk)
