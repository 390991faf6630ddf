"""What a stage does when training fails: the recovery policy beside oom.py's classification. Out of GPU memory:
the next batch of the chain, from the last saved epoch; out of host RAM: the RAM cache to disk, then half the
workers; one rank of several: record the fault so that every rank restarts one batch smaller; /dev/shm, a full
disk, an image gone from the dataset: one line that says what to do. torch is imported inside functions."""

from __future__ import annotations

import errno
import gc
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from speedtrain import distributed, oom
from speedtrain.checkpoints import going_on_from, resume_point
from speedtrain.errors import DatasetError, DiskSpaceError, PeerFailed, RankOutOfMemory, TrainingError
from speedtrain.knobs import Stage, said
from speedtrain.records import Log, OomFallback
from speedtrain.util import first_line, utc_now, write_atomic

OOM_HISTORY = "oom_fallbacks.json"  # a multi-rank stage's fallbacks, kept in its folder across restarts


def after_rank_oom(
    stage: Stage, stage_dir: Path, world: distributed.World, log: Log
) -> tuple[Stage, list[OomFallback]]:
    """A rank's start of a stage: the fallbacks of earlier starts, and, when a rank ran out of memory in the last
    one, the next batch of the chain for every rank (all decide alike from the same records)."""
    history = [OomFallback(**f) for f in _read_list(stage_dir / OOM_HISTORY)]
    seen = oom.faults(stage_dir)
    distributed.barrier()  # every rank has read the records before rank 0 clears them
    batch = history[-1].to_batch if history else stage.batch
    if seen:
        worst = min(seen, key=lambda f: int(f["batch"]))
        smaller = oom.next_batch(stage.batch_fallbacks, int(worst["batch"]))
        if smaller is None:
            raise TrainingError(
                f"{stage.name}: rank {worst['rank']} ran out of memory at batch {worst['batch']}, the smallest in the "
                f"plan; try a smaller {said('imgsz')} or model (for example {said('model', 'yolo26n.yaml')})"
            )
        epoch = int(worst["epoch"])
        history.append(
            OomFallback(
                epoch, int(worst["batch"]), smaller, str(worst["at"]), f"rank {worst['rank']}: {worst['error']}"
            )
        )
        batch = smaller
        where = f"from the checkpoint after epoch {epoch - 1}" if epoch > 1 else "from the start"
        log(
            f"{stage.name}: rank {worst['rank']} ran out of memory in epoch {epoch} at batch {worst['batch']}; "
            f"all {world.size} ranks go on with {smaller} {where}"
        )
        if world.leader:
            write_atomic(stage_dir / OOM_HISTORY, json.dumps([asdict(f) for f in history]).encode())
            oom.clear_faults(stage_dir)
    return replace(stage, batch=batch), history


def _read_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def rank_failure(
    stage: Stage, stage_dir: Path, point: Path | None, world: distributed.World, kind: str | None, exc: BaseException
) -> TrainingError:
    """What ends a rank's training: its own out-of-memory (recorded, so that the ranks restart one batch smaller),
    a peer's (the collective this rank waited in broke), or another error."""
    if kind == "device" and oom.next_batch(stage.batch_fallbacks, stage.batch) is not None:
        epoch, _ = going_on_from(point)
        oom.record_fault(stage_dir, world.rank, stage.batch, epoch, first_line(exc))
        return RankOutOfMemory(
            f"{stage.name}: rank {world.rank} ran out of memory at batch {stage.batch} in epoch {epoch}; the ranks "
            f"restart from the last saved epoch with batch {oom.next_batch(stage.batch_fallbacks, stage.batch)}"
        )
    if kind == "device":
        return TrainingError(
            f"{stage.name}: rank {world.rank} ran out of memory at batch {stage.batch}, the smallest in the plan; "
            f"try a smaller {said('imgsz')} or model (for example {said('model', 'yolo26n.yaml')})"
        )
    peer = next((f for f in oom.faults(stage_dir) if f.get("rank") != world.rank), None)
    if peer is not None:
        return PeerFailed(f"{stage.name}: rank {world.rank} stopped: rank {peer['rank']} ran out of memory")
    return TrainingError(f"{stage.name}: rank {world.rank} failed: {first_line(exc)}")


def step_down(stage: Stage, point: Path | None, batch: int, exc: BaseException, log: Log) -> tuple[int, OomFallback]:
    """The OOM policy: free memory, take the next batch of the chain, go on from the last saved epoch."""
    free_memory()
    smaller = oom.next_batch(stage.batch_fallbacks, batch)
    if smaller is None:
        raise TrainingError(
            f"{stage.name}: out of memory at batch {batch}, the smallest in the plan; "
            f"try a smaller {said('imgsz')} or model (for example {said('model', 'yolo26n.yaml')})"
        ) from None
    epoch, where = going_on_from(point)
    log(f"{stage.name}: out of memory in epoch {epoch} at batch {batch}; going on with {smaller} {where}")
    return smaller, OomFallback(epoch, batch, smaller, utc_now(), first_line(exc))


