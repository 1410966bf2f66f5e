"""The locks (`make lock`): every dependency the appliance and the tests need, transitive ones included, pinned
with hashes, in step with the direct requirements in requirements*.txt; `make` and the Dockerfile install them
with --require-hashes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)(?P<rest>(?:\s*\\\n\s+--hash=sha256:"
                   r"[0-9a-f]{64})*)", re.MULTILINE)


def locked(path: Path) -> dict[str, tuple[str, int]]:
    text = path.read_text()
    entries = {canonicalize_name(m["name"]): (m["version"], m["rest"].count("--hash=")) for m in ENTRY.finditer(text)}
    pins = [line for line in text.splitlines() if re.match(r"^[A-Za-z0-9]", line)]
    assert len(pins) == len(entries), "every line that pins a package is read"
    return entries


def direct(path: Path) -> dict[str, str]:
    wanted: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            wanted.update(direct(path.parent / line[3:].strip()))
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier  # one exact pin each
        assert spec.operator == "==", line
        wanted[canonicalize_name(requirement.name)] = spec.version
    return wanted


@pytest.mark.parametrize(("lock", "source"), [("requirements.lock", "requirements.txt"),
                                              ("requirements-dev.lock", "requirements-dev.txt")])
def test_the_lock_pins_every_direct_requirement_with_hashes(lock, source):
    entries, wanted = locked(ROOT / lock), direct(ROOT / source)
    for name, version in wanted.items():
        assert name in entries, f"{name} is in {source} but not in {lock}: run `make lock`"
        assert entries[name][0] == version, f"{name}: {source} says {version}, {lock} {entries[name][0]}"
    unhashed = [name for name, (_version, hashes) in entries.items() if not hashes]
    assert not unhashed, unhashed
    # Celery's transport layer: what the broker messages look like (appliance/redis_transport.py reads them).
    for name in ("kombu", "billiard", "vine", "amqp"):
        assert name in entries, name


def test_the_runtime_lock_is_the_dev_lock_s_subset():
    runtime, dev = locked(ROOT / "requirements.lock"), locked(ROOT / "requirements-dev.lock")
    differ = {name: (version, dev.get(name, ("missing",))[0]) for name, (version, _h) in runtime.items()
              if dev.get(name, ("",))[0] != version}
    assert not differ, f"the image and the tests would run different versions: {differ}"


def test_make_and_the_image_install_the_locks_with_hashes():
    assert "pip install -q --require-hashes -r requirements-dev.lock" in (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY requirements.lock" in dockerfile
    assert "pip install --require-hashes -r requirements.lock" in dockerfile
