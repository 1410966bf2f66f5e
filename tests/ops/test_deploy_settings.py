"""The settings fail closed: no process starts without a SECRET_KEY of its own (but `make run` and the tests),
the web service of docker-compose.yml passes `manage.py check --deploy`, and DATA_DIR (all mail, the password
hashes, the private keys) is private to the appliance's user. Each case runs the settings in a process of its
own, with the environment it states."""

from __future__ import annotations

import os
import re
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import services

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
# What the settings read from the caller's environment: none of it leaks into these processes.
CLEARED = ("SECRET_KEY", "ALLOW_INSECURE_SECRET", "DEBUG", "PYTEST_VERSION", "DATABASE_URL", "DATA_DIR",
           "CACHE_URL", "SECURE_COOKIES", "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS",
           "SECURE_HSTS_INCLUDE_SUBDOMAINS", "SECURE_HSTS_PRELOAD", "SECURE_PROXY_SSL_HEADER", "ALLOWED_HOSTS")


def environment(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env["DJANGO_SETTINGS_MODULE"] = "appliance.settings"
    env.update(values)
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def setup_only(env: dict[str, str], code: str = "") -> subprocess.CompletedProcess:
    return run(["-c", f"import django; django.setup(); {code}"], env)


# --- SECRET_KEY ------------------------------------------------------------------------------------------


def test_a_missing_secret_key_stops_every_process(tmp_path):
    env = environment(DATA_DIR=str(tmp_path))
    for done in (setup_only(env), run(["manage.py", "check"], env)):
        assert done.returncode != 0
        assert "ImproperlyConfigured" in done.stderr and "SECRET_KEY is not set" in done.stderr


def test_without_a_secret_key_only_make_run_debug_and_the_tests_start(tmp_path):
    base = environment(DATA_DIR=str(tmp_path))
    # `make run`: runappliance itself, and the Makefile's run target for the commands before it.
    assert run(["manage.py", "runappliance", "--help"], base).returncode == 0
    assert run(["manage.py", "check"], {**base, "ALLOW_INSECURE_SECRET": "true"}).returncode == 0
    assert run(["manage.py", "check"], {**base, "DEBUG": "true"}).returncode == 0
    assert run(["manage.py", "check"], {**base, "PYTEST_VERSION": "9"}).returncode == 0
    # A key of one's own always works, and is the one used.
    key = secrets.token_urlsafe(50)
    done = setup_only({**base, "SECRET_KEY": key}, "from django.conf import settings; print(settings.SECRET_KEY)")
    assert done.returncode == 0 and done.stdout.strip() == key


# --- docker-compose.yml ----------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}")


def interpolate(value, given: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?error}, from `given` (the operator's .env)."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        if given.get(name):
            return given[name]
        if op == ":?":
            raise AssertionError(f"compose needs {name}: {arg}")
        return arg or ""
    return _VARIABLE.sub(one, str(value))


def compose_environment(service: str, given: dict[str, str]) -> dict[str, str]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name: interpolate(value, given) for name, value in services[service]["environment"].items()}


@pytest.fixture
def operator_env() -> dict[str, str]:
    """What conf/compose.env.example asks the operator to set."""
    return {"SECRET_KEY": secrets.token_urlsafe(50), "POSTGRES_PASSWORD": secrets.token_urlsafe(20),
            "ALLOWED_HOSTS": "mailgate.example.org"}


def test_the_web_service_is_https_only(operator_env):
    web = compose_environment("web", operator_env)
    assert web["SECURE_COOKIES"] == web["SECURE_SSL_REDIRECT"] == "true"
    assert int(web["SECURE_HSTS_SECONDS"]) >= 31536000
    assert web["SECURE_PROXY_SSL_HEADER"] == "HTTP_X_FORWARDED_PROTO,https"
    assert web["ALLOW_INSECURE_SECRET"] == "false" and web["SECRET_KEY"] == operator_env["SECRET_KEY"]
    assert web["CACHE_URL"].startswith("redis://")  # one throttle for every web and SMTP process
    # Reached only from the host (where the proxy is), through Docker's bridge, whose address is believed.
    assert web["TRUSTED_PROXIES"] == "172.16.0.0/12"
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services["web"]["ports"] == ["${WEB_PORT:-127.0.0.1:8000}:8000"]
    # Every other service of the app keeps the shared environment (the web service adds to it).
    worker = compose_environment("worker", operator_env)
    assert {k: v for k, v in web.items() if k in worker} == worker


def test_check_deploy_is_clean_with_the_compose_environment(operator_env, tmp_path):
    web = compose_environment("web", operator_env)
    web["DATA_DIR"] = str(tmp_path / "mailgate")  # the container's /var/lib/mailgate, here
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **web}
    done = run(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], env)
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stderr
    assert "System check identified no issues (0 silenced)" in done.stdout


def test_docker_compose_accepts_the_file(operator_env, tmp_path):
    tool = services.require_binary("docker-compose")  # Debian's docker-compose: `config` needs no Docker daemon
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **operator_env}
    done = subprocess.run([tool, "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    # Without the secrets it refuses, as the file says.
    refused = subprocess.run([tool, "-f", str(COMPOSE), "config", "-q"], env={**env, "SECRET_KEY": ""},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "SECRET_KEY" in refused.stderr


# --- DATA_DIR ---------------------------------------------------------------------------------------------

# Open the database and write to it and to the file cache; then, with the connection still open (SQLite drops
# its -wal and -shm files with its last connection), list every file of DATA_DIR with its mode.
TOUCH_EVERYTHING = ("from django.db import connection; connection.ensure_connection(); "
                    "connection.cursor().execute('CREATE TABLE t (x)'); "
                    "from django.core.cache import cache; cache.set('k', 1); "
                    "import os, stat; from django.conf import settings; "
                    "[print(oct(stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode)), os.path.join(d, n)) "
                    " for d, dirs, files in os.walk(settings.DATA_DIR) for n in dirs + files]")


def listed_modes(stdout: str) -> dict[str, int]:
    return {path: int(mode, 8) for mode, path in (line.split(" ", 1) for line in stdout.splitlines() if line)}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_data_dir_is_private(tmp_path):
    data = tmp_path / "data"
    done = setup_only(environment(DATA_DIR=str(data), ALLOW_INSECURE_SECRET="true"), TOUCH_EVERYTHING)
    assert done.returncode == 0, done.stderr
    assert mode(data) == 0o700
    modes = listed_modes(done.stdout)
    database = str(data / "gateway.sqlite3")
    assert modes[database] == modes[database + "-wal"] == modes[database + "-shm"] == 0o600
    cache_files = [path for path in modes if path.startswith(str(data / "cache") + "/")]
    assert cache_files and all(modes[path] == 0o600 for path in cache_files)
    # Nothing in it is open to others (and the directory alone would stop them).
    assert all(not m & 0o077 for m in modes.values()), modes


def test_an_open_data_dir_is_tightened_at_start_with_a_log_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    database = data / "gateway.sqlite3"
    database.write_bytes(b"")
    database.chmod(0o644)
    done = setup_only(environment(DATA_DIR=str(data), ALLOW_INSECURE_SECRET="true"), TOUCH_EVERYTHING)
    assert done.returncode == 0, done.stderr
    assert (mode(data), mode(database)) == (0o700, 0o600)
    assert f"{data} was open to other users (mode 755); it is now 0700" in done.stderr
    assert f"{database} was readable by other users (mode 644); it is now 0600" in done.stderr
