"""The servers a vitrine command starts (`vitrine serve`: BentoML; `vitrine ui`: MLflow and
Prefect) live and die with it.

Each child runs in a process group of its own, so that a server's own workers (BentoML's,
gunicorn's) can be reached together. SIGTERM or SIGINT to the vitrine process (what systemd,
a container runtime, a supervisor or Ctrl-C sends) is passed on as SIGTERM to every child's
group: the servers stop gracefully (in-flight requests finish). What a child started in a
session of its own gets SIGTERM after `grace` seconds if it has not ended by then, and
whatever is still running `settle` seconds later is killed. Without this, SIGTERM ended
vitrine and left its servers answering on their ports, orphans nobody stopped. (`vitrine
worker` runs Prefect's worker in its own process instead: vitrine/worker.py.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def stop_group(proc: subprocess.Popen, grace: float, settle: float = 10.0) -> None:
    """Stop the child, its process group and what it started in sessions of its own: the
    group gets SIGTERM first, the other sessions after `grace` s, SIGKILL after `settle`."""
    tree = descendants(proc.pid)  # before the leader can exit and orphan them
    _signal_groups({proc.pid}, signal.SIGTERM)
    tree = _wait(proc, tree, grace)
    _signal_groups({_pgid(pid) for pid in tree} - {proc.pid}, signal.SIGTERM)
    tree = _wait(proc, tree, settle)
    _signal_groups({proc.pid} | {_pgid(pid) for pid in tree}, signal.SIGKILL)
    proc.wait()


def _signal_groups(pgids: set[int | None], signum: int) -> None:
    for pgid in pgids - {None}:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)


def _wait(proc: subprocess.Popen, tree: set[int], seconds: float) -> set[int]:
    """Wait up to `seconds` for `tree` and the child's group to end; returns the part of `tree`
    still alive."""
    deadline = time.monotonic() + seconds
    while True:
        proc.poll()  # reap the leader, so that the group can empty
        tree = alive(tree | descendants(proc.pid))
        if not tree and not group_alive(proc.pid):
            return tree
        if time.monotonic() >= deadline:
            return tree
        time.sleep(0.1)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, pgrp, …), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _pgid(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[2]) if fields else None


def alive(pids: set[int]) -> set[int]:
    """The processes of `pids` that still run (not zombies)."""
    return {pid for pid in pids if (fields := _stat(pid)) and fields[0] != "Z"}


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc's parent links), whatever its group."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        if (fields := _stat(int(stat.parent.name))) and fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def group_alive(pgid: int) -> bool:
    """Whether any process (not a zombie) is left in the process group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def run_children(
    commands: Sequence[list[str]],
    env: dict[str, str],
    cwd: Path | None = None,
    wait: bool = True,
    grace: float = 20.0,
) -> int:
    """Start every command; with `wait`, block until a signal stops them or one of them exits
    (then the others are stopped: a UI whose MLflow died must not linger half-alive).

    Returns 0 after a stop by signal, else the exit code of the child that ended first, or 1
    if that was 0: these are servers, and one that ends by itself has failed (uvicorn exits 0
    when its port is taken)."""
    procs = [
        subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True) for command in commands
    ]
    if not wait:
        return 0
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)
        raise KeyboardInterrupt  # leaves the wait below, in the main thread

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.2)
        ended = next(proc for proc in procs if proc.returncode is not None)
        code = ended.returncode or 1
        others = "; stopping the others" if len(procs) > 1 else ""
        name = Path(ended.args[0]).name
        print(f"vitrine: {name} exited with {ended.returncode}{others}", file=sys.stderr)
    except KeyboardInterrupt:
        code = 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc in procs:
            stop_group(proc, grace)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if stopping else code
