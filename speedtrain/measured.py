"""What a stage measured, as its StageResult: the recorder's callbacks (epoch times, throughput, the time estimate,
the validation cadence, the phases), the monitor's samples, the stage folder's results.csv and weights, the part
of the stage an earlier interrupted run trained, and every rank's own figures. torch and Ultralytics' door are
imported inside functions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speedtrain import checkpoints, distributed
from speedtrain.knobs import Stage
from speedtrain.monitor import Monitor
from speedtrain.records import OomFallback, RankFigures, ResultStatus, StageResult

if TYPE_CHECKING:
    from speedtrain.ultra import Recorder


@dataclass(slots=True)
class Attempts:
    """A stage's training calls so far: the stage as it trains now (its batch, cache and workers after fallbacks),
    the checkpoint the next call goes on from, the fallbacks taken, and what the last call left."""

    current: Stage
    checkpoint: Path | None
    fallbacks: list[OomFallback]
    trainer: Any = None
    metrics: Any = None
    status: ResultStatus | None = None  # "interrupted" when a stop was asked for; None: decided from the epochs
    note: str = ""


def gather_rank_figures(
    result: StageResult, world: distributed.World, trainer: Any, gpu_ids: tuple[int, ...]
) -> tuple[RankFigures, ...]:
    """Every rank's own throughput and GPU figures, gathered (the same tuple on every rank)."""
    loader = getattr(trainer, "train_loader", None)
    sampler = getattr(loader, "sampler", None)
    shard = len(sampler) if sampler is not None and hasattr(sampler, "__len__") else 0
    shard = shard or (math.ceil(result.images_per_epoch / world.size) if result.images_per_epoch else 0)
    timed = result.train_times_s or result.epoch_times_s
    device = str(getattr(trainer, "device", None) or (f"cuda:{gpu_ids[0]}" if gpu_ids else "cpu"))
    rate = _rate(shard, timed[1:]) or _rate(shard, timed)  # steady state, like the stage's own figure
    mine = RankFigures(
        world.rank,
        distributed.host(),
        device,
        rate,
        result.gpu_util_mean,
        result.gpu_mem_peak_gb,
        shard,
        len(loader) if loader is not None else 0,
    )
    return tuple(distributed.gather(mine))


NOTHING_BEFORE = StageResult("", "completed", 0, 0, 0, 0)  # a stage with no earlier part: every figure empty


def stage_result(
    stage: Stage,
    attempts: Attempts,
    rec: Recorder,
    monitor: Monitor,
    stage_dir: Path,
    wall: float,
    previous: StageResult | None,
) -> StageResult:
    """What the stage measured: this process's callbacks, the monitor, results.csv, and the part of the stage an
    earlier (interrupted) run trained, `previous`."""
    before = previous or NOTHING_BEFORE
    epoch_times, train_times = _merged_times(rec, stage_dir, previous)
    images, iterations = rec.images or before.images_per_epoch, rec.iterations
    timed = train_times or epoch_times
    done = max([*rec.epoch_times, -1]) + 1 or len(epoch_times)
    summary = monitor.summary()
    curve_map, curve_loss, curve_epochs = checkpoints.epoch_curves(stage_dir / "results.csv")
    trainer, batch = attempts.trainer, attempts.current.batch
    status = attempts.status or _ended(stage, trainer, done, rec)
    return StageResult(
        name=stage.name,
        status=status,
        imgsz=stage.imgsz,
        batch=int(getattr(trainer, "batch_size", batch)) if trainer else batch,
        epochs_planned=stage.epochs,
        epochs_done=done,
        epoch_times_s=epoch_times,
        train_times_s=train_times,
        epoch_end_s=tuple(round(rec.ends[e], 3) for e in sorted(rec.ends)),
        images_per_epoch=images,
        iterations_per_epoch=iterations or (math.ceil(images / batch) if images else 0),
        images_per_s=_rate(images, timed),
        images_per_s_steady=_rate(images, timed[1:]),
        gpu_util_mean=summary.gpu_util_mean,
        gpu_mem_peak_gb=_peak_memory_gb(summary.gpu_mem_peak_gb),
        cpu_util_mean=summary.cpu_util_mean,
        ram_used_peak_gb=summary.ram_used_peak_gb,
        threads=rec.threads_used or before.threads,
        fast_store=rec.fast_store or before.fast_store,
        oom_fallbacks=tuple(attempts.fallbacks),
        best_metrics=_metrics(attempts.metrics),
        **_weights(stage_dir),
        save_dir=str(stage_dir),
        wall_time_s=round(wall + before.wall_time_s, 2),
        **_stopped(rec, status, done),
        epoch_map50_95=curve_map,
        epoch_loss=curve_loss,
        epoch_validated=checkpoints.validated_epochs(curve_epochs),
        phase_log=tuple(rec.phases.deadline.log) if rec.phases is not None else before.phase_log,
        **_cadence_figures(rec),
        **_estimate(rec, before),
    )


