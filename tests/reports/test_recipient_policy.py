"""The message page shows, for each recipient, the verdict, the action and the spam policy that decided; "Where
is my mail?" names the policy that held one's copy."""

from __future__ import annotations

from django.urls import reverse

from gateway.models import Recipient
from tests.support.people import logged_in, make_message


def test_each_recipient_shows_the_policy_that_decided(client, personas):
    message = make_message(recipients=("alice@example.com", "bob@example.com"), state="quarantined",
                           verdict="spam", action="quarantine", spam_score=8.0, quarantined=True)
    Recipient.objects.filter(message=message, address="alice@example.com").update(
        verdict="clean", action="deliver", status="delivered", policy="user alice@example.com (spam 10, high spam 15)")
    Recipient.objects.filter(message=message, address="bob@example.com").update(
        verdict="spam", action="quarantine", status="quarantined", policy="domain example.com (spam 5, high spam 15)")
    page = logged_in(client, personas.admin).get(reverse("message_detail", args=[message.queue_id])).content.decode()
    alice_row = page[page.index("alice@example.com</td>"):page.index("bob@example.com</td>")]
    assert "Clean · deliver" in alice_row and "policy: user alice@example.com (spam 10, high spam 15)" in alice_row
    bob_row = page[page.index("bob@example.com</td>"):]
    assert "Spam · quarantine" in bob_row and "policy: domain example.com (spam 5, high spam 15)" in bob_row
    # Bob asks where his copy is: held, by his domain's limit, not the global one.
    answer = logged_in(client, personas.bob).get(f"/where/{message.queue_id}/").content.decode()
    assert "it scored 8.0 as spam (the policy domain example.com (spam 5, high spam 15))" in answer
