"""Which memory ran out, told from an exception: the predicate the OOM policy (recovery.recover: step down the
batch chain, or relieve host RAM, or name /dev/shm) and tune's step probe share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from speedtrain.util import utc_now, write_atomic

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


# --- one rank ran out of memory: the group restarts together ---------------------------------------------------
# A rank cannot step down on its own: the others wait for it inside a collective (DDP's gradient all-reduce) that
# never completes. It records what ran out in the stage folder and exits; the launcher stops the other ranks, and
# when the ranks start again (speedtrain's own launch does it at once; under torchrun, --max-restarts or --resume)
# they all read the record and go on with the next batch of the chain from the last saved epoch.
FAULT_GLOB = ".oom-rank*.json"


def record_fault(stage_dir: Path, rank: int, batch: int, epoch: int, error: str) -> Path:
    """Write this rank's out-of-memory record (atomically) into the stage folder."""

    stage_dir.mkdir(parents=True, exist_ok=True)
    path = stage_dir / f".oom-rank{rank}.json"
    doc = {"rank": rank, "batch": batch, "epoch": epoch, "error": error, "at": utc_now()}
    write_atomic(path, json.dumps(doc).encode())
    return path


def faults(stage_dir: Path) -> list[dict[str, Any]]:
    """The out-of-memory records ranks left in the stage folder, in rank order."""
    found = []
    for path in sorted(stage_dir.glob(FAULT_GLOB)):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):  # a record being replaced right now: the next look sees it whole
            continue
    return found


def clear_faults(stage_dir: Path) -> None:
    for path in stage_dir.glob(FAULT_GLOB):
        path.unlink(missing_ok=True)