def _ended(stage: Stage, trainer: Any, done: int, rec: Recorder | None = None) -> ResultStatus:
    """A stage that trained to its end: all its epochs (with --time, as many as Ultralytics fitted, or to the
    deadline of its phases), or fewer when early stopping ended it."""
    if stage.schedule is not None:
        return (
            "completed"
            if rec is not None and rec.phases is not None and rec.phases.deadline.stopped
            else ("early-stopped")
        )
    fitted = int(getattr(trainer, "epochs", 0) or 0) if "time" in dict(stage.extra) else 0
    return "completed" if done >= (fitted or stage.epochs) else "early-stopped"


def _weights(stage_dir: Path) -> dict[str, Any]:
    best, last = stage_dir / "weights" / "best.pt", stage_dir / "weights" / "last.pt"
    return {"weights": str(best) if best.is_file() else None, "last_weights": str(last) if last.is_file() else None}


def _stopped(rec: Recorder, status: ResultStatus, done: int) -> dict[str, Any]:
    """An interrupted stage's note and the signal that stopped it."""
    if status != "interrupted":
        return {"note": rec.limit_note if status == "completed" else "", "stopped_by": None}
    by = f" by {rec.stop_signal}" if rec.stop_signal and rec.stop_signal != "SIGINT" else ""
    return {"note": f"interrupted{by} after epoch {done}; resume with --resume", "stopped_by": rec.stop_signal}


def _estimate(rec: Recorder, before: StageResult) -> dict[str, Any]:
    """The epoch-time estimate, made once in the stage's first epoch: the earlier part's, or this process's."""
    if before.estimated_epoch_s:
        return {"estimated_epoch_s": before.estimated_epoch_s, "estimated_from_batches": before.estimated_from_batches}
    return {"estimated_epoch_s": rec.estimated_epoch_s, "estimated_from_batches": rec.estimated_from}


def _cadence_figures(rec: Recorder) -> dict[str, Any]:
    """--val-every: the cadence the stage ended with, the seconds validating took and what skipping saved."""
    if rec.cadence is None:
        return {"val_every": 1, "val_time_s": 0.0, "val_saved_s": 0.0}
    cadence = rec.cadence.policy
    return {
        "val_every": cadence.cadence,
        "val_time_s": round(sum(cadence.val_s.values()), 2),
        "val_saved_s": round(cadence.saved_s(), 1),
    }


def _merged_times(
    rec: Recorder, stage_dir: Path, previous: StageResult | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-epoch times: this process's callbacks, and for earlier epochs the earlier run's (or results.csv)."""
    epochs = sorted(rec.epoch_times)
    first = epochs[0] if epochs else None
    if previous and previous.epoch_times_s:
        before_e, before_t = previous.epoch_times_s, previous.train_times_s
    else:  # killed runs left no report figures; DDP runs no callbacks here: results.csv has every epoch
        before_e = checkpoints.epoch_times_from_csv(stage_dir / "results.csv")
        before_t = ()
    n_before = first if first is not None else len(before_e)
    epoch_times = tuple(before_e[:n_before]) + tuple(round(rec.epoch_times[e], 3) for e in epochs)
    train_now = tuple(round(rec.train_times[e], 3) for e in epochs if e in rec.train_times)
    train_times = tuple(before_t[:n_before]) + train_now if len(before_t) >= n_before else train_now
    return epoch_times, train_times


def _rate(images: int, seconds: tuple[float, ...]) -> float | None:
    """Images per second over the given epochs, or None when nothing was timed."""
    total = sum(seconds)
    return round(images * len(seconds) / total, 2) if images and total > 0 else None


def _metrics(metrics: Any) -> tuple[tuple[str, float], ...]:
    """Ultralytics' 'metrics/mAP50-95(B)' keys as 'mAP50-95', from the final validation of best.pt."""
    from speedtrain import ultra

    raw = ultra.metrics_dict(metrics)
    return tuple((key.removeprefix("metrics/").removesuffix("(B)"), round(value, 5)) for key, value in raw.items())


def _peak_memory_gb(nvml_peak: float | None) -> float | None:
    """Peak memory torch reserved in this process (the training's own), else NVML's used-memory peak."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_reserved() > 0:
            return round(torch.cuda.max_memory_reserved() / 1024**3, 2)
    except Exception:  # CUDA errors after an OOM must not hide the result
        pass
    return nvml_peak
