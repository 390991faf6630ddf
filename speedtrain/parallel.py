"""Map a function over items in worker processes, yielding results as they finish; one process runs inline."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
Progress = Callable[[int, int], None]


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def pmap(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int | None = None,
    progress: Progress | None = None,
) -> Iterator[R]:
    """Yield fn(item) for each item in the order they finish; `progress(done, total)` after each one.

    Results come back as soon as each item is done (not in input order), so an interrupted caller has
    recorded everything that finished.
    """
    items = list(items)
    total, workers = len(items), min(workers or default_workers(), max(1, len(items)))
    if progress:
        progress(0, total)
    if workers <= 1:
        for done, item in enumerate(items, 1):
            result = fn(item)
            if progress:
                progress(done, total)
            yield result
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_start, initargs=(os.getpid(),)) as pool:
        queue = iter(items)
        running: set[Future[R]] = set()
        done = 0
        try:
            for item in queue:  # keep a few items per worker in flight, not the whole list
                running.add(pool.submit(fn, item))
                if len(running) >= workers * 4:
                    break
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    done += 1
                    if progress:
                        progress(done, total)
                    yield future.result()
                    nxt = next(queue, None)
                    if nxt is not None:
                        running.add(pool.submit(fn, nxt))
        except GeneratorExit:  # the caller stopped reading (it failed or was interrupted itself)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        except BaseException:  # Ctrl-C: start nothing new, let in-flight items finish and hand them over
            pool.shutdown(wait=True, cancel_futures=True)
            for future in running:
                if future.done() and not future.cancelled() and future.exception() is None:
                    yield future.result()
            raise


def _worker_start(parent: int) -> None:
    """Workers leave Ctrl-C to the main process, which stops the pool cleanly and keeps finished work; and they end
    with it however it ends (SIGKILL included): on Linux the kernel sends them SIGTERM when it dies (prctl's
    PR_SET_PDEATHSIG), so none is left blocked on a pipe to a process that is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for stop in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):  # not the parent's handlers: a worker just ends
        if stop is not None:
            signal.signal(stop, signal.SIG_DFL)
    _die_with_parent(parent)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl here: the pool's own shutdown still ends the workers
        return
    if os.getppid() != parent:  # the parent died before the request was in place: the signal it would have sent
        os.kill(os.getpid(), signal.SIGTERM)
