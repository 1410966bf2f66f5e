"""The mail path's processes run under SCHED_BATCH (appliance/scheduling.py): set on a thread, inherited by
the threads it starts, off with MAIL_SCHED_BATCH=false. The end-to-end test checks the real processes."""

import os
import threading

import pytest

from appliance.scheduling import batch_policy_available, schedule_mail_path

pytestmark = pytest.mark.skipif(not batch_policy_available(), reason="no SCHED_BATCH on this platform")


def in_a_thread(function):
    """Run `function` in a new thread (a policy set there leaves the test process's own threads alone)."""
    result = {}

    def run():
        try:
            result["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_the_thread_and_the_threads_it_starts_run_as_batch(settings):
    settings.MAIL_SCHED_BATCH = True

    def start():
        done = schedule_mail_path("test")
        child = in_a_thread(lambda: os.sched_getscheduler(0))
        return done, os.sched_getscheduler(0), child

    assert in_a_thread(start) == (True, os.SCHED_BATCH, os.SCHED_BATCH)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's own thread is untouched


def test_off_keeps_the_default_policy(settings):
    settings.MAIL_SCHED_BATCH = False
    assert in_a_thread(lambda: (schedule_mail_path("test"), os.sched_getscheduler(0))) == (False, os.SCHED_OTHER)


def test_a_refusal_is_logged_and_changes_nothing(settings, monkeypatch, caplog):
    settings.MAIL_SCHED_BATCH = True

    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    assert in_a_thread(lambda: schedule_mail_path("runsmtp")) is False
    assert "runsmtp keeps the default CPU scheduling policy" in caplog.text
