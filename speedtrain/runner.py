"""Run a TrainPlan's stages with Ultralytics, measure them, and fall back down the batch chain on OOM.

The only module (with tune.py and pipeline.py) that imports ultralytics or torch, always inside functions.
"""

from __future__ import annotations

import csv
import gc
import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from speedtrain.errors import TrainingError, UsageError
from speedtrain.monitor import Monitor
from speedtrain.planner import Stage, TrainPlan

Log = Callable[[str], None]
OOM_MARKERS = (
    "out of memory",  # torch.OutOfMemoryError, and CPU allocators
    "CUBLAS_STATUS_ALLOC_FAILED",  # cuBLAS could not allocate its workspace
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "CUDNN_STATUS_ALLOC_FAILED",
    "unable to find an engine",  # cuDNN v9 when no algorithm fits the remaining memory
)


@dataclass(frozen=True, slots=True)
class OomFallback:
    epoch: int
    from_batch: int
    to_batch: int
    at: str
    error: str


@dataclass(frozen=True, slots=True)
class StageResult:
    name: str
    status: str  # "completed", "early-stopped", "skipped"
    imgsz: int
    batch: int  # the batch size the stage finished with
    epochs_planned: int
    epochs_done: int
    epoch_times_s: tuple[float, ...] = ()  # whole epoch: train, validation, checkpoint
    train_times_s: tuple[float, ...] = ()  # the training pass alone
    images_per_epoch: int = 0
    iterations_per_epoch: int = 0
    images_per_s: float | None = None  # training images / training-pass seconds, all epochs
    images_per_s_steady: float | None = None  # the same without the first epoch (start-up, warm caches)
    gpu_util_mean: float | None = None
    gpu_mem_peak_gb: float | None = None
    cpu_util_mean: float | None = None
    ram_used_peak_gb: float | None = None
    oom_fallbacks: tuple[OomFallback, ...] = ()
    best_metrics: tuple[tuple[str, float], ...] = ()
    weights: str | None = None
    last_weights: str | None = None
    save_dir: str | None = None
    wall_time_s: float = 0.0
    note: str = ""

    def metric(self, key: str) -> float | None:
        return dict(self.best_metrics).get(key)

    def measured(self) -> dict[str, Any]:
        """The documented `measured` block of speed_report.json."""
        data = asdict(self)
        for key in ("name", "status", "imgsz", "epochs_planned", "note"):
            data.pop(key)
        data["epoch_times_s"] = list(self.epoch_times_s)
        data["train_times_s"] = list(self.train_times_s)
        data["oom_fallbacks"] = [asdict(o) for o in self.oom_fallbacks]
        data["best_metrics"] = dict(self.best_metrics)
        return data


@dataclass(frozen=True, slots=True)
class RunResult:
    run_dir: str
    model_source: str
    model_note: str
    stages: tuple[StageResult, ...]
    started_at: str
    wall_time_s: float
    interrupted: bool = False


@dataclass(slots=True)
class _Recorder:
    """Ultralytics callbacks that time each epoch and catch batch changes."""

    starts: dict[int, float] = field(default_factory=dict)
    train_end: dict[int, float] = field(default_factory=dict)
    epoch_times: dict[int, float] = field(default_factory=dict)
    train_times: dict[int, float] = field(default_factory=dict)
    images: int = 0
    iterations: int = 0
    start_epoch: int = 0

    def attach(self, model: Any) -> None:
        model.add_callback("on_train_start", self.on_train_start)
        model.add_callback("on_train_epoch_start", self.on_train_epoch_start)
        model.add_callback("on_train_epoch_end", self.on_train_epoch_end)
        model.add_callback("on_fit_epoch_end", self.on_fit_epoch_end)

    def on_train_start(self, trainer: Any) -> None:
        self.start_epoch = trainer.start_epoch

    def on_train_epoch_start(self, trainer: Any) -> None:
        # Ultralytics halves the batch itself on a first-epoch OOM (trainer._do_train); speedtrain walks the
        # plan's own chain instead, so the batch sizes tried are the ones the plan printed.
        trainer._oom_retries = 3
        self.starts[trainer.epoch] = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any) -> None:
        now = time.perf_counter()
        self.train_end[trainer.epoch] = now
        self.train_times[trainer.epoch] = now - self.starts[trainer.epoch]
        self.images = len(trainer.train_loader.dataset)
        self.iterations = len(trainer.train_loader)

    def on_fit_epoch_end(self, trainer: Any) -> None:
        # Also fired once more by final_eval() for the last epoch; keep the first (the epoch's own).
        if trainer.epoch in self.starts and trainer.epoch not in self.epoch_times:
            self.epoch_times[trainer.epoch] = time.perf_counter() - self.starts[trainer.epoch]


