"""Shared pieces of the benchmarks: child processes that are always cleaned up, a scratch PostgreSQL
database, the product's management commands, CPU accounting from /proc, and the machine's description.

Everything listens on 127.0.0.1; every wait is bounded by a deadline.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
VENV = ROOT / ".venv"
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def reexec_in_venv(script: str) -> None:
    """Run the script with the repository's virtualenv, whatever `python3` the shebang found."""
    python = VENV / "bin" / "python"
    if python.exists() and Path(sys.prefix).resolve() != VENV.resolve() and not os.environ.get("BENCH_REEXEC"):
        os.environ["BENCH_REEXEC"] = "1"
        os.execv(str(python), [str(python), script, *sys.argv[1:]])


def log(*parts) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


# --- child processes -----------------------------------------------------------------------------------

_children: list[subprocess.Popen] = []


def _cleanup() -> None:
    for proc in reversed(_children):
        stop(proc, timeout=10)
    _children.clear()


def _on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    atexit.register(_cleanup)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)


def start(cmd: list[str], *, env: dict | None = None, log_name: str, cwd: Path = ROOT) -> subprocess.Popen:
    """Start a child in its own process group, its output in bench/results/<log_name>.log."""
    RESULTS.mkdir(exist_ok=True)
    out = open(RESULTS / f"{log_name}.log", "wb")  # noqa: SIM115 - kept open for the child's lifetime
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    proc.log_path = RESULTS / f"{log_name}.log"
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM to the child (a clean shutdown), then SIGKILL to its process group if it lingers."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group is the child's own (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    if proc in _children:
        _children.remove(proc)


UNBOUND = "/usr/sbin/unbound"


