"""The Debian install without Docker (docs/install-debian.md): conf/systemd/'s units pass `systemd-analyze
verify` with the installation's prefix /opt/mailgate standing for this checkout (whose .venv holds the same
programs), and its sysusers and tmpfiles files make the user and the directories with the modes the docs give,
in a root of their own."""

from __future__ import annotations

import configparser
import grp
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support import services

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "conf" / "systemd"
PREFIX = "/opt/mailgate"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read(UNITS / name)
    return parser


@pytest.fixture
def installed_units(tmp_path) -> list[Path]:
    for program in ("python", "gunicorn", "celery"):
        assert os.access(ROOT / ".venv" / "bin" / program, os.X_OK), program
    copies = []
    for source in sorted([*UNITS.glob("*.service"), *UNITS.glob("*.target")]):
        copy = tmp_path / source.name
        copy.write_text(source.read_text().replace(PREFIX, str(ROOT)))
        copies.append(copy)
    return copies


def test_systemd_analyze_verify_finds_nothing(installed_units):
    tool = services.require_binary("systemd-analyze")
    done = subprocess.run([tool, "verify", *map(str, installed_units)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    # Warnings (an unknown key, a bad capability name) leave the exit status 0: any output is a failure too.
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr
    assert {path.name for path in installed_units} >= {"mailgate-smtp.service", "mailgate-web.service",
                                                       "mailgate-worker.service", "mailgate-beat.service",
                                                       "mailgate.target"}


def test_every_process_runs_as_mailgate_and_only_smtp_may_bind_low_ports():
    for name in ("mailgate-smtp.service", "mailgate-web.service", "mailgate-worker.service",
                 "mailgate-beat.service"):
        service = unit(name)["Service"]
        assert service["User"] == service["Group"] == "mailgate", name
        assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict", name
        assert service["ExecStart"].startswith(f"{PREFIX}/.venv/bin/"), name
        assert service["EnvironmentFile"] == "/etc/mailgate/mailgate.env", name
        if name == "mailgate-smtp.service":
            assert service["AmbientCapabilities"] == service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
            assert "--listen 0.0.0.0:25" in service["ExecStart"]
            assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # the certificate reload
        else:
            assert "AmbientCapabilities" not in service and service["CapabilityBoundingSet"] == "", name
    wanted = unit("mailgate.target")["Unit"]["Wants"].split()
    assert sorted(wanted) == ["mailgate-beat.service", "mailgate-smtp.service", "mailgate-web.service",
                              "mailgate-worker.service"]


def test_sysusers_and_tmpfiles_make_the_user_and_private_directories(tmp_path):
    sysusers = services.require_binary("systemd-sysusers")
    tmpfiles = services.require_binary("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    # The groups a Debian system has before the package: adm reads the logs.
    (root / "etc" / "group").write_text(f"adm:x:{grp.getgrnam('adm').gr_gid}:\n")
    for command in ([sysusers, f"--root={root}", str(UNITS / "mailgate.sysusers")],
                    [tmpfiles, f"--root={root}", "--create", str(UNITS / "mailgate.tmpfiles")]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    user = passwd["mailgate"]
    assert user[5] == "/var/lib/mailgate" and user[6] == "/usr/sbin/nologin"
    uid, gid = int(user[2]), int(user[3])
    assert uid < 1000  # a system user

    def owned(path: str) -> tuple[int, int, int]:
        info = (root / path.lstrip("/")).stat()
        return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid

    assert owned("/var/lib/mailgate") == (0o700, uid, gid)
    assert owned("/var/log/mailgate") == (0o750, uid, grp.getgrnam("adm").gr_gid)
    assert owned("/etc/mailgate/tls") == (0o750, 0, gid)
    shutil.rmtree(root)
