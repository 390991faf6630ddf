"""Ctrl-C and SIGTERM (a scheduler's preemption: SLURM, Kubernetes) during a stage: the first asks the stage to stop
after its epoch is saved (every rank after the same one), a second stops at once, and one before the first epoch
stops at once too, since there is nothing to save yet. The stage's recorder carries the request to Ultralytics'
callbacks, which raise it where the checkpoint is safe."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from speedtrain.errors import Terminated
from speedtrain.knobs import said
from speedtrain.records import Log

if TYPE_CHECKING:
    from speedtrain.ultra import Recorder

RELAY_S = 2.0  # a second signal this soon after the first is the same request relayed, not a second Ctrl-C
GRACEFUL_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)


@contextlib.contextmanager
def graceful_stop(recorder: Recorder, log: Log) -> Iterator[None]:
    """First Ctrl-C or SIGTERM (a scheduler's preemption: SLURM, Kubernetes): finish the epoch, save, stop, so a
    requeued job goes on with --resume and loses at most the epoch that was running. A second one: stop now.

    On a rank, every rank stops after the same epoch (the recorder's collective)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()
    first = [0.0]  # when the first signal came

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            # A forked DataLoader worker inherits this handler, and a terminal's Ctrl-C (or SLURM's SIGTERM to the
            # job step) reaches every process: the worker ignores it and keeps feeding the epoch being finished.
            return
        if recorder.stop_requested and time.monotonic() - first[0] < RELAY_S:
            return  # the same stop passed on by a launcher (torchrun, srun) right after the scheduler's own
        if recorder.stop_requested:
            for sig, before in previous.items():
                signal.signal(sig, before)
            raise KeyboardInterrupt
        if not recorder.starts and not recorder.collective:
            # before the first epoch (a label scan, a cache filling, Ultralytics' setup: minutes on a large
            # dataset) there is no epoch to save: stop now rather than after the scan, the cache and a whole epoch
            for sig, before in previous.items():
                signal.signal(sig, before)
            name = signal.Signals(signum).name
            log(
                f"{'Ctrl-C' if signum == signal.SIGINT else name} before the first epoch: stopping now (nothing "
                f"was trained; the run starts this stage again with {said('resume')})"
            )
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()
        recorder.stop_requested = True
        recorder.stop_signal = signal.Signals(signum).name
        first[0] = time.monotonic()
        if signum == signal.SIGINT:
            log("Ctrl-C: stopping after this epoch is saved; press Ctrl-C again to stop at once (loses this epoch)")
        else:
            log(f"{recorder.stop_signal} (preempted?): stopping after this epoch is saved; go on with {said('resume')}")

    previous = {sig: signal.signal(sig, handler) for sig in GRACEFUL_SIGNALS}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
