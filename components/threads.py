"""The one thread-limit helper: torch's intra-op pool and every OpenMP / BLAS pool loaded in the
process (threadpoolctl finds torch's and FAISS's libgomp, numpy's and scipy's OpenBLAS).

OpenMP keeps its count per calling thread: a thread that never set it starts a team of every
core on its first parallel call. `pin_thread` sets it once per thread (the service's worker
threads); `limited_threads` bounds a block and restores the caller's counts afterwards.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from threadpoolctl import threadpool_limits

_local = threading.local()


def set_threads(threads: int) -> None:
    """From now on: torch's (process-wide) count and this thread's OpenMP / BLAS counts."""
    import torch

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)
    _local.threads = threads


def pin_thread(threads: int) -> None:
    """This thread's OpenMP count, set once per thread (cheap on every later call); 0 = leave."""
    if threads and getattr(_local, "threads", None) != threads:
        threadpool_limits(limits=threads, user_api="openmp")
        _local.threads = threads


@contextlib.contextmanager
def limited_threads(threads: int) -> Iterator[None]:
    """The block runs on `threads` threads (torch, OpenMP, BLAS); the caller's counts come
    back afterwards, also on an exception."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)
