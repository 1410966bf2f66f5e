"""The worker's commits do not wait for PostgreSQL's disk flush (WORKER_SYNCHRONOUS_COMMIT=false, the
default); every other process's do. Against the real PostgreSQL of the tests."""

import pytest
from celery import signals
from django.db import connection, connections
from django.db.backends.signals import connection_created

from appliance.celery import ASYNCHRONOUS_COMMIT, _worker_init, worker_commits_asynchronously
from tests.services import require_postgres

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def postgresql_only():
    require_postgres()  # synchronous_commit is a PostgreSQL setting
    yield
    connection_created.disconnect(dispatch_uid=ASYNCHRONOUS_COMMIT)


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
