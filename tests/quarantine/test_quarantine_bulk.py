"""Bulk actions: on the ticked messages or on all that match a filter, in chunks, with progress."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from gateway.models import AuditEvent, Message
from quarantine import bulk, tasks
from quarantine.models import BulkJob
from tests.support.people import People, logged_in, make_people, quarantined, virus

pytestmark = pytest.mark.django_db


@pytest.fixture
def people(db) -> People:
    return make_people()


@pytest.fixture
def no_delivery():
    with mock.patch("gateway.dispatch.enqueue.delivery") as enqueue:
        yield enqueue


def states(messages) -> list[str]:
    return list(Message.objects.filter(pk__in=[m.pk for m in messages]).order_by("pk").values_list("state", flat=True))


def test_release_the_ticked_messages(client, people, no_delivery):
    ticked = [quarantined("alice@example.org") for _ in range(3)]
    untouched = quarantined("alice@example.org")
    theirs = quarantined("bob@example.net")
    logged_in(client, people.alice)
    response = client.post("/quarantine/bulk", {
        "action": "release", "target": "selected", "ids": [m.queue_id for m in ticked] + [theirs.queue_id]},
        follow=True)
    # Bob's message is not in Alice's quarantine: it is silently not part of her selection.
    assert "Released 3 of 3 messages." in response.content.decode()
    assert states(ticked) == ["released"] * 3
    assert states([untouched, theirs]) == ["quarantined", "quarantined"]
    assert no_delivery.call_count == 3
    job = BulkJob.objects.get()
    assert (job.state, job.total, job.succeeded, job.created_by) == ("done", 3, 3, people.alice)
    assert AuditEvent.objects.filter(action="release").count() == 3
    assert AuditEvent.objects.filter(action="bulk_release", username="alice").count() == 1


def test_nothing_ticked_is_explained(client, people):
    quarantined("alice@example.org")
    logged_in(client, people.alice)
    response = client.post("/quarantine/bulk", {"action": "delete", "target": "selected"}, follow=True)
    assert "Tick the messages first" in response.content.decode()
    assert not BulkJob.objects.exists()


def test_delete_all_that_match_a_filter_in_chunks_with_progress(client, people):
    spam = [quarantined("alice@example.org", sender=f"s{i}@junk.example") for i in range(120)]
    keep = quarantined("alice@example.org", sender="friend@good.example")
    logged_in(client, people.alice)
    response = client.post("/quarantine/bulk", {"action": "delete", "target": "all", "sender": "junk.example"})
    assert response.status_code == 302 and "sender=junk.example" in response["Location"]
    job = BulkJob.objects.get()
    # The first chunk is worked at once; the rest waits for the page's progress poll.
    assert (job.state, job.total, job.done) == ("running", 120, bulk.CHUNK_SIZE)

    page = client.get(response["Location"]).content.decode()
    assert f'data-status-url="/quarantine/bulk/{job.pk}"' in page and "under way" in page

    status = client.get(f"/quarantine/bulk/{job.pk}").json()
    assert status["done"] == bulk.CHUNK_SIZE, "a GET only reads"
    polls = 0
    while not status["finished"]:
        status = client.post(f"/quarantine/bulk/{job.pk}").json()
        polls += 1
    assert polls == 2
    assert (status["total"], status["done"], status["succeeded"], status["failed"]) == (120, 120, 120, 0)
    assert status["summary"] == "Deleted 120 of 120 messages."
    assert set(states(spam)) == {"deleted"} and states([keep]) == ["quarantined"]


def test_all_that_match_means_at_the_time_of_the_click(client, people):
    for _ in range(60):
        quarantined("alice@example.org")
    logged_in(client, people.alice)
    client.post("/quarantine/bulk", {"action": "delete", "target": "all"})
    late = quarantined("alice@example.org")  # arrives while the job runs
    job = BulkJob.objects.get()
    while not client.post(f"/quarantine/bulk/{job.pk}").json()["finished"]:
        pass
    late.refresh_from_db()
    assert late.state == Message.State.QUARANTINED


def test_messages_gone_meanwhile_are_counted_as_skipped(client, people, no_delivery):
    messages = [quarantined("alice@example.org") for _ in range(60)]
    logged_in(client, people.alice)
    client.post("/quarantine/bulk", {"action": "release", "target": "all"})
    job = BulkJob.objects.get()
    # Someone else deletes the last five before the job reaches them.
    Message.objects.filter(pk__in=[m.pk for m in messages[-5:]]).update(state=Message.State.DELETED)
    while not (status := client.post(f"/quarantine/bulk/{job.pk}").json())["finished"]:
        pass
    assert (status["total"], status["done"], status["succeeded"], status["skipped"]) == (60, 60, 55, 5)


def test_a_virus_in_a_users_bulk_release_fails_alone(client, people, no_delivery):
    spam = quarantined("alice@example.org")
    infected = virus("alice@example.org")
    logged_in(client, people.alice)
    response = client.post("/quarantine/bulk", {"action": "release", "target": "all"}, follow=True)
    text = response.content.decode()
    assert "Released 1 of 2 messages; 1 failed" in text and infected.queue_id in text
    assert states([spam, infected]) == ["released", "quarantined"]


def test_a_domain_administrators_bulk_job_stays_in_their_domains(client, people, no_delivery):
    org = [quarantined(f"user{i}@example.org") for i in range(3)]
    net = quarantined("bob@example.net")
    logged_in(client, people.dana)
    client.post("/quarantine/bulk", {"action": "release", "target": "all"})
    assert states(org) == ["released"] * 3 and states([net]) == ["quarantined"]


def test_learn_in_bulk(client, people, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = True
    messages = [quarantined("alice@example.org") for _ in range(2)]
    logged_in(client, people.alice)
    with mock.patch("gateway.dispatch.enqueue.learn") as learn:
        client.post("/quarantine/bulk", {"action": "learn_ham", "target": "selected",
                                         "ids": [m.queue_id for m in messages]})
    assert sorted(c.args for c in learn.call_args_list) == sorted((m.pk, False) for m in messages)
    assert states(messages) == ["quarantined", "quarantined"]


def test_someone_elses_job_is_a_404(client, people):
    for _ in range(60):
        quarantined("alice@example.org")
    logged_in(client, people.alice)
    client.post("/quarantine/bulk", {"action": "delete", "target": "all"})
    job = BulkJob.objects.get()
    logged_in(client, people.bob)
    assert client.get(f"/quarantine/bulk/{job.pk}").status_code == 404
    assert client.post(f"/quarantine/bulk/{job.pk}").status_code == 404
    job.refresh_from_db()
    assert job.done == bulk.CHUNK_SIZE


def test_with_a_broker_the_celery_task_works_the_job(client, people, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/15"
    for _ in range(60):
        quarantined("alice@example.org")
    logged_in(client, people.alice)
    with mock.patch.object(tasks.run_bulk_job, "delay") as delay:
        client.post("/quarantine/bulk", {"action": "delete", "target": "all"})
        job = BulkJob.objects.get()
        # The task is sent on commit; the poll leaves the work to it while it makes progress.
        assert client.post(f"/quarantine/bulk/{job.pk}").json()["done"] == bulk.CHUNK_SIZE
    # (pytest-django's test transaction never commits, so on_commit hooks do not run: call the task.)
    delay.assert_not_called()
    tasks.run_bulk_job(job.pk)
    job.refresh_from_db()
    assert (job.state, job.done) == ("done", 60)


def test_a_stalled_job_is_taken_over_by_the_poll(client, people, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/15"
    for _ in range(60):
        quarantined("alice@example.org")
    logged_in(client, people.alice)
    with mock.patch.object(tasks.run_bulk_job, "delay"):
        client.post("/quarantine/bulk", {"action": "delete", "target": "all"})
    job = BulkJob.objects.get()
    BulkJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(minutes=5))
    assert client.post(f"/quarantine/bulk/{job.pk}").json()["finished"]


def test_running_jobs_show_on_the_quarantine_page(client, people):
    for _ in range(60):
        quarantined("alice@example.org")
    logged_in(client, people.alice)
    client.post("/quarantine/bulk", {"action": "delete", "target": "all"})
    job = BulkJob.objects.get()
    page = client.get("/quarantine/").content.decode()
    assert f"/quarantine/bulk/{job.pk}" in page and "<progress" in page
    logged_in(client, people.bob)
    assert f"/quarantine/bulk/{job.pk}" not in client.get("/quarantine/").content.decode()
