"""Several nodes, one view: the message log (and its CSV export and the JSON API, which share its filter) shows
every node's messages, and filters by the node that received them."""

from __future__ import annotations

from tests.support.people import PERSONAS_PASSWORD, make_message


def test_the_message_log_filters_by_node(personas, client):
    on_mx1 = make_message(subject="Arrived on mx1", node="mx1")
    on_mx2 = make_message(subject="Arrived on mx2", node="mx2")
    assert client.login(username="admin", password=PERSONAS_PASSWORD)
    everything = client.get("/messages/").content.decode()
    assert on_mx1.subject in everything and on_mx2.subject in everything
    only_mx2 = client.get("/messages/", {"node": "mx2"}).content.decode()
    assert on_mx2.subject in only_mx2 and on_mx1.subject not in only_mx2
    exported = b"".join(client.get("/messages/export.csv", {"node": "mx1"}).streaming_content).decode()
    assert on_mx1.queue_id in exported and on_mx2.queue_id not in exported


def test_a_user_sees_only_their_own_mail_on_any_node(personas, client):
    mine = make_message(subject="For alice, on mx2", node="mx2", recipients=("alice@example.com",))
    theirs = make_message(subject="For bob, on mx2", node="mx2", recipients=("bob@example.com",))
    assert client.login(username="alice", password=PERSONAS_PASSWORD)
    page = client.get("/messages/", {"node": "mx2"}).content.decode()
    assert mine.subject in page and theirs.subject not in page
