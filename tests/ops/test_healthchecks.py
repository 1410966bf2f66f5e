"""The container healthchecks of docker-compose.yml, run as Docker runs them: the web service's command against
gunicorn started with the web service's own environment (HTTPS only, its ALLOWED_HOSTS), the SMTP service's
command against a real runsmtp, and `manage.py health` failing, with its reason, when what it asks does not
answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.appliance import wait_port
from tests.support.servers import free_port
from tests.support.services import database_url_for

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
pytestmark = pytest.mark.services


def healthcheck(service: str) -> list[str]:
    test = COMPOSE["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:3] == ["python", "manage.py"], test
    return [sys.executable, *test[2:]]


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def base_env(transactional_db, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CELERY_BROKER_URL", "SPAMD_URL", "CLAMD_URL", "CACHE_URL", "MAIL_LOG_FILE", "LOG_SYSLOG")}
    env.update(DATABASE_URL=database_url_for("a healthcheck"), DJANGO_SETTINGS_MODULE="appliance.settings",
               ALLOW_INSECURE_SECRET="true", DATA_DIR=str(tmp_path / "data"))
    return env


def test_the_web_healthcheck_passes_through_the_https_only_settings_and_fails_when_clamd_is_away(
        base_env, clamd, spamd, redis, tmp_path):
    port = free_port()
    # The web service's HTTPS-only environment: a plain-HTTP probe by IP would get a redirect or a 400.
    web_env = {**base_env, "SECURE_SSL_REDIRECT": "true", "SECURE_COOKIES": "true",
               "SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https", "ALLOWED_HOSTS": "mailgate.example.org",
               "CELERY_BROKER_URL": redis, "SPAMD_URL": spamd, "CLAMD_URL": clamd}
    command = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in healthcheck("web")]
    gunicorn = subprocess.Popen([sys.executable, "-m", "gunicorn", "appliance.wsgi", "-b", f"127.0.0.1:{port}",
                                 "--workers", "1"], cwd=ROOT, env=web_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 60, gunicorn)
        done = run(command, web_env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "web: ok: 200" in done.stdout and '"status": "ok"' in done.stdout
        # clamd away for this web process: /healthz says 503 with the reason, and the healthcheck fails.
        stop(gunicorn)
        away = free_port()
        gunicorn = subprocess.Popen([sys.executable, "-m", "gunicorn", "appliance.wsgi", "-b",
                                     f"127.0.0.1:{port}", "--workers", "1"], cwd=ROOT,
                                    env={**web_env, "CLAMD_URL": f"tcp://127.0.0.1:{away}"},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, 60, gunicorn)
        done = run(command, web_env)
        assert done.returncode == 1
        assert "web: FAIL: 503" in done.stdout and "clamd" in done.stdout
    finally:
        stop(gunicorn)


def test_the_smtp_healthcheck_reads_the_greeting_of_runsmtp(base_env):
    port = free_port()
    smtp = subprocess.Popen([sys.executable, "manage.py", "runsmtp", "--listen", f"127.0.0.1:{port}"], cwd=ROOT,
                            env=base_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 60, smtp)
        command = [arg.replace("127.0.0.1:25", f"127.0.0.1:{port}") for arg in healthcheck("smtp")]
        done = run(command, base_env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"smtp: ok: 127.0.0.1:{port}: 220 " in done.stdout
    finally:
        stop(smtp)
    # Stopped: the same check fails and says why.
    done = run(command, base_env)
    assert done.returncode == 1 and "smtp: FAIL" in done.stdout and "no greeting" in done.stdout


def test_the_worker_healthcheck_fails_without_an_answer(base_env, redis):
    # No worker listens on this broker under that name: no answer within the timeout, exit 1.
    command = [*healthcheck("worker"), "nobody@nowhere"]
    done = run(command, {**base_env, "CELERY_BROKER_URL": redis})
    assert done.returncode == 1 and "worker: FAIL: nobody@nowhere: no answer" in done.stdout
    done = run(command, base_env)
    assert done.returncode == 1 and "no broker configured" in done.stdout


def test_without_arguments_health_says_what_healthz_says(base_env, clamd):
    done = run([sys.executable, "manage.py", "health"], {**base_env, "CLAMD_URL": clamd})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "database: ok" in done.stdout and "clamd: ok" in done.stdout
    done = run([sys.executable, "manage.py", "health"], {**base_env, "CLAMD_URL": f"tcp://127.0.0.1:{free_port()}"})
    assert done.returncode == 1 and "clamd: FAIL: not reachable" in done.stdout
