"""The service's worker processes, kept in step for POST /admin/reload.

BentoML runs `workers` processes behind one port (bentos/service.py); each loads its own
bundle and answers the connections the kernel hands it. An admin reload reaches one of them,
so it is relayed through files in <state>/serving/server-<pid of `bentoml serve`>/:

- reload.json holds a generation number. The worker that receives the call bumps it (under an
  flock) and reloads; every other worker checks the file every `watch_seconds`, reloads when
  the number grew, and writes what happened to <its pid>.json;
- the admin call answers once every live worker has reached that generation, so a request
  sent after it is answered by the new version whichever worker takes it.

The poll of the champion alias (serving.poll_seconds) stays per worker: between two polls the
workers may serve different versions for up to that long, each answer naming its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("vitrine.service")
REQUEST = "reload.json"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_json(path: Path, record: dict) -> None:
    """Atomic: readers see the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Peers:
    """This worker's place among the service's workers (one folder per running server)."""

    def __init__(
        self,
        folder: Path,
        reload: Callable[[], dict],
        pid: int | None = None,
        watch_seconds: float = 0.2,
    ):
        self.folder, self.reload, self.pid = Path(folder), reload, pid or os.getpid()
        self.watch_seconds = watch_seconds
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # a worker started later has nothing to catch up on; one whose first load is still
        # running when the number grows catches up once start() runs its watcher
        self.seen = self.generation()
        self._write_state(None)
        self._thread: threading.Thread | None = None

    @classmethod
    def for_server(cls, home: Path, reload: Callable[[], dict], **kwargs) -> Peers:
        """The folder of the server this worker belongs to (its parent process, `bentoml
        serve`); folders of servers that are gone are removed."""
        root = Path(home) / "serving"
        if root.is_dir():
            for old in root.glob("server-*"):
                pid = old.name.removeprefix("server-")
                if pid.isdigit() and int(pid) != os.getppid() and not alive(int(pid)):
                    shutil.rmtree(old, ignore_errors=True)
        return cls(root / f"server-{os.getppid()}", reload, **kwargs)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="vitrine-peers", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            (self.folder / f"{self.pid}.json").unlink()

    def generation(self) -> int:
        return int((read_json(self.folder / REQUEST) or {}).get("generation", 0))

    def peers(self) -> dict[int, dict]:
        """Every live worker's last state, this one's included."""
        states = {}
        for path in self.folder.glob("[0-9]*.json"):
            pid = int(path.stem)
            if (state := read_json(path)) is not None and (pid == self.pid or alive(pid)):
                states[pid] = state
        return states

    def reload_all(self, timeout: float = 120.0) -> dict:
        """Reload here and in every other worker; this worker's outcome, with `workers` (how
        many answered) and an `error` if any worker failed or did not answer in time."""
        with self._lock, self._flock():
            generation = self.generation() + 1
            write_json(self.folder / REQUEST, {"generation": generation, "by": self.pid})
            self.seen = generation  # this worker's watcher will not reload it a second time
        outcome = self._apply(generation)
        deadline = time.monotonic() + timeout
        while True:
            states = self.peers()
            behind = [pid for pid, s in states.items() if s["generation"] < generation]
            if not behind or time.monotonic() > deadline:
                break
            time.sleep(self.watch_seconds / 2)
        failed = [
            f"worker {pid}: {s['outcome']['error']}"
            for pid, s in states.items()
            if pid != self.pid and (s.get("outcome") or {}).get("error")
        ]
        failed += [f"worker {pid}: no answer after {timeout:.0f} s" for pid in behind]
        answer = {**outcome, "workers": len(states)}
        if failed and not outcome.get("error"):
            answer["error"] = "; ".join(failed)
        return answer

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        with (self.folder / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _apply(self, generation: int) -> dict:
        try:
            outcome = self.reload()
        except Exception as error:  # the loader reports its own failures; this is a bug
            log.exception("reload failed")
            outcome = {"error": f"{type(error).__name__}: {error}"}
        self._write_state(outcome, generation)
        return outcome

    def _write_state(self, outcome: dict | None, generation: int | None = None) -> None:
        state = {"generation": self.seen if generation is None else generation, "outcome": outcome}
        write_json(self.folder / f"{self.pid}.json", state)

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_seconds):
            generation = self.generation()
            with self._lock:
                if generation <= self.seen:
                    continue
                self.seen = generation
            log.info("reload relayed by another worker (generation %d)", generation)
            self._apply(generation)
