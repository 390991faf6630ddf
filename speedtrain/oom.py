"""Which memory ran out, told from an exception: the predicate the OOM policy (runner.train_stage: step down the
batch chain, or relieve host RAM, or name /dev/shm) and tune's step probe share."""

from __future__ import annotations

from typing import Literal

MemoryKind = Literal["device", "host", "shm"]
OOM_MARKERS = (
    "out of memory",  # torch.OutOfMemoryError, and CPU allocators
    "CUBLAS_STATUS_ALLOC_FAILED",  # cuBLAS could not allocate its workspace
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "CUDNN_STATUS_ALLOC_FAILED",
    "unable to find an engine",  # cuDNN v9 when no algorithm fits the remaining memory
    # cuDNN's catch-all when it cannot allocate its workspace; Ultralytics' own OOM retry counts it as memory too
    # (engine/trainer.py, 8.4.190)
    "CUDNN_STATUS_INTERNAL_ERROR",
)
# torch's words for a DataLoader worker killed by SIGBUS, which is what a full /dev/shm does to it
SHM_MARKERS = ("is killed by signal: Bus error", "out of shared memory", "insufficient shared memory")


def memory_kind(exc: BaseException, on_gpu: bool) -> MemoryKind | None:
    """Which memory ran out, from `exc` or what caused it: "device" (the training device's: a smaller batch
    helps), "host" (RAM on a GPU run: a smaller cache or fewer workers help, not the batch), "shm" (/dev/shm,
    where DataLoader workers hand batches over), or None for anything else.

    On CPU the batch lives in host RAM, so a MemoryError there is "device". Messages are torch's own:
    torch/utils/data/dataloader.py and _utils/signal_handling.py (2.x) for dead workers; ExceptionWrapper re-raises
    a worker's MemoryError in the main process as "Caught MemoryError in DataLoader worker process N".
    """
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, RuntimeError) and any(m in text for m in SHM_MARKERS):
            return "shm"
        if isinstance(seen, RuntimeError) and "is killed by signal: Killed" in text:  # the kernel's OOM killer
            return "host"
        if isinstance(seen, MemoryError):
            return "host" if on_gpu or "DataLoader worker" in text else "device"
        if isinstance(seen, RuntimeError) and any(m.lower() in text.lower() for m in OOM_MARKERS):
            return "device"
        seen = seen.__cause__ or seen.__context__
    return None


def is_oom(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is an out-of-memory error from torch, cuBLAS or cuDNN (or, for CPU
    training, host RAM): the kind a smaller batch helps."""
    return memory_kind(exc, on_gpu=False) == "device"


def next_batch(fallbacks: tuple[int, ...], current: int) -> int | None:
    """The next smaller batch in the plan's chain, or None when the chain is exhausted."""
    return next((b for b in fallbacks if b < current), None)
