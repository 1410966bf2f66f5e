"""Where is my mail? Each attempt in plain words from the log, scoped by Message.objects.visible_to."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from gateway.models import Message, Recipient
from tests.support.people import logged_in, make_message


@pytest.fixture
def mail(personas):
    refused = make_message("boss@forged.test", ("alice@example.com",), state="refused", refusal_reason="spf",
                           client_ip="203.0.113.9", subject="",
                           smtp_reply="550 5.7.23 SPF: 203.0.113.9 is not allowed to send mail from forged.test")
    delivered = make_message("friend@sender.test", ("alice@example.com",), subject="Lunch")
    deferred = make_message("news@sender.test", ("alice@example.com",), subject="Later", state="delivering")
    Recipient.objects.filter(message=deferred).update(status="deferred", reply_code=451,
                                                      reply_text="4.3.0 mailbox busy",
                                                      next_attempt_at=timezone.now() + timedelta(minutes=10))
    held = make_message("spam@spam.test", ("alice@example.com",), subject="Pills", state="quarantined",
                        verdict="high_spam", spam_score=22.5,
                        spam_rules=[{"name": "BAYES_99", "score": 5.0}, {"name": "URIBL_BLACK", "score": 7.5}])
    bobs = make_message("friend@sender.test", ("bob@example.com",), subject="For Bob only")
    return {"refused": refused, "delivered": delivered, "deferred": deferred, "held": held, "bobs": bobs}


def test_a_user_sees_each_attempt_in_words(client, personas, mail):
    page = logged_in(client, personas.alice).get("/where/", {"recipient": "alice"}).content.decode()
    assert "Refused at SMTP time" in page and "550 5.7.23 SPF" in page
    assert "A text to forward to the sender" in page and "SPF record" in page
    assert "Delivered" in page and "2.0.0 Ok: queued as 4XyZ" in page
    assert "next try is at" in page and "451 4.3.0 mailbox busy" in page
    assert "scored 22.5 as spam" in page and "URIBL_BLACK 7.5" in page
    assert f'/quarantine/{mail["held"].queue_id}/release' in page
    assert "For Bob only" not in page


def test_nothing_seen_says_what_that_means(client, personas, mail):
    page = logged_in(client, personas.alice).get("/where/", {"sender": "nobody@nowhere.test"}).content.decode()
    assert "Nothing matching reached us in this window" in page


def test_another_users_mail_is_a_404(client, personas, mail):
    client = logged_in(client, personas.alice)
    assert client.get(f"/where/{mail['bobs'].queue_id}/").status_code == 404
    assert client.get(f"/where/{mail['delivered'].queue_id}/").status_code == 200


def test_a_domain_administrator_sees_the_domain(client, personas, mail):
    make_message("x@sender.test", ("carol@example.org",), subject="Other domain")
    page = logged_in(client, personas.domain_admin).get("/where/", {"sender": ""}).content.decode()
    assert "For Bob only" in page and "Lunch" in page and "Other domain" not in page
    other = Message.objects.get(subject="Other domain")
    assert client.get(f"/where/{other.queue_id}/").status_code == 404
