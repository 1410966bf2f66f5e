"""The worker's commits do not wait for PostgreSQL's disk flush (WORKER_SYNCHRONOUS_COMMIT=false, the
default); every other process's do. Against the real PostgreSQL of the tests."""

import pytest
from celery import signals
from django.db import connection, connections
from django.db.backends.signals import connection_created

from appliance.celery import ASYNCHRONOUS_COMMIT, _worker_init, worker_commits_asynchronously
from tests.support.services import require_postgres

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def postgresql_only():
    require_postgres()  # synchronous_commit is a PostgreSQL setting
    yield
    connection_created.disconnect(dispatch_uid=ASYNCHRONOUS_COMMIT)
    from appliance.celery import _note_statement

    for each in connections.all():  # what a task's start installs stays with the worker's connections
        if _note_statement in each.execute_wrappers:
            each.execute_wrappers.remove(_note_statement)


def synchronous_commit_of_a_new_connection() -> str:
    fresh = connections.create_connection("default")
    try:
        with fresh.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            return cursor.fetchone()[0]
    finally:
        fresh.close()


def test_outside_the_worker_commits_wait_for_the_flush():
    assert synchronous_commit_of_a_new_connection() == "on"


def test_in_the_worker_they_do_not(settings):
    settings.WORKER_SYNCHRONOUS_COMMIT = False
    worker_commits_asynchronously()  # as `celery worker` (worker_init) and `manage.py runworker` start
    assert synchronous_commit_of_a_new_connection() == "off"
    with connection.cursor() as cursor:  # the connection already open when the worker started, too
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "off"
        cursor.execute("SET synchronous_commit TO on")


def test_the_setting_keeps_them_synchronous(settings):
    settings.WORKER_SYNCHRONOUS_COMMIT = True
    worker_commits_asynchronously()
    assert synchronous_commit_of_a_new_connection() == "on"


def test_celery_workers_set_it_up_as_they_start():
    connected = [reference() for _, reference in signals.worker_init.receivers]
    assert _worker_init in connected


@pytest.mark.django_db(transaction=True)
def test_a_connection_used_a_moment_ago_is_not_checked_again_and_an_idle_one_is(monkeypatch):
    import time

    from appliance import celery as worker

    worker._database_connections(signal=signals.task_prerun)  # the first task: it notes its statements
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    worker._database_connections(signal=signals.task_postrun)
    worker._database_connections(signal=signals.task_prerun)
    assert connection.health_check_done  # no SELECT 1 before this task's first statement
    # A task that did not use the connection (or sat for seconds on spamd) does not make it look fresh.
    connection.mailgate_statement_at = time.monotonic() - 5
    worker._database_connections(signal=signals.task_postrun)
    worker._database_connections(signal=signals.task_prerun)
    assert not connection.health_check_done
    monkeypatch.setattr(worker, "HEALTH_CHECK_AFTER_IDLE", 0.0)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    worker._database_connections(signal=signals.task_prerun)
    assert not connection.health_check_done


@pytest.mark.django_db(transaction=True)
def test_an_idle_connection_whose_server_went_away_is_replaced_before_the_task(monkeypatch):
    from appliance import celery as worker

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    monkeypatch.setattr(worker, "HEALTH_CHECK_AFTER_IDLE", 0.0)
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [backend])
    finally:
        other.close()
    worker._database_connections(signal=signals.task_prerun)
    with connection.cursor() as cursor:  # the health check finds it gone and connects again
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != backend
