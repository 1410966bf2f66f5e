"""The scheduling policies of a process's threads, read from /proc (the SCHED_BATCH tests)."""

from pathlib import Path


def thread_policies(pid: int) -> set[int]:
    """The scheduling policy of each thread of a process (proc(5): the 41st field of stat)."""
    policies = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            policies.add(int((task / "stat").read_text().rsplit(")", 1)[1].split()[38]))
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return policies
