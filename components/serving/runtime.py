"""The service's inference runtime: per-thread torch/FAISS thread pins (components/threads.py),
the heap freeze after a load, the sha256 LRU cache and the micro-batcher that groups
concurrent model calls."""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import cachetools

from components.threads import pin_thread, set_threads

CALL_THREADS = [0]  # threads per torch / FAISS call in the service; 0 = leave the defaults


def set_call_threads(threads: int) -> None:
    """The service's threads per model / FAISS call (params serving.threads)."""
    CALL_THREADS[0] = threads
    set_threads(threads)


def in_call_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) with this worker thread's OpenMP count pinned to CALL_THREADS.

    Without the pin, a worker thread starts a team of every core on its first FAISS search,
    and that team's idle workers spin at a barrier after each search, taking a core from the
    event loop (seen: 4.6 s of CPU in one spinning thread while 500 requests were served)."""
    pin_thread(CALL_THREADS[0])
    return fn(*args, **kwargs)


def exit_with_parent(expected: str = "bentoml", interval: float = 1.0) -> threading.Thread:
    """SIGTERM this process (a graceful stop) once its parent, a process whose command line
    names `expected`, is gone.

    BentoML starts each worker in a session of its own, so when its arbiter dies without
    stopping them (SIGKILL, an OOM kill) the workers kept answering on the port, orphans that
    nothing would stop or restart and that held the port against a new server. A worker whose
    arbiter died while it was starting finds itself adopted at once (its parent is not
    `expected`)."""
    parent = os.getppid()

    def watch() -> None:
        cmdline = Path(f"/proc/{parent}/cmdline")
        born_orphan = cmdline.parent.exists() and expected.encode() not in _read(cmdline)
        while not born_orphan and os.getppid() == parent:
            time.sleep(interval)
        logging.getLogger("vitrine.service").warning("parent %s is gone: stopping", parent)
        for _ in range(3):  # a SIGTERM before the server set its handlers is lost: repeat
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        os._exit(1)  # the graceful stop hung

    thread = threading.Thread(target=watch, name="vitrine-parent-watch", daemon=True)
    thread.start()
    return thread


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def settle_heap() -> None:
    """Put what is alive now (the loaded bundles: model, index records, text model) out of the
    garbage collector's reach. A full collection walks every tracked object: with the
    70,000-product catalogue loaded one took 418 ms, stalling every request in flight (the p99
    at concurrency 16). Called after each load; its own collection is the one pause a swap costs.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return_free_memory()


def return_free_memory() -> None:
    """Hand the pages malloc holds free back to the system (glibc's malloc_trim; elsewhere
    nothing). A swap frees the old bundle, but glibc keeps freed heap pages: over 12 swaps
    under traffic a worker grew 80-89 MB without the trim, 29-68 MB with it
    (docs/benchmarks.md#soak)."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return None


class LRUCache:
    """cachetools' LRU behind a lock (the service's worker threads share it), with hit / miss
    counts; size 0 caches nothing."""

    def __init__(self, size: int):
        self.size = size
        self._data: cachetools.LRUCache = cachetools.LRUCache(maxsize=max(size, 1))
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            value = self._data.get(key)  # a hit makes the key the most recent
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def put(self, key: Hashable, value: Any) -> None:
        if self.size > 0:
            with self._lock:
                self._data[key] = value

    def __len__(self) -> int:
        return len(self._data)


class MicroBatcher:
    """Concurrent submissions → one call of `run_batch(items) -> results` per batch.

    A worker thread takes whatever is queued (up to max_batch_size), waiting at most
    max_wait_ms for more after the first item: with max_wait_ms=0 a lone request runs at once
    and requests arriving while a batch runs form the next batch (adaptive under load).
    `run(item)` skips the hand-off for a caller alone in it: the caller's thread runs the item
    itself (two thread wake-ups less per request at low load).
    """

    def __init__(
        self,
        run_batch: Callable[[list], list],
        max_batch_size: int = 64,
        max_wait_ms: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.run_batch, self.max_batch_size = run_batch, max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._callers = 0  # callers inside run()
        self._thread = threading.Thread(target=self._loop, name="vitrine-batcher", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Future:
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def run(self, item: Any, timeout: float = 30.0) -> Any:
        """The item's result. A caller alone in run() runs it in its own thread (no hand-off:
        the c=1 latency); with another caller there it joins the queue, so that concurrent
        calls form batches (inlining whenever the worker was idle split them into batches of
        1)."""
        with self._lock:
            self._callers += 1
            alone = self._callers == 1
        try:
            if not alone:
                return self.submit(item).result(timeout=timeout)
            if self.on_batch:
                self.on_batch(1)
            return self.run_batch([item])[0]
        finally:
            with self._lock:
                self._callers -= 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _collect(self, first: tuple) -> tuple[list[tuple], bool]:
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch_size:
            try:
                remaining = deadline - time.monotonic()
                entry = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if entry is None:
                return batch, True
            batch.append(entry)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            if self.on_batch:
                self.on_batch(len(batch))
            try:
                results = self.run_batch([item for item, _ in batch])
                for (_, future), result in zip(batch, results, strict=True):
                    future.set_result(result)
            except Exception as error:  # every caller of the batch sees the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
