"""What a trained stage's weights score and how fast they run: mAP50-95 by Ultralytics' validator at the sizes the
report compares (the stage's own, Ultralytics' 640, the next stage's), and inference latency on the training device.
Figures for the report: a failure is said and left out, never the reason a finished stage fails. Ultralytics is
reached through speedtrain.ultra, imported inside functions."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import psutil

from speedtrain import recovery
from speedtrain.knobs import ULTRALYTICS_IMGSZ, Stage, TrainPlan
from speedtrain.records import Log, StageResult
from speedtrain.util import first_line, torch_threads_restored

LATENCY_SIZE = ULTRALYTICS_IMGSZ  # besides the stage's own size: what an untuned model would run at


def score_sizes(plan: TrainPlan, stage: Stage) -> tuple[int, ...]:
    """Sizes a finished stage's weights are validated at besides its own: 640 (Ultralytics' default, where an
    untuned model is used) and the size of a stage that follows it (the fine-tune decides by it)."""
    later = [s.imgsz for s in plan.stages[plan.stages.index(stage) + 1 :]] if stage in plan.stages else []
    return tuple(sorted({LATENCY_SIZE, *later} - {stage.imgsz}))


def validate_at(
    weights: str | Path, data_yaml: str | Path, imgsz: int, stage: Stage, project: Path
) -> tuple[float, float]:
    """(mAP50, mAP50-95) of `weights` by Ultralytics' validator at `imgsz` on the dataset's val split, the way every
    speedtrain figure at another size is measured (batch of the stage, first device of the stage)."""
    from speedtrain import ultra

    raw = ultra.validate(
        weights,
        data_yaml,
        imgsz=imgsz,
        batch=max(1, stage.batch // max(1, len(stage.gpu_ids))),
        device=stage.device.split(",")[0],
        plots=False,
        verbose=False,
        project=str(project),
        name=f"{Path(weights).stem}-{imgsz}",
        exist_ok=True,
    )
    metrics = ultra.metrics_dict(raw)
    return round(metrics.get("metrics/mAP50(B)", 0.0), 5), round(metrics.get("metrics/mAP50-95(B)", 0.0), 5)


def with_scores(
    result: StageResult, stage: Stage, data_yaml: str | Path, sizes: tuple[int, ...], log_file: Path | None, log: Log
) -> StageResult:
    """The result with its final weights' mAP50-95 at its own size (Ultralytics' final validation) and validated
    at each of `sizes`; a failed validation is said and left out."""
    from speedtrain import ultra

    weights = result.weights or result.last_weights
    own = result.metric("mAP50-95")
    scores = [(stage.imgsz, own)] if own is not None else []
    if not weights:
        return replace(result, scores=tuple(scores))
    threads = stage.threads or (None if stage.on_gpu else psutil.cpu_count(logical=False) or 1)
    for size in sizes:
        log(f"{stage.name}: validating its best weights at {size} px")
        try:
            with ultra.output_to(log_file), torch_threads_restored(threads):
                scores.append(
                    (size, validate_at(weights, data_yaml, size, stage, Path(weights).parents[1] / "eval")[1])
                )
        except Exception as exc:  # a figure for the report: never the reason a finished stage fails
            log(f"{stage.name}: could not validate at {size} px ({first_line(exc)})")
        finally:
            recovery.free_memory()
    return replace(result, scores=tuple(sorted(scores)))


LATENCY_RUNS = {"gpu": 50, "cpu": 20}


def with_latency(result: StageResult, stage: Stage, log: Log) -> StageResult:
    """The result with its trained model's inference latency measured on the training device (batch 1, median),
    at the stage's size and at 640; unchanged when there are no weights or the measurement fails.

    On a CPU the thread count is fixed (the stage's, else one per physical core) so that models trained with
    different settings are timed alike: Ultralytics' validator leaves torch at min(8, cores - 1) threads."""
    from speedtrain import ultra

    weights = result.weights or result.last_weights
    if not weights:
        return result
    runs = LATENCY_RUNS["gpu" if stage.on_gpu else "cpu"]
    device = stage.device.split(",")[0]
    threads = stage.threads or psutil.cpu_count(logical=False) or 1
    try:
        with torch_threads_restored(threads):
            measured = tuple(
                (size, ultra.latency_ms(weights, size, device, runs)) for size in sorted({stage.imgsz, LATENCY_SIZE})
            )
    except Exception as exc:  # a convenience figure: never the reason a finished stage fails
        log(f"{stage.name}: could not measure inference latency ({first_line(exc)})")
        return result
    finally:
        recovery.free_memory()
    return replace(result, latency_ms=measured)