def is_oom(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is an out-of-memory error from torch, cuBLAS or cuDNN."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, RuntimeError | MemoryError) and (
            isinstance(seen, MemoryError) or any(m.lower() in str(seen).lower() for m in OOM_MARKERS)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def next_batch(fallbacks: tuple[int, ...], current: int) -> int | None:
    """The next smaller batch in the plan's chain, or None when the chain is exhausted."""
    return next((b for b in fallbacks if b < current), None)


def ultralytics_defaults() -> dict[str, Any]:
    """Ultralytics' train arguments and defaults, read from its default.yaml without importing ultralytics."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        raise TrainingError("ultralytics is not installed: pip install ultralytics")
    cfg = Path(next(iter(spec.submodule_search_locations))) / "cfg" / "default.yaml"
    return yaml.safe_load(cfg.read_text(encoding="utf-8"))


def resolve_model(requested: str, online: bool | None = None) -> tuple[str, str]:
    """Return (what to pass to YOLO(), one line saying where it came from); never downloads by itself."""
    from ultralytics.utils import WEIGHTS_DIR, is_online
    from ultralytics.utils.downloads import GITHUB_ASSETS_STEMS

    path = Path(requested)
    if path.suffix.lower() in (".yaml", ".yml"):
        return requested, f"model {requested}: built from scratch (no pretrained weights)"
    stem = path.stem if path.suffix.lower() == ".pt" else path.name
    for candidate in (path.with_suffix(".pt"), WEIGHTS_DIR / f"{stem}.pt"):
        if candidate.is_file():
            return str(candidate), f"model {stem}: pretrained weights {candidate}"
    if stem not in GITHUB_ASSETS_STEMS:
        raise UsageError(f"--model {requested}: no such file, and not an Ultralytics model name")
    if online is None:
        online = is_online()
    if online:
        return f"{stem}.pt", f"model {stem}: pretrained weights, fetched by Ultralytics"
    return (
        f"{stem}.yaml",
        f"model {stem}: offline and {stem}.pt not on disk, so built from {stem}.yaml (no pretraining)",
    )


def run(
    plan: TrainPlan,
    data_yaml: str | Path,
    run_dir: str | Path,
    *,
    decide_finetune: Callable[[StageResult], bool | None] | None = None,
    log: Log = lambda _: None,
) -> RunResult:
    """Train every stage of the plan in order and return what was measured."""
    started, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    _quiet_ultralytics()
    source, note = resolve_model(plan.model)
    log(note)
    results: list[StageResult] = []
    weights = source
    for stage in plan.stages:
        skip = _skip_reason(stage, results, plan.target_map, decide_finetune)
        if skip:
            log(f"{stage.name}: skipped ({skip})")
            results.append(StageResult(stage.name, "skipped", stage.imgsz, stage.batch, stage.epochs, 0, note=skip))
            continue
        result = train_stage(stage, weights, data_yaml, Path(run_dir), log=log)
        results.append(result)
        weights = result.weights or result.last_weights or weights
    return RunResult(str(run_dir), source, note, tuple(results), started, round(time.perf_counter() - t0, 2))


def _skip_reason(
    stage: Stage,
    done: list[StageResult],
    target_map: float,
    decide: Callable[[StageResult], bool | None] | None,
) -> str:
    if stage.when == "always" or not done:
        return ""
    main = done[0]
    score = main.metric("mAP50-95")
    if stage.when == "auto":
        if score is not None and score >= target_map:
            return f"main stage mAP50-95 {score:.3f} reached the target {target_map}"
        return ""
    answer = decide(main) if decide else None
    if answer is None:
        return "not an interactive terminal; pass --finetune yes to run it"
    return "" if answer else "declined at the prompt"


def train_stage(stage: Stage, weights: str, data_yaml: str | Path, project: Path, log: Log = print) -> StageResult:
    """Train one stage, stepping down the batch chain on out-of-memory until it fits."""
    fallbacks: list[OomFallback] = []
    batch = stage.batch
    while True:
        try:
            result = _train_once(replace(stage, batch=batch), weights, data_yaml, project)
            return replace(result, oom_fallbacks=tuple(fallbacks))
        except Exception as exc:
            if not is_oom(exc):
                raise
            _free_memory()
            smaller = next_batch(stage.batch_fallbacks, batch)
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            if smaller is None:
                raise TrainingError(
                    f"{stage.name}: out of memory at batch {batch}, the smallest in the plan; "
                    f"try a smaller --img-size or model (for example --model yolo26n.yaml)"
                ) from None
            at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            fallbacks.append(OomFallback(0, batch, smaller, at, first))
            log(f"{stage.name}: out of memory at batch {batch}; retrying with batch {smaller}")
            batch = smaller


def _train_once(stage: Stage, weights: str, data_yaml: str | Path, project: Path) -> StageResult:
    from ultralytics import YOLO

    recorder = _Recorder()
    model = YOLO(weights)
    recorder.attach(model)
    gpu_ids = tuple(int(d) for d in stage.device.split(",")) if stage.device[0].isdigit() else ()
    t0 = time.perf_counter()
    _reset_peak_memory(gpu_ids)
    try:
        with Monitor(gpu_ids) as monitor:
            metrics = model.train(
                data=str(data_yaml),
                project=str(project),
                name=stage.name,
                exist_ok=True,
                **stage.train_args(),
            )
        trainer = model.trainer
        save_dir = Path(trainer.save_dir)
        return _stage_result(stage, recorder, monitor, trainer, metrics, save_dir, time.perf_counter() - t0)
    finally:
        del model
        _free_memory()


def _stage_result(
    stage: Stage, rec: _Recorder, monitor: Monitor, trainer: Any, metrics: Any, save_dir: Path, wall: float
) -> StageResult:
    epochs = sorted(rec.epoch_times)
    epoch_times = tuple(round(rec.epoch_times[e], 3) for e in epochs)
    train_times = tuple(round(rec.train_times[e], 3) for e in epochs if e in rec.train_times)
    images, iterations = rec.images, rec.iterations
    if not epochs:  # DDP trains in child processes where callbacks do not reach; read results.csv instead
        epoch_times = _epoch_times_from_csv(save_dir / "results.csv")
    timed = train_times or epoch_times
    ips, steady = _rate(images, timed), _rate(images, timed[1:])
    done = (epochs[-1] + 1) if epochs else len(epoch_times)
    summary = monitor.summary()
    best, last = Path(trainer.best), Path(trainer.last)
    return StageResult(
        name=stage.name,
        status="completed" if done >= stage.epochs else "early-stopped",
        imgsz=stage.imgsz,
        batch=int(getattr(trainer, "batch_size", stage.batch)),
        epochs_planned=stage.epochs,
        epochs_done=done,
        epoch_times_s=epoch_times,
        train_times_s=train_times,
        images_per_epoch=images,
        iterations_per_epoch=iterations or (math.ceil(images / stage.batch) if images else 0),
        images_per_s=ips,
        images_per_s_steady=steady,
        gpu_util_mean=summary.gpu_util_mean,
        gpu_mem_peak_gb=_peak_memory_gb(summary.gpu_mem_peak_gb),
        cpu_util_mean=summary.cpu_util_mean,
        ram_used_peak_gb=summary.ram_used_peak_gb,
        best_metrics=_metrics(metrics),
        weights=str(best) if best.is_file() else None,
        last_weights=str(last) if last.is_file() else None,
        save_dir=str(save_dir),
        wall_time_s=round(wall, 2),
    )


def _rate(images: int, seconds: tuple[float, ...]) -> float | None:
    """Images per second over the given epochs, or None when nothing was timed."""
    total = sum(seconds)
    return round(images * len(seconds) / total, 2) if images and total > 0 else None


def _metrics(metrics: Any) -> tuple[tuple[str, float], ...]:
    """Ultralytics' 'metrics/mAP50-95(B)' keys as 'mAP50-95', from the final validation of best.pt."""
    raw = getattr(metrics, "results_dict", None) or {}
    out = []
    for key, value in raw.items():
        short = key.removeprefix("metrics/").removesuffix("(B)")
        out.append((short, round(float(value), 5)))
    return tuple(out)


def _epoch_times_from_csv(path: Path) -> tuple[float, ...]:
    """Per-epoch seconds from the cumulative 'time' column Ultralytics writes to results.csv."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    except OSError:
        return ()
    cumulative = [float(r["time"]) for r in rows if r.get("time")]
    return tuple(round(b - a, 3) for a, b in zip([0.0, *cumulative], cumulative, strict=False))


def _quiet_ultralytics() -> None:
    """Turn off Ultralytics' usage analytics for this process without changing the user's settings file."""
    try:
        from ultralytics.utils.events import events

        events.enabled = False
    except (ImportError, AttributeError):  # older or newer Ultralytics without this singleton
        pass


def _reset_peak_memory(gpu_ids: tuple[int, ...]) -> None:
    if not gpu_ids:
        return
    import torch

    if torch.cuda.is_available():
        for i in gpu_ids:
            torch.cuda.reset_peak_memory_stats(i)


def _peak_memory_gb(nvml_peak: float | None) -> float | None:
    """Peak memory torch reserved in this process (the training's own), else NVML's used-memory peak."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_reserved() > 0:
            return round(torch.cuda.max_memory_reserved() / 1024**3, 2)
    except Exception:  # CUDA errors after an OOM must not hide the result
        pass
    return nvml_peak


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing is best effort
        pass