def start_unbound(forward_port: int, log_name: str = "unbound") -> tuple[subprocess.Popen, int]:
    """Debian's unbound on 127.0.0.1 as the MX's local caching resolver, forwarding every question to the test
    zones' server on `forward_port` (as a real one asks the internet): the product asks unbound, which answers
    repeated questions from its cache. Its configuration and state in a directory of its own under
    bench/results/; no DNSSEC validation (the test zones are unsigned), no chroot, no daemon."""
    if not os.access(UNBOUND, os.X_OK):
        raise SystemExit(f"{UNBOUND} is missing: apt-get install unbound")
    home = RESULTS / f"{log_name}.d"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = home / "unbound.conf"
    config.write_text(f"""server:
    interface: 127.0.0.1
    port: {port}
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{home}"
    pidfile: "{home}/unbound.pid"
    logfile: ""
    use-syslog: no
    verbosity: 0
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "iterator"
    num-threads: 1
    prefetch: yes
    cache-min-ttl: 60
    # 127.0.0.1's PTR and the RFC 2606 names are answered by the test zones, not by unbound's defaults.
    local-zone: "127.in-addr.arpa." nodefault
    local-zone: "test." nodefault
    local-zone: "invalid." nodefault
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{forward_port}
""")
    check = subprocess.run(["/usr/sbin/unbound-checkconf", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"unbound-checkconf {config}: {check.stdout}{check.stderr}")
    proc = start([UNBOUND, "-d", "-c", str(config)], env=product_env(), log_name=log_name)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"unbound exited with {proc.returncode}; see {proc.log_path}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:  # unbound answers TCP on the same port
                return proc, port
        time.sleep(0.05)
    raise SystemExit(f"unbound did not listen on 127.0.0.1:{port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_smtp(port: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Until the port greets with 220 (bounded); fail with the child's log if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{proc.args[:3]} exited with {proc.returncode}; see {proc.log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"nothing greets on 127.0.0.1:{port} after {timeout}s")


def run(cmd: list[str], *, env: dict | None = None, timeout: float = 600, check: bool = True) -> str:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def manage(env: dict, *args: str, timeout: float = 600) -> str:
    return run([sys.executable, "manage.py", *args], env=env, timeout=timeout)


def product_env(**overrides: str) -> dict:
    """The environment of the product's processes: this one, minus anything that would redirect them."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER", "DATABASE_URL", "BENCH_REEXEC")}
    # A benchmark's scratch appliance, like the tests, runs on the development key unless one is given.
    env.update({"DJANGO_SETTINGS_MODULE": "appliance.settings", "PYTHONUNBUFFERED": "1"})
    env.setdefault("ALLOW_INSECURE_SECRET", "true")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def smtp_checks_off(env: dict) -> str:
    """Switch off every SMTP-time check of issue 3 (`manage.py smtppolicy`), when this tree has them:
    issue 2's figures are for intake alone, and greylisting would answer 451 to a benchmark's first tries."""
    import json

    done = subprocess.run([sys.executable, "manage.py", "smtppolicy", "show"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        return "no SMTP-time checks in this tree"
    try:
        policy = json.loads(done.stdout).get("policy", {})
    except ValueError:
        return "no SMTP-time checks in this tree"
    actions = [f"{k}=off" for k in policy if k.endswith("_action")]
    if actions:
        manage(env, "smtppolicy", "set", *actions)
    return f"SMTP-time checks off ({len(actions)} actions set to off)"


# --- PostgreSQL ----------------------------------------------------------------------------------------

def fresh_database(name: str) -> str:
    """Drop and create a scratch database; its DATABASE_URL."""
    import psycopg
    from psycopg import sql

    if not name.startswith("mailgate_bench"):
        raise SystemExit(f"refusing to drop {name!r}: benchmark databases are named mailgate_bench*")
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def query(url: str, text: str, params=()) -> list[tuple]:
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(text, params).fetchall()


def pg_version() -> str:
    try:
        return query(PG_ADMIN_URL, "SHOW server_version")[0][0]
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({exc})"


# --- CPU accounting --------------------------------------------------------------------------------------

def _cpu_of(pid: int) -> float:
    """CPU seconds of a process (all its threads) and of its children that exited and were reaped: spamd
    and Celery replace their children now and then, whose CPU then moves to the parent's count."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(f) for f in fields[11:15]) / CLK_TCK  # utime, stime, cutime, cstime


def pids_by_name(*names: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in names:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def pids_postgres(dbname: str) -> list[int]:
    """The PostgreSQL backends serving `dbname`, and the shared writers (WAL, checkpoints) that our
    commits keep busy; not the backends of other databases (other people's tests on a shared machine)."""
    pids = []
    for pid in pids_by_name("postgres"):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
        except OSError:
            continue
        # "postgres: 15/main: USER DBNAME HOST(PORT) STATE", or "postgres: 15/main: walwriter"
        if (len(words) >= 4 and words[3] == dbname) or words[-1:] in (["walwriter"], ["checkpointer"]) \
                or words[-2:] == ["background", "writer"]:
            pids.append(pid)
    return pids


def postmaster_pid(dbname: str) -> list[int]:
    """The postmaster, the parent of the backends: a new connection is a backend it forks, and the CPU of a
    backend that ends is added to the postmaster's (with every other database's, on a shared machine)."""
    for pid in pids_postgres(dbname):
        ppid = _ppid_of(pid)
        if ppid > 1:
            return [ppid]
    return []


def pids_in_group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except (OSError, ProcessLookupError):
                pass
    return pids


class CpuMeter:
    """CPU seconds used by groups of processes between start() and stop().

    groups: name -> a callable giving the pids now. A group is counted as the sum of its processes'
    CPU, their reaped children included, at the start and at the end; the PostgreSQL backends of a
    benchmark's database live through the whole run (persistent connections).
    """

    def __init__(self, groups: dict):
        self.groups = groups

    def _sample(self) -> dict[str, dict[int, tuple[float, int]]]:
        return {name: {pid: (_cpu_of(pid), _ppid_of(pid)) for pid in pids()} for name, pids in self.groups.items()}

    def start(self) -> None:
        self.before = self._sample()
        self.all_before = _all_cpu()
        self.machine_before = machine_busy()
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        after = self._sample()
        out = {}
        for name, now in after.items():
            # A child that exits meanwhile moves its whole CPU to its parent (when the parent is ours: spamd,
            # Celery): subtract what it had at the start. One that nobody of ours reaps (a PostgreSQL backend
            # that closes) is left out.
            before = self.before.get(name, {})
            used = sum(cpu for cpu, _ in now.values())
            used -= sum(cpu for pid, (cpu, ppid) in before.items() if pid in now or ppid in now)
            out[name] = round(used, 3)
        out["wall"] = round(time.perf_counter() - self.t0, 3)
        out["machine"] = round(machine_busy() - self.machine_before, 3)
        # Who else used the CPUs meanwhile (other people's work on a shared machine), for the record.
        ours = {pid for pids in after.values() for pid in pids}
        others = {pid: cpu - self.all_before.get(pid, (0.0, ""))[0] for pid, (cpu, _) in _all_cpu().items()
                  if pid not in ours}
        all_now = _all_cpu()
        self.top_others = [(round(v, 2), all_now.get(pid, (0, "?"))[1]) for pid, v in
                           sorted(others.items(), key=lambda kv: -kv[1])[:5] if v > 0.2]
        return out


def _ppid_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _all_cpu() -> dict[int, tuple[float, str]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:80]
            except OSError:
                continue
            out[int(entry.name)] = (_cpu_of(int(entry.name)), cmd)
    return out


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all CPUs), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_quiet(max_wait: float, threshold: float = 0.15, sample: float = 1.0) -> float:
    """Wait (at most max_wait s) until the machine is nearly idle: other people's tests on a shared
    machine would skew a run. Returns the busy fraction seen last (0..1 of all CPUs)."""
    ncpu = len(os.sched_getaffinity(0))
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_busy()
        time.sleep(sample)
        busy = (machine_busy() - before) / (sample * ncpu)
        if busy <= threshold or time.monotonic() >= deadline:
            if busy > threshold:
                log(f"the machine is still {busy:.0%} busy with other work; measuring anyway")
            return busy


# --- the machine ---------------------------------------------------------------------------------------

def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import aiosmtpd

        aiosmtpd_version = aiosmtpd.__version__
    except Exception:  # noqa: BLE001
        aiosmtpd_version = "?"
    try:
        import uvloop  # noqa: F401

        have_uvloop = True
    except ImportError:
        have_uvloop = False
    mem = ""
    try:
        total = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        mem = f"{int(total.split()[1]) // 1024} MiB"
    except (OSError, StopIteration):
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg_version(),
        "aiosmtpd": aiosmtpd_version,
        "uvloop_installed": have_uvloop,
    }


def print_machine(info: dict) -> None:
    print(f"machine: {info['nproc']} CPU(s) ({info['cpu']}), {info['memory']}, Linux {info['kernel']}, "
          f"Python {info['python']}, PostgreSQL {info['postgresql']}, aiosmtpd {info['aiosmtpd']}, "
          f"uvloop {'installed' if info['uvloop_installed'] else 'not installed'}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def save_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


# --- the SMTP-time checks on, against the test zones (bench/intake --checks, bench/pipeline --checks) ------

DNS_STUB_CHILD = r"""
import json, signal, sys, threading
sys.path.insert(0, sys.argv[1])
from tests.support.dnsstub import DNSStub
stub = DNSStub(json.loads(sys.argv[2])).start()
print("port", stub.port, flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
done.wait(3600)
stub.stop()
"""


def bench_zones() -> dict:
    """What a well-configured sending site publishes: the client's PTR and A, the HELO name, SPF, DMARC."""
    return {
        "sender.example": [{"A": "127.0.0.1"}, {"MX": [10, "client.sender.example"]},
                           {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}],
        "client.sender.example": [{"A": "127.0.0.1"}],
        "_dmarc.sender.example": [{"TXT": "v=DMARC1; p=reject"}],
        "1.0.0.127.in-addr.arpa": [{"PTR": "client.sender.example"}],
        "example.org": [{"MX": [10, "mx.example.org"]}, {"A": "127.0.0.1"}],
    }


def start_checks(env: dict, *, resolver: str, extra: list[str], sender: str, recipient: str,
                 log_prefix: str) -> tuple[dict, str]:
    """A local DNS server and the SMTP-time checks on, as the product ships them: the environment runsmtp
    needs for them, and a line saying what was set up. `resolver` "unbound": Debian's unbound on 127.0.0.1
    forwarding to the test zones (as a real MX runs a local caching resolver); "stub": the zones' server itself.

    The checks stay at their defaults (`manage.py smtppolicy show`), with the DNS answers of a well-run
    sending site (bench_zones), so every check runs and passes; the one check that would refuse every
    first try, greylisting, has the benchmark's triplet passed beforehand (its look-up still runs).
    More settings: `extra` KEY=VALUE items (--checks-env: the environment of runsmtp).
    """
    import json

    stub = start([sys.executable, "-c", DNS_STUB_CHILD, str(ROOT), json.dumps(bench_zones())],
                 env=product_env(), log_name=f"{log_prefix}-dnsstub")
    deadline = time.monotonic() + 15
    port = None
    while time.monotonic() < deadline and port is None:
        if stub.poll() is not None:
            raise SystemExit(f"the DNS stub exited; see {stub.log_path}")
        text = stub.log_path.read_text() if stub.log_path.exists() else ""
        for line in text.splitlines():
            if line.startswith("port "):
                port = int(line.split()[1])
        time.sleep(0.05)
    if port is None:
        raise SystemExit("the DNS stub did not start")
    note = f"DNS stub on 127.0.0.1:{port}"
    if resolver == "unbound":
        _unbound, resolver_port = start_unbound(port, log_name=f"{log_prefix}-unbound")
        note = f"unbound on 127.0.0.1:{resolver_port} forwarding to the {note}"
    else:
        resolver_port = port
    overrides = {"SMTP_REVERSE_DNS": "true", "DNS_NAMESERVERS": "127.0.0.1", "DNS_PORT": str(resolver_port)}
    for item in extra:
        key, _, value = item.partition("=")
        overrides[key] = value
    done = subprocess.run([sys.executable, "manage.py", "smtppolicy", "greylist-pass", "127.0.0.1", sender, recipient],
                          env={**env, **overrides}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    note += ", greylisting triplet passed" if done.returncode == 0 else ", no greylisting in this tree"
    log(f"--checks: {note}; runsmtp environment {overrides}")
    return overrides, note
