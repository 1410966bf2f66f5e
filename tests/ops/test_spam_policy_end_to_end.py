"""Each recipient's own spam policy, end to end: `manage.py runsmtp`, a Celery worker, the real spamd and clamd,
and a capture server as the organisation's mail server. One GTUBE message (spamd scores it ~1000) to three
recipients of example.org: the domain's policy quarantines it for one, a user's own thresholds above GTUBE's
score deliver it to another untouched, a user who opted out of the quarantine gets it tagged."""

from __future__ import annotations

import re

import pytest

from gateway.models import Action, Domain, DomainSpamPolicy, Message, Recipient, UserSpamPolicy, Verdict
from tests.support.appliance import queue_id_of, settled, wait_until
from tests.support.mail import GTUBE_PATH, read_mail
from tests.support.people import make_user

pytestmark = pytest.mark.services


def test_one_message_is_delivered_to_one_recipient_and_quarantined_for_the_other(appliance, capture_server,
                                                                                 corpus):
    DomainSpamPolicy.objects.create(domain=Domain.objects.get(name="example.org"), action_spam=Action.QUARANTINE,
                                    users_may_choose=True, user_max_threshold=5000.0,
                                    users_may_skip_quarantine=True)
    bob = make_user("bob", email="bob@example.org")
    UserSpamPolicy.objects.create(user=bob, spam_threshold=2000.0, high_spam_threshold=3000.0)
    dave = make_user("dave", email="dave@example.org")
    UserSpamPolicy.objects.create(user=dave, skip_quarantine=True)

    gtube = read_mail(corpus(GTUBE_PATH))
    code, reply = appliance.send(gtube, to=("bob@example.org", "carol@example.org", "dave@example.org"))
    assert code == 250, reply
    message = wait_until(lambda: settled(queue_id_of(reply)), what="the message to settle")
    # Quarantined (for carol) as soon as the verdict is written; bob's and dave's copies leave right after.
    wait_until(lambda: set(Recipient.objects.filter(message=message).values_list("status", flat=True))
               == {Recipient.Status.DELIVERED, Recipient.Status.QUARANTINED}, what="the deliveries")
    message.refresh_from_db()

    assert message.spam_score > 900 and "GTUBE" in [rule["name"] for rule in message.spam_rules]
    # Held for carol, so the message is in the quarantine (for her) while bob and dave have it.
    assert (message.state, message.verdict, message.quarantined) == (Message.State.QUARANTINED, Verdict.HIGH_SPAM,
                                                                     True)
    rows = {r.address: r for r in Recipient.objects.filter(message=message)}
    bob_row, carol_row, dave_row = rows["bob@example.org"], rows["carol@example.org"], rows["dave@example.org"]
    assert (bob_row.verdict, bob_row.action, bob_row.status) == (Verdict.CLEAN, Action.DELIVER,
                                                                 Recipient.Status.DELIVERED)
    assert bob_row.policy == "user bob@example.org (spam 2000, high spam 3000)"
    assert (carol_row.verdict, carol_row.action, carol_row.status) == (Verdict.HIGH_SPAM, Action.QUARANTINE,
                                                                       Recipient.Status.QUARANTINED)
    assert carol_row.policy == "domain example.org (spam 5, high spam 15)"
    assert (dave_row.verdict, dave_row.action, dave_row.status) == (Verdict.HIGH_SPAM, Action.TAG,
                                                                    Recipient.Status.DELIVERED)
    assert dave_row.policy.startswith("user dave@example.org (spam 5, high spam 15")

    # The organisation's server got it for bob as it was, for dave tagged, and never for carol.
    captured = {tuple(m.recipients): m for m in capture_server.wait_for(2)}
    assert set(captured) == {("bob@example.org",), ("dave@example.org",)}
    for_bob, for_dave = captured[("bob@example.org",)].data, captured[("dave@example.org",)].data
    assert b"X-Mailgate-Verdict: clean" in for_bob and b"Subject: [SPAM]" not in for_bob
    assert re.search(rb"X-Spam-Status: No, score=\d+\.\d required=2000\.0 ", for_bob)  # bob's own threshold
    assert b"X-Mailgate-Verdict: high_spam" in for_dave and b"Subject: [SPAM] " in for_dave
    assert re.search(rb"X-Spam-Status: Yes, score=\d+\.\d required=5\.0 ", for_dave)
    assert not any("carol@example.org" in m.recipients for m in capture_server.messages)