def relieve_host_memory(stage: Stage, point: Path | None, exc: BaseException, log: Log) -> tuple[Stage, OomFallback]:
    """Host RAM ran out on a GPU run: drop the RAM cache to disk, else halve the workers; the batch stays."""
    free_memory()
    if stage.cache == "ram":
        smaller, change = replace(stage, cache="disk"), "cache ram -> disk"
    elif stage.workers > 0:
        smaller, change = replace(stage, workers=stage.workers // 2), f"workers {stage.workers} -> {stage.workers // 2}"
    else:
        raise TrainingError(
            f"{stage.name}: host RAM ran out with no RAM cache and no dataloader workers ({first_line(exc)}); "
            "close other programs or train on a machine with more memory"
        ) from None
    epoch, where = going_on_from(point)
    log(f"{stage.name}: host RAM ran out in epoch {epoch} ({first_line(exc)}); going on with {change} {where}")
    return smaller, OomFallback(epoch, stage.batch, stage.batch, utc_now(), first_line(exc), kind="host", change=change)


def shm_exhausted(stage: Stage, exc: BaseException) -> TrainingError:
    return TrainingError(
        f"{stage.name}: a dataloader worker ran out of shared memory in /dev/shm ({first_line(exc)}); in Docker "
        f"start the container with a larger --shm-size (for example docker run --shm-size=8g), or train with "
        f"fewer workers ({said('workers', stage.workers // 2)}); go on with {said('resume')}"
    )


def validate_again(
    stage: Stage, stage_dir: Path, data_yaml: str | Path, exc: BaseException, log: Log
) -> tuple[Any, str]:
    """Ultralytics' final validation of best.pt ran out of memory after training finished: the weights are saved,
    so validate them again with smaller validation batches (Ultralytics validates at twice the training batch)."""
    from speedtrain import ultra

    best = stage_dir / "weights" / "best.pt"
    if not best.is_file():
        best = stage_dir / "weights" / "last.pt"
    batch = max(1, stage.batch)
    while True:
        free_memory()
        log(f"{stage.name}: the final validation ran out of memory; validating {best.name} again at batch {batch}")
        try:
            metrics = ultra.validate(
                best,
                data_yaml,
                batch=batch,
                imgsz=stage.imgsz,
                device=stage.device,
                plots=False,
                verbose=False,
                project=str(stage_dir),
                name="final-val",
                exist_ok=True,
            )
            note = f"the final validation ran out of memory ({first_line(exc)}); validated again at batch {batch}"
            return metrics, note
        except Exception as again:
            if oom.memory_kind(again, stage.on_gpu) != "device" or batch == 1:
                raise TrainingError(
                    f"{stage.name}: training finished and {best} is saved, but validating it ran out of memory "
                    f"down to batch {batch}: validate it later with `yolo val model={best} batch=1`"
                ) from None
            batch = max(1, batch // 2)


def disk_full(stage_name: str, stage_dir: Path, point: Path | None, exc: OSError) -> DiskSpaceError:
    where = (
        f"the last complete checkpoint is {point}"
        if point is not None
        else "no epoch of this stage was saved yet, so it starts again"
    )
    return DiskSpaceError(
        f"{stage_name}: the disk filled up while training ({exc.filename or stage_dir}); free some space "
        f"and go on with {said('resume')} ({where})"
    )


def image_gone(exc: BaseException) -> str | None:
    """The image Ultralytics' loader could not find (FileNotFoundError "Image Not Found PATH", data/base.py
    load_image; from a DataLoader worker too, whose message quotes the original), as the user knows it: the
    dataset's own file, not its link in the view. None for any other error."""
    found = re.search(r"Image Not Found (\S+)", str(exc)) if isinstance(exc, FileNotFoundError) else None
    if found is None:
        return None
    path = Path(found.group(1))
    return os.readlink(path) if path.is_symlink() else str(path)


def dataset_changed(stage_name: str, point: Path | None, image: str) -> DatasetError:
    kept = (
        f"the epochs saved so far are kept ({point})" if point is not None else "no epoch of this stage was saved yet"
    )
    return DatasetError(
        f"{stage_name}: {image} disappeared while training (the dataset was moved or deleted?); {kept}: put it "
        f"back and go on with {said('resume')}"
    )


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing is best effort
        pass


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a stage does after a failure it survives: train again as `stage` from `checkpoint` (None: from the
    start) with the `fallback` recorded, or, when only the final validation of best.pt ran out of memory, keep the
    `metrics` of validating it again."""

    stage: Stage | None = None
    fallback: OomFallback | None = None
    checkpoint: Path | None = None
    metrics: Any = None
    note: str = ""


def recover(
    exc: Exception,
    stage: Stage,
    current: Stage,
    stage_dir: Path,
    data_yaml: str | Path,
    world: distributed.World | None,
    on_gpu: bool,
    in_final_eval: bool,
    log: Log,
) -> Recovery:
    """The recovery ladder for a failed training call of `stage` (running as `current`): the step that goes on, or
    the one-line error that ends the stage (raised). The stage's resume point is looked up once, here."""
    point = resume_point(stage_dir)
    if isinstance(exc, OSError):
        if (gone := image_gone(exc)) is not None:
            raise dataset_changed(stage.name, point, gone) from None
        if exc.errno != errno.ENOSPC:
            raise exc
        raise disk_full(stage.name, stage_dir, point, exc) from None
    kind = oom.memory_kind(exc, on_gpu=on_gpu)
    if world is not None:
        raise rank_failure(current, stage_dir, point, world, kind, exc) from None
    if kind is None:
        raise exc
    if kind == "shm":
        raise shm_exhausted(current, exc) from None
    if kind == "device" and in_final_eval:
        metrics, note = validate_again(current, stage_dir, data_yaml, exc, log)
        return Recovery(metrics=metrics, note=note)
    if kind == "host":
        smaller, fallback = relieve_host_memory(current, point, exc, log)
        return Recovery(smaller, fallback, point)
    batch, fallback = step_down(stage, point, current.batch, exc, log)
    return Recovery(replace(current, batch=batch), fallback, point)
