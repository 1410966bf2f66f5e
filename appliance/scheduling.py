"""The CPU scheduling policy of the mail path's own processes: the SMTP server and the workers.

On an appliance the scanners share the CPUs with the SMTP server, the workers and PostgreSQL, and they
are what the CPUs are for: spamd spends tens of milliseconds of CPU on each message, clamd a few. Each
message wakes the worker about a dozen times (the replies of PostgreSQL, clamd, spamd and the next hop)
and the SMTP server once per command. Under Linux's default policy a thread that wakes up may preempt
whatever runs on the CPU at that moment, which is mostly a spamd child in the middle of a message: a
context switch, and caches to fill again for Perl's large working set. spamd then costs 2-3% more CPU
per message than when it runs alone (bench/pipeline, docs/benchmarks.md).

Under SCHED_BATCH a thread that wakes up does not preempt the running task; it runs when that task's
time slice ends (a few milliseconds at most) or at once on an idle CPU. Its share of the CPUs is the
same (the nice value does not change). The SMTP replies and the scans are not interactive work: a
few milliseconds more, under full load only, are nothing next to a network round trip. The web UI is
interactive and keeps the default policy.

The policy is set on the calling thread and inherited by the threads and processes it starts
afterwards, so it is set first thing. An unprivileged process may switch itself to SCHED_BATCH
(Linux 2.6.39 and later, containers included). MAIL_SCHED_BATCH=false keeps the default policy.
"""

from __future__ import annotations

import logging
import os

from django.conf import settings

log = logging.getLogger(__name__)


def batch_policy_available() -> bool:
    return hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH")


def schedule_mail_path(process: str) -> bool:
    """Put the calling thread (and what it starts from now on) under SCHED_BATCH unless MAIL_SCHED_BATCH
    is off; True when it is under it. `process` names the process in the log line of a failure."""
    if not settings.MAIL_SCHED_BATCH or not batch_policy_available():
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:  # a kernel or sandbox that refuses it: the default policy still works
        log.warning("%s keeps the default CPU scheduling policy (SCHED_BATCH refused: %s)", process, exc)
        return False
    return True
