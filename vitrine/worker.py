"""`vitrine worker`: Prefect's process worker, run in vitrine's own process so that a stop ends
its polling before the grace begins.

Run as a child (`prefect worker start`), the worker polled the work pool until its process
ended. During the grace, once its own run had ended, it could claim a retrain run that was
waiting for the deployment's slot (AwaitingConcurrencySlot), then exit without starting it:
that run stayed Pending and no other host took it (and a run claimed but not yet started at
the signal was left Pending too: the grace waited only for started processes). Here SIGTERM or
SIGINT (Ctrl-C) first ends the worker's loops, so it claims no run after the signal (a waiting
run stays Scheduled for another worker). The runs it holds, from their claim on, then get
`grace` seconds to end; whatever still runs is sent SIGTERM (each flow run leads a process
group of its own), and SIGKILL `settle` seconds later. The worker stays up until they have
ended and records each stopped run Crashed (its process exited non-zero). Further signals
during the stop are ignored.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Callable
from functools import partial

import anyio
from prefect.logging.configuration import ensure_logging_setup
from prefect.settings import PREFECT_WORKER_QUERY_SECONDS
from prefect.utilities.services import critical_service_loop
from prefect.workers.process import ProcessWorker

from vitrine.children import descendants

Say = Callable[[str], None]


def run_worker(
    pool: str, name: str, grace: float, say: Say = print, settle: float = 10.0
) -> str | None:
    """Execute the runs of work pool `pool` until SIGTERM or SIGINT, then stop as above.

    Returns None after a stop by signal, or why the worker gave up (one line: its loops
    failed repeatedly, e.g. the server kept refusing it); its runs were stopped as on a signal.
    """
    ensure_logging_setup()  # the runs' logs on the console too, as `prefect worker` prints them
    try:
        return anyio.run(_serve, pool, name, grace, settle, say)
    except Exception as exc:  # the worker could not start (or stop) cleanly
        return _one_line(exc)


async def _serve(pool: str, name: str, grace: float, settle: float, say: Say) -> str | None:
    stopping = anyio.Event()
    failure = None
    async with anyio.create_task_group() as watcher:
        watcher.start_soon(_watch_signals, stopping, say)
        # an unbounded limiter: its borrowed tokens count the runs this worker has claimed and
        # not yet finished (what Prefect's own `worker start --run-once` waits on)
        async with ProcessWorker(work_pool_name=pool, name=name, limit=math.inf) as worker:
            poll = PREFECT_WORKER_QUERY_SECONDS.value()
            say(f"worker {name!r} polls work pool {pool!r} every {poll:g} s")
            try:
                await _poll_until(stopping, worker, poll)
            except Exception as exc:  # its loops gave up: the server failed them repeatedly
                failure = _one_line(exc)
            await _drain(worker, grace, settle, say)
        watcher.cancel_scope.cancel()
    say(f"worker {name!r} stopped")
    return failure


async def _watch_signals(stopping: anyio.Event, say: Say) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        async for signum in received:
            if not stopping.is_set():
                say(f"{signal.Signals(signum).name}: the worker takes no new run")
            stopping.set()


async def _poll_until(stopping: anyio.Event, worker: ProcessWorker, poll: float) -> None:
    """The worker's two loops, as `prefect worker start` runs them, until `stopping`: polling
    the pool (claims and starts the runs that are due) and syncing with the server (the
    worker's heartbeat, the pool's settings). The runs already submitted go on."""
    if stopping.is_set():
        return
    loop = partial(critical_service_loop, jitter_range=0.3, backoff=4)
    async with anyio.create_task_group() as loops:
        loops.start_soon(partial(loop, worker.get_and_submit_flow_runs, poll))
        loops.start_soon(partial(loop, worker.sync_with_backend, worker.heartbeat_interval_seconds))
        await stopping.wait()
        loops.cancel_scope.cancel()


async def _drain(worker: ProcessWorker, grace: float, settle: float, say: Say) -> None:
    """Wait for the runs the worker holds: `grace` s, then SIGTERM, `settle` s later SIGKILL."""

    def held() -> int:
        return int(worker.limiter.borrowed_tokens)

    if held():
        say(f"waiting up to {grace:g} s for {held()} flow run(s) to finish")
    with anyio.move_on_after(grace):
        while held():
            await anyio.sleep(0.2)
    terminated: set[int] = set()
    kill_at = anyio.current_time() + settle
    while held() and anyio.current_time() < kill_at + settle:
        groups = _run_groups()
        if anyio.current_time() >= kill_at:
            _signal(groups, signal.SIGKILL)
        elif groups - terminated:
            say(f"grace over: SIGTERM to {len(groups - terminated)} flow run(s)")
            _signal(groups - terminated, signal.SIGTERM)
            terminated |= groups
        await anyio.sleep(0.2)


def _run_groups() -> set[int]:
    """The process groups of this process's flow runs (each leads a session of its own)."""
    groups = set()
    for pid in descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    return groups - {os.getpgrp()}


def _signal(groups: set[int], signum: int) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signum)


def _one_line(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
