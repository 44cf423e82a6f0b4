"""The servers a vitrine command starts (`vitrine serve`: BentoML; `vitrine ui`: MLflow and
Prefect) live and die with it.

Each child runs in a process group of its own, so that a server's own workers (BentoML's,
gunicorn's) can be reached together. SIGTERM or SIGINT to the vitrine process (what systemd,
a container runtime, a supervisor or Ctrl-C sends) is passed on as SIGTERM to every child's
group: the servers stop gracefully (in-flight requests finish), and whatever is still running
after `grace` seconds is killed. Without this, SIGTERM ended vitrine and left its servers
answering on their ports, orphans nobody stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the child's process group; SIGKILL to what is left of it after `grace` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and group_alive(proc.pid):
        proc.poll()  # reap the leader, so that the group can empty
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def group_alive(pgid: int) -> bool:
    """Whether any process (not a zombie) is left in the process group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, …
                return True
    return False


def run_children(
    commands: Sequence[list[str]],
    env: dict[str, str],
    cwd: Path | None = None,
    wait: bool = True,
    grace: float = 20.0,
) -> int:
    """Start every command; with `wait`, block until they all exit or a signal stops them.

    Returns 0 after a stop by signal, else the first non-zero exit code of a child."""
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
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        codes = [0]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc in procs:
            stop_group(proc, grace)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if stopping else next((code for code in codes if code), 0)
