"""The SMTP process loads the SMTP side only: importing its server (and the command that runs it) brings in
neither the scanners, nor the delivery code, nor Celery's task module. Checked in a new process, as
`manage.py runsmtp` starts, by looking at sys.modules; import-linter checks the same of the code's imports
(pyproject.toml)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Modules of the worker side: none of them may be loaded by the SMTP server. (django.setup() itself loads
# every app's models and, through the admin's autodiscovery, their admin modules: in every process.)
WORKER_SIDE = ("gateway.scan", "gateway.delivery", "gateway.tasks", "gateway.sweep", "quarantine.tasks",
               "quarantine.bulk", "quarantine.actions", "reports.tasks", "reports.rollup")


def modules_after(code: str, broker_url: str = "") -> list[str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "appliance.settings", "CELERY_BROKER_URL": broker_url,
           "CELERY_TASK_ALWAYS_EAGER": "false"}
    script = (f"import django, json, sys; django.setup(); {code}; "
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('gateway', 'quarantine', 'reports', 'console', 'appliance'))))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def loaded_from_worker_side(modules: list[str]) -> list[str]:
    return [m for m in modules if m.startswith(WORKER_SIDE)]


@pytest.mark.parametrize("code", [
    "import gateway.smtp.serve",
    "import gateway.management.commands.runsmtp",
    "from gateway.smtp.handler import GatewayHandler; GatewayHandler()",
])
def test_the_smtp_server_imports_no_scanner_delivery_or_task_module(code):
    modules = modules_after(code)
    assert "gateway.smtp.serve" in modules or "gateway.smtp.handler" in modules
    assert loaded_from_worker_side(modules) == []


def test_sending_a_scan_by_name_loads_no_task_module():
    """The SMTP server's first publish prepares the scan task's message by its name: still no task module."""
    modules = modules_after("from gateway.dispatch.scans import ScanSender; ScanSender(None).template",
                            broker_url="redis://127.0.0.1:6379/15")
    assert "gateway.dispatch.scans" in modules
    assert loaded_from_worker_side(modules) == []


def test_the_check_sees_the_worker_side_when_it_is_loaded():
    """The test itself can fail: importing the task module loads the scanners and the delivery code."""
    assert {"gateway.tasks", "gateway.scan.clamav", "gateway.delivery.attempt"} <= set(
        loaded_from_worker_side(modules_after("import gateway.tasks")))
