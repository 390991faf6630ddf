"""Run a TrainPlan's stages with Ultralytics, measure them, survive OOM and Ctrl-C, and resume.

Ultralytics is reached through speedtrain.ultra only; torch is imported inside functions.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import gc
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from speedtrain import distributed, oom
from speedtrain.errors import DatasetError, DiskSpaceError, PeerFailed, RankOutOfMemory, TrainingError, UsageError
from speedtrain.monitor import Monitor
from speedtrain.planner import FINETUNE_LAG, Stage, TrainPlan
from speedtrain.records import (
    FINISHED,
    OnProgress,
    OomFallback,
    RankFigures,
    ResultStatus,
    RunResult,
    StageProgress,
    StageResult,
)
from speedtrain.util import duration, first_line, utc_now

Log = Callable[[str], None]
RESUME_NAME = "resume.pt"  # an atomic copy of each saved last.pt: Ultralytics writes last.pt in place and strips it


class StopRequested(Exception):  # noqa: N818 -- a request, not an error
    """Raised from a callback after the epoch's checkpoint is safe, to stop before Ultralytics strips it."""


BASELINE_IMGSZ = 640  # Ultralytics' default image size: the untuned baseline the time estimate is set against
ETA_BATCHES = 8  # the time estimate waits for this many batches of the first epoch (or a tenth of it, if more)


@dataclass(slots=True)
class _Recorder:
    """Ultralytics callbacks: time each epoch, keep a resumable checkpoint, honour a stop request."""

    starts: dict[int, float] = field(default_factory=dict)
    epoch_times: dict[int, float] = field(default_factory=dict)
    train_times: dict[int, float] = field(default_factory=dict)
    images: int = 0
    iterations: int = 0
    stop_requested: bool = False
    stop_signal: str | None = None  # "SIGINT" or "SIGTERM": what asked for the stop
    collective: bool = False  # one rank of several: every rank stops after the same epoch
    in_final_eval: bool = False  # Ultralytics' validation of best.pt after the last epoch has begun
    threads: int | None = None  # the plan's torch threads; None leaves Ultralytics' setting
    threads_used: int | None = None
    fast_store: str | None = None
    stage: str = ""
    on_update: OnProgress | None = None
    batches: int = 0
    last_rate: float | None = None
    last_map: float | None = None
    t0: float = field(default_factory=time.perf_counter)  # the stage's start: setup and retries count
    ends: dict[int, float] = field(default_factory=dict)  # epoch -> seconds since t0 when it was saved
    cadence: Any = None  # ultra.ValCadence when the stage does not validate every epoch (--val-every)
    log: Log | None = None  # where the time estimates go
    estimated_epoch_s: float | None = None
    estimated_from: int = 0
    baseline_factor: float = 0.0  # (640 / imgsz)^2 for a stage trained below Ultralytics' 640: the baseline's estimate
    later: tuple[tuple[str, int, float, bool], ...] = ()  # stages after this one: name, epochs, pixels ratio, maybe
    _first_batch_end: float = 0.0

    def callbacks(self) -> dict[str, list[Callable[[Any], None]]]:
        """Ultralytics callback events and what runs on each."""
        # Ultralytics' select_device() sets torch's threads for CPU training (min(8, cores - 1)) in the trainer's
        # __init__ and again when final_eval validates best.pt; the thread callbacks run right after each.
        events: dict[str, list[Callable[[Any], None]]] = {
            "on_pretrain_routine_start": [self.apply_threads],
            "on_val_start": [self.apply_threads, self.on_val_start],
            "on_train_epoch_start": [self.on_train_epoch_start],
            "on_train_epoch_end": [self.on_train_epoch_end],
            "on_model_save": [self.on_model_save],
            "on_fit_epoch_end": [self.on_fit_epoch_end],
        }
        if self.on_update or self.log:
            events["on_train_batch_end"] = [self.on_train_batch_end]
        if self.cadence is not None:
            for event, functions in self.cadence.callbacks().items():
                events.setdefault(event, []).extend(functions)
        return events

    def on_train_epoch_start(self, trainer: Any) -> None:
        self.starts[trainer.epoch] = time.perf_counter()
        self.batches = 0

    def on_train_batch_end(self, trainer: Any) -> None:
        self.batches += 1
        self._update(trainer, min(1.0, self.batches / max(1, len(trainer.train_loader))))
        if self.log and self.estimated_epoch_s is None:
            self._estimate(trainer)

    def _estimate(self, trainer: Any) -> None:
        """After the first batches of the stage's first epoch in this process: the training passes' time, from the
        steady time a batch (the first batch, which starts the loader and warms up, counted once per epoch)."""
        log, now, total = self.log, time.perf_counter(), len(trainer.train_loader)
        if log is None:
            return
        if self.batches == 1:
            self._first_batch_end = now
            return
        if self.batches < min(total, max(ETA_BATCHES, total // 10)):
            return
        first = self._first_batch_end - self.starts[trainer.epoch]
        per_batch = (now - self._first_batch_end) / (self.batches - 1)
        epoch_s = first + per_batch * (total - 1)
        epochs = max(1, trainer.epochs - trainer.epoch)
        self.estimated_epoch_s, self.estimated_from = round(epoch_s, 2), self.batches
        budget = float(getattr(trainer.args, "time", None) or 0) * 3600  # --time: Ultralytics fits the epochs
        if budget:
            log(
                f"{self.stage}: about {max(1, int(budget // epoch_s))} epochs' training passes fit its "
                f"{duration(budget)} ({epoch_s:.1f} s each; estimate from the first {self.batches} batches, "
                "validation not included)"
            )
            return
        baseline = (f"; at Ultralytics' 640 px about {duration(epoch_s * epochs * self.baseline_factor)} "
                    "(estimate: time ~ pixels)" if self.baseline_factor else "")  # fmt: skip
        for name, n, ratio, maybe in self.later:  # the whole run: later stages at their own image size
            baseline += (f"; then {name}{' (if it runs)' if maybe else ''} about {duration(epoch_s * ratio * n)} "
                         f"for {n} epochs (estimate: time ~ pixels)")  # fmt: skip
        log(
            f"{self.stage}: about {duration(epoch_s * epochs)} for {epochs} epochs' training passes "
            f"({epoch_s:.1f} s each; estimate from the first {self.batches} batches, validation not "
            f"included){baseline}"
        )

    def _update(self, trainer: Any, fraction: float, done: bool = False) -> None:
        if self.on_update:
            self.on_update(
                StageProgress(
                    self.stage,
                    trainer.epoch,
                    max(trainer.epochs, trainer.epoch + 1),
                    fraction,
                    self.last_rate,
                    self.last_map,
                    done,
                    self.batches,
                    len(trainer.train_loader) if getattr(trainer, "train_loader", None) is not None else 0,
                )
            )

    def on_val_start(self, validator: Any) -> None:
        # The per-epoch validation runs with the trainer (validator.training); final_eval() validates best.pt alone.
        self.in_final_eval = not validator.training

    def apply_threads(self, _trainer_or_validator: Any) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    def on_train_epoch_end(self, trainer: Any) -> None:
        import torch

        self.threads_used = torch.get_num_threads()
        resident = getattr(trainer, "fast_resident", None)
        self.fast_store = None if resident is None else "ram" if resident else "memmap"
        self.train_times[trainer.epoch] = time.perf_counter() - self.starts[trainer.epoch]
        self.images = len(trainer.train_loader.dataset)
        self.iterations = len(trainer.train_loader)
        seconds = self.train_times[trainer.epoch]
        self.last_rate = round(self.images / seconds, 1) if seconds > 0 else None

    def on_model_save(self, trainer: Any) -> None:
        # last.pt is written in place (a kill mid-write corrupts it) and stripped of its optimizer by final_eval();
        # resume.pt is an atomic copy that always holds the last complete, resumable epoch.
        last = Path(trainer.last)
        tmp = last.with_name(f".{RESUME_NAME}.tmp")
        shutil.copyfile(last, tmp)
        os.replace(tmp, last.with_name(RESUME_NAME))

    def on_fit_epoch_end(self, trainer: Any) -> None:
        # Also fired once more by final_eval() for the last epoch; keep the first (the epoch's own).
        if trainer.epoch in self.starts and trainer.epoch not in self.epoch_times:
            self.epoch_times[trainer.epoch] = time.perf_counter() - self.starts[trainer.epoch]
            self.ends[trainer.epoch] = time.perf_counter() - self.t0
            score = (getattr(trainer, "metrics", None) or {}).get("metrics/mAP50-95(B)")
            if score is not None and math.isfinite(score):  # NaN: an epoch --val-every did not validate
                self.last_map = round(float(score), 4)
            self._update(trainer, 1.0, done=True)
            # Ranks agree (one all-reduce per epoch) so that all stop after the same saved epoch, whichever got
            # the signal: a rank that went on alone would wait forever in the next epoch's first collective.
            # Rank 0 alone knows whether Ultralytics stops here anyway (last epoch, early stopping): it tells the
            # others after this callback, so its word is gathered too.
            finishing = bool(trainer.stop)
            if self.collective:
                states = distributed.gather((self.stop_signal if self.stop_requested else None, finishing))
                signals = [sig for sig, _ in states if sig]
                if signals and not self.stop_requested:  # the signal reached other ranks only
                    self.stop_requested, self.stop_signal = True, signals[0]
                finishing = states[0][1]
            if self.stop_requested and not finishing:
                raise StopRequested(f"stopped after epoch {trainer.epoch + 1}")


def check_model(requested: str | None) -> None:
    """Refuse a --model file that cannot be a YOLO model, with what was found, before any work (no import)."""
    if not requested:
        return
    path = Path(requested)
    if not path.exists():
        return  # a model name (yolo26n, yolo11s.yaml) that Ultralytics resolves; resolve_model checks it
    if path.is_dir():
        raise UsageError(f"--model {requested}: a folder; expected a .pt checkpoint or a model .yaml file")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        with path.open("rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip, or a legacy pickle
            found = "an empty file" if not head else "text" if head.isascii() else f"bytes {head.hex()}"
            raise UsageError(f"--model {requested}: not a PyTorch checkpoint (found {found}); expected a YOLO .pt")
    elif suffix in (".yaml", ".yml"):
        from speedtrain.dataset import load_yaml

        try:
            cfg = load_yaml(path)
        except DatasetError as exc:
            raise UsageError(f"--model {exc}") from None
        if not isinstance(cfg, dict) or not {"backbone", "head"} <= set(cfg):
            raise UsageError(f"--model {requested}: not a YOLO model yaml (no backbone: and head: sections)")
    else:
        raise UsageError(
            f"--model {requested}: a {suffix or 'suffix-less'} file; expected a .pt checkpoint or a model .yaml"
        )


def run(
    plan: TrainPlan,
    data_yaml: str | Path,
    run_dir: str | Path,
    *,
    previous: tuple[StageResult, ...] = (),
    decide_finetune: Callable[[StageResult], bool | None] | None = None,
    before_stage: Callable[[Stage], Stage] = lambda s: s,
    on_progress: Callable[[tuple[StageResult, ...], str | None], None] = lambda _r, _s: None,
    on_update: OnProgress | None = None,
    log_file: Path | None = None,
    log: Log = lambda _: None,
    resuming: bool = False,
) -> RunResult:
    """Train the plan's stages in order (finished ones from `previous` are kept) and return what was measured.
    `resuming`: a run going on after an interruption or a kill; a stage goes on from its last checkpoint.

    `on_progress(results, running_stage)` is called before each stage and after it, so the caller can keep a
    report on disk that a later --resume reads.
    """
    started, t0 = utc_now(), time.perf_counter()
    from speedtrain import ultra

    with ultra.session():
        return _run(plan, data_yaml, run_dir, started, t0, previous, decide_finetune, before_stage, on_progress,
                    on_update, log_file, log, resuming)  # fmt: skip


def _run(
    plan: TrainPlan,
    data_yaml: str | Path,
    run_dir: str | Path,
    started: str,
    t0: float,
    previous: tuple[StageResult, ...],
    decide_finetune: Callable[[StageResult], bool | None] | None,
    before_stage: Callable[[Stage], Stage],
    on_progress: Callable[[tuple[StageResult, ...], str | None], None],
    on_update: OnProgress | None,
    log_file: Path | None,
    log: Log,
    resuming: bool = False,
) -> RunResult:
    from speedtrain import ultra

    source, note = ultra.fetch(*ultra.resolve_model(plan.model))
    ultra.check_loads(source)
    ultra.go_offline()
    log(note)
    earlier = {r.name: r for r in previous}
    results: list[StageResult] = []
    weights = source
    for index, stage in enumerate(plan.stages):
        prior = earlier.get(stage.name)
        if prior and prior.status in FINISHED:
            results.append(prior)
        else:
            skip = _skip_reason(stage, results, plan.target_map, decide_finetune)
            if skip:
                log(f"{stage.name}: skipped ({skip})")
                results.append(StageResult(stage.name, "skipped", stage.imgsz, stage.batch, stage.epochs, 0, note=skip))
                continue
            stage = before_stage(stage)
            on_progress(tuple(results), stage.name)
            result = train_stage(
                stage, weights, data_yaml, Path(run_dir), log=log, previous=prior, on_update=on_update,
                log_file=log_file, resuming=resuming, later=plan.stages[index + 1 :],
            )  # fmt: skip
            world = distributed.world()
            if result.status != "interrupted":
                # Ultralytics' validator gathers from every rank when ranks exist (detect/val.py gather_stats,
                # 8.4.190): with several, rank 0 cannot validate alone, and the fine-tune runs whatever the score
                sizes = _score_sizes(plan, stage) if world is None or world.size == 1 else ()
                if world is None or world.leader:  # rank 0's model: rank 0 times it
                    result = with_latency(result, stage, log)
                result = with_scores(result, stage, data_yaml, sizes, log_file, log)
            results.append(result)
            on_progress(tuple(results), None)
            if result.status == "interrupted":
                wall = round(time.perf_counter() - t0, 2)
                return RunResult(str(run_dir), source, note, tuple(results), started, wall, interrupted=True,
                                 stopped_by=result.stopped_by)  # fmt: skip
        weights = results[-1].weights or results[-1].last_weights or weights
    return RunResult(str(run_dir), source, note, tuple(results), started, round(time.perf_counter() - t0, 2))


LATENCY_SIZE = 640  # besides the stage's own size: Ultralytics' default, what an untuned model would run at


def _score_sizes(plan: TrainPlan, stage: Stage) -> tuple[int, ...]:
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

    raw = ultra.validate(weights, data_yaml, imgsz=imgsz, batch=max(1, stage.batch // max(1, len(stage.gpu_ids))),
                         device=stage.device.split(",")[0], plots=False, verbose=False, project=str(project),
                         name=f"{Path(weights).stem}-{imgsz}", exist_ok=True)  # fmt: skip
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
            _free_memory()
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
            measured = tuple((size, ultra.latency_ms(weights, size, device, runs)) for size in
                             sorted({stage.imgsz, LATENCY_SIZE}))  # fmt: skip
    except Exception as exc:  # a convenience figure: never the reason a finished stage fails
        log(f"{stage.name}: could not measure inference latency ({first_line(exc)})")
        return result
    finally:
        _free_memory()
    return replace(result, latency_ms=measured)


def _skip_reason(
    stage: Stage,
    done: list[StageResult],
    target_map: float | None,
    decide: Callable[[StageResult], bool | None] | None,
) -> str:
    if stage.when == "always" or not done:
        return ""
    main = done[0]
    if stage.when == "auto":
        return finetune_skip_reason(main, stage.imgsz, target_map)
    answer = decide(main) if decide else None
    if answer is None:  # nobody to ask: decided as auto decides
        why = finetune_skip_reason(main, stage.imgsz, target_map)
        return f"not asked (no interactive terminal) and, as auto decides, {why}" if why else ""
    return "" if answer else "declined at the prompt"


def finetune_skip_reason(main: StageResult, imgsz: int, target_map: float | None) -> str:
    """--finetune auto: why the fine-tune at `imgsz` is not needed, or "" when it runs.

    It runs when the main stage's best weights lose accuracy at the larger size: their mAP50-95 there is more than
    FINETUNE_LAG (relative) under their mAP50-95 at their own size. When either is unknown it runs."""
    own, there = main.score_at(main.imgsz), main.score_at(imgsz)
    if own is None or there is None:
        return ""
    if target_map is not None and there >= target_map:
        return f"main stage mAP50-95 at {imgsz} px is {there:.3f}, at or above --target-map {target_map}"
    if own <= 0 and there <= 0:
        return f"the main stage's weights score 0 mAP50-95 at {main.imgsz} and at {imgsz} px: nothing to refine yet"
    if there >= own * (1 - FINETUNE_LAG):
        return (
            f"the main stage's weights score {there:.3f} mAP50-95 at {imgsz} px against {own:.3f} at "
            f"{main.imgsz}: they already carry over (a fine-tune runs when they lose over {FINETUNE_LAG:.0%})"
        )
    return ""


def train_stage(
    stage: Stage,
    weights: str,
    data_yaml: str | Path,
    project: Path,
    log: Log = print,
    previous: StageResult | None = None,
    on_update: OnProgress | None = None,
    log_file: Path | None = None,
    resuming: bool = False,
    later: tuple[Stage, ...] = (),
) -> StageResult:
    """Train one stage; on out-of-memory step down the batch chain and go on from the last checkpoint.
    `later`: the plan's stages after this one, for the time estimate of the whole run.

    With `previous` (an interrupted stage of an earlier run), training resumes from that stage's checkpoint.
    `on_update` receives the stage's progress after every batch; with `log_file`, Ultralytics' own output (its
    argument dump, layer table, progress bars) goes to that file instead of the console.
    """
    from speedtrain import ultra

    stage_dir = project / stage.name
    # A stage an earlier run was interrupted in, or was killed in (`resuming`, and no result in its report), goes on
    # from its last complete checkpoint; a folder reused by a fresh run (tune's trial runs) starts over.
    checkpoint = resume_point(stage_dir) if previous or resuming else None
    if previous or resuming:
        finished = _finished_before(stage, stage_dir, checkpoint, previous)
        if finished is not None:
            log(f"{stage.name}: {finished.note}")
            return finished
    if previous and checkpoint is None:
        log(f"{stage.name}: no checkpoint of an earlier epoch; starting the stage again")
    world = distributed.world()
    recorder = _Recorder(threads=stage.threads, stage=stage.name, on_update=on_update, collective=world is not None,
                         log=log if world is None or world.leader else None)  # fmt: skip
    if stage.imgsz < BASELINE_IMGSZ:
        recorder.baseline_factor = (BASELINE_IMGSZ / stage.imgsz) ** 2
    recorder.later = tuple((s.name, s.epochs, (s.imgsz / stage.imgsz) ** 2, s.when != "always") for s in later)
    if stage.val_every != 1:
        recorder.cadence = ultra.ValCadence(every=stage.val_every, patience=stage.patience)
    fallbacks: list[OomFallback] = list(previous.oom_fallbacks) if previous else []
    current = replace(stage, batch=previous.batch if previous and checkpoint else stage.batch)
    gpu_ids = stage.gpu_ids
    if world is not None:
        current, fallbacks = _after_rank_oom(current, stage_dir, world, log)
        gpu_ids = gpu_ids[world.local_rank : world.local_rank + 1] or gpu_ids[:1]
    trainer, metrics, note = None, None, ""
    status: ResultStatus | None = None
    t0 = time.perf_counter()
    with (
        Monitor(gpu_ids) as monitor,
        _graceful_sigint(recorder, log),
        torch_threads_restored(),
        ultra.output_to(log_file),
    ):
        while True:
            _reset_peak_memory(gpu_ids)  # per attempt: after a fallback the report shows the batch that ran
            try:
                trainer, metrics = _train_once(current, weights, data_yaml, project, recorder, checkpoint)
                break
            except StopRequested:
                status = "interrupted"
                break
            except OSError as exc:
                if (gone := _image_gone(exc)) is not None:
                    raise _dataset_changed(stage.name, stage_dir, gone) from None
                if exc.errno != errno.ENOSPC:
                    raise
                raise _disk_full(stage.name, stage_dir, exc) from None
            except Exception as exc:
                kind = oom.memory_kind(exc, on_gpu=bool(gpu_ids))
                if world is not None:
                    raise _rank_failure(current, stage_dir, world, kind, exc) from None
                if kind is None:
                    raise
                if kind == "shm":
                    raise _shm_exhausted(current, exc) from None
                if kind == "device" and recorder.in_final_eval:
                    metrics, note = _validate_again(current, stage_dir, data_yaml, exc, log)
                    break
                if kind == "host":
                    current, fallback = _relieve_host_memory(current, stage_dir, exc, log)
                else:
                    batch, fallback = _step_down(stage, stage_dir, current.batch, exc, log)
                    current = replace(current, batch=batch)
                checkpoint = resume_point(stage_dir)
                fallbacks.append(fallback)
    wall = time.perf_counter() - t0
    result = _stage_result(
        stage, current.batch, recorder, monitor, trainer, metrics, stage_dir, wall, fallbacks, status, previous
    )
    if world is not None:
        result = replace(result, ranks=_gather_rank_figures(result, world, trainer, gpu_ids))
    return replace(result, note=note) if note else result


OOM_HISTORY = "oom_fallbacks.json"  # a multi-rank stage's fallbacks, kept in its folder across restarts


def _after_rank_oom(
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
                "plan; try a smaller --img-size or model (for example --model yolo26n.yaml)"
            )
        epoch = int(worst["epoch"])
        history.append(OomFallback(epoch, int(worst["batch"]), smaller, str(worst["at"]),
                                   f"rank {worst['rank']}: {worst['error']}"))  # fmt: skip
        batch = smaller
        where = f"from the checkpoint after epoch {epoch - 1}" if epoch > 1 else "from the start"
        log(f"{stage.name}: rank {worst['rank']} ran out of memory in epoch {epoch} at batch {worst['batch']}; "
            f"all {world.size} ranks go on with {smaller} {where}")  # fmt: skip
        if world.leader:
            from speedtrain.util import write_atomic

            write_atomic(stage_dir / OOM_HISTORY, json.dumps([asdict(f) for f in history]).encode())
            oom.clear_faults(stage_dir)
    return replace(stage, batch=batch), history


def _read_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def _rank_failure(
    stage: Stage, stage_dir: Path, world: distributed.World, kind: str | None, exc: BaseException
) -> TrainingError:
    """What ends a rank's training: its own out-of-memory (recorded, so that the ranks restart one batch smaller),
    a peer's (the collective this rank waited in broke), or another error."""
    if kind == "device" and oom.next_batch(stage.batch_fallbacks, stage.batch) is not None:
        epoch, _ = _going_on_from(stage_dir)
        oom.record_fault(stage_dir, world.rank, stage.batch, epoch, first_line(exc))
        return RankOutOfMemory(
            f"{stage.name}: rank {world.rank} ran out of memory at batch {stage.batch} in epoch {epoch}; the ranks "
            f"restart from the last saved epoch with batch {oom.next_batch(stage.batch_fallbacks, stage.batch)}"
        )
    if kind == "device":
        return TrainingError(
            f"{stage.name}: rank {world.rank} ran out of memory at batch {stage.batch}, the smallest in the plan; "
            "try a smaller --img-size or model (for example --model yolo26n.yaml)"
        )
    peer = next((f for f in oom.faults(stage_dir) if f.get("rank") != world.rank), None)
    if peer is not None:
        return PeerFailed(f"{stage.name}: rank {world.rank} stopped: rank {peer['rank']} ran out of memory")
    return TrainingError(f"{stage.name}: rank {world.rank} failed: {first_line(exc)}")


def _gather_rank_figures(
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
    mine = RankFigures(world.rank, distributed.host(), device, rate, result.gpu_util_mean,
                       result.gpu_mem_peak_gb, shard, len(loader) if loader is not None else 0)  # fmt: skip
    return tuple(distributed.gather(mine))


def _step_down(stage: Stage, stage_dir: Path, batch: int, exc: BaseException, log: Log) -> tuple[int, OomFallback]:
    """The OOM policy: free memory, take the next batch of the chain, go on from the last saved epoch."""
    _free_memory()
    smaller = oom.next_batch(stage.batch_fallbacks, batch)
    if smaller is None:
        raise TrainingError(
            f"{stage.name}: out of memory at batch {batch}, the smallest in the plan; "
            f"try a smaller --img-size or model (for example --model yolo26n.yaml)"
        ) from None
    epoch, where = _going_on_from(stage_dir)
    log(f"{stage.name}: out of memory in epoch {epoch} at batch {batch}; going on with {smaller} {where}")
    return smaller, OomFallback(epoch, batch, smaller, utc_now(), first_line(exc))


def _relieve_host_memory(stage: Stage, stage_dir: Path, exc: BaseException, log: Log) -> tuple[Stage, OomFallback]:
    """Host RAM ran out on a GPU run: drop the RAM cache to disk, else halve the workers; the batch stays."""
    _free_memory()
    if stage.cache == "ram":
        smaller, change = replace(stage, cache="disk"), "cache ram -> disk"
    elif stage.workers > 0:
        smaller, change = replace(stage, workers=stage.workers // 2), f"workers {stage.workers} -> {stage.workers // 2}"
    else:
        raise TrainingError(
            f"{stage.name}: host RAM ran out with no RAM cache and no dataloader workers ({first_line(exc)}); "
            "close other programs or train on a machine with more memory"
        ) from None
    epoch, where = _going_on_from(stage_dir)
    log(f"{stage.name}: host RAM ran out in epoch {epoch} ({first_line(exc)}); going on with {change} {where}")
    return smaller, OomFallback(epoch, stage.batch, stage.batch, utc_now(), first_line(exc), kind="host", change=change)


def _going_on_from(stage_dir: Path) -> tuple[int, str]:
    """The 1-based epoch that was running (the one after the last checkpoint), and where training goes on from."""
    checkpoint = resume_point(stage_dir)
    epoch = (checkpoint_epoch(checkpoint) + 1 if checkpoint else 0) + 1
    return epoch, f"from the checkpoint after epoch {epoch - 1}" if checkpoint else "from the start"


def _shm_exhausted(stage: Stage, exc: BaseException) -> TrainingError:
    return TrainingError(
        f"{stage.name}: a dataloader worker ran out of shared memory in /dev/shm ({first_line(exc)}); in Docker "
        f"start the container with a larger --shm-size (for example docker run --shm-size=8g), or train with "
        f"fewer workers (--workers {stage.workers // 2}); go on with --resume"
    )


def _validate_again(
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
        _free_memory()
        log(f"{stage.name}: the final validation ran out of memory; validating {best.name} again at batch {batch}")
        try:
            metrics = ultra.validate(
                best, data_yaml, batch=batch, imgsz=stage.imgsz, device=stage.device, plots=False, verbose=False,
                project=str(stage_dir), name="final-val", exist_ok=True,
            )  # fmt: skip
            note = f"the final validation ran out of memory ({first_line(exc)}); validated again at batch {batch}"
            return metrics, note
        except Exception as again:
            if oom.memory_kind(again, stage.on_gpu) != "device" or batch == 1:
                raise TrainingError(
                    f"{stage.name}: training finished and {best} is saved, but validating it ran out of memory "
                    f"down to batch {batch}: validate it later with `yolo val model={best} batch=1`"
                ) from None
            batch = max(1, batch // 2)


def _disk_full(stage_name: str, stage_dir: Path, exc: OSError) -> DiskSpaceError:
    point = resume_point(stage_dir)
    where = (f"the last complete checkpoint is {point}" if point is not None else
             "no epoch of this stage was saved yet, so it starts again")  # fmt: skip
    return DiskSpaceError(
        f"{stage_name}: the disk filled up while training ({exc.filename or stage_dir}); free some space "
        f"and go on with --resume ({where})"
    )


def _image_gone(exc: BaseException) -> str | None:
    """The image Ultralytics' loader could not find (FileNotFoundError "Image Not Found PATH", data/base.py
    load_image; from a DataLoader worker too, whose message quotes the original), as the user knows it: the
    dataset's own file, not its link in the view. None for any other error."""
    found = re.search(r"Image Not Found (\S+)", str(exc)) if isinstance(exc, FileNotFoundError) else None
    if found is None:
        return None
    path = Path(found.group(1))
    return os.readlink(path) if path.is_symlink() else str(path)


def _dataset_changed(stage_name: str, stage_dir: Path, image: str) -> DatasetError:
    point = resume_point(stage_dir)
    kept = (f"the epochs saved so far are kept ({point})" if point is not None else
            "no epoch of this stage was saved yet")  # fmt: skip
    return DatasetError(
        f"{stage_name}: {image} disappeared while training (the dataset was moved or deleted?); {kept}: put it "
        "back and go on with --resume"
    )


def _finished_before(
    stage: Stage, stage_dir: Path, checkpoint: Path | None, previous: StageResult | None
) -> StageResult | None:
    """A stage being resumed that had already trained every epoch (a run killed or stopped after its last epoch,
    during the final validation or the report): its result from the files, so that nothing is trained again and
    best.pt is never overwritten. None when there is still training to do; a TrainingError when epochs were saved
    but no checkpoint to go on from is intact (training again from the start would overwrite them)."""
    rows = _csv_rows(stage_dir / "results.csv")
    saved = checkpoint_epoch(checkpoint) + 1 if checkpoint is not None else 0
    best = stage_dir / "weights" / "best.pt"
    if max(saved, len(rows)) < stage.epochs:
        if checkpoint is None and rows:
            intact = f"{best} is intact" if _loads(best) else "best.pt is damaged too"
            raise TrainingError(
                f"{stage.name}: {len(rows)} epochs were saved, but weights/{RESUME_NAME} and weights/last.pt cannot "
                f"be read (damaged), so training cannot go on from them; {intact}: train a new run from it "
                f"(--model {best}) rather than over these epochs"
            )
        return None
    if not _loads(best):
        return None  # nothing trustworthy to keep: Ultralytics' own resume says what is wrong
    epoch_times = _epoch_times_from_csv(stage_dir / "results.csv")
    maps, losses, validated = epoch_curves(stage_dir / "results.csv")
    metrics = _best_row_metrics(rows)
    return StageResult(
        name=stage.name, status="completed", imgsz=stage.imgsz, batch=previous.batch if previous else stage.batch,
        epochs_planned=stage.epochs, epochs_done=max(saved, len(rows)), epoch_times_s=epoch_times,
        train_times_s=previous.train_times_s if previous else (), best_metrics=metrics, weights=str(best),
        last_weights=str(stage_dir / "weights" / "last.pt") if (stage_dir / "weights" / "last.pt").is_file() else None,
        save_dir=str(stage_dir), wall_time_s=previous.wall_time_s if previous else round(sum(epoch_times), 2),
        epoch_map50_95=maps, epoch_loss=losses, epoch_validated=validated_epochs(validated),
        images_per_epoch=previous.images_per_epoch if previous else 0,
        oom_fallbacks=previous.oom_fallbacks if previous else (),
        note=f"had trained all {stage.epochs} epochs before it stopped; kept as it was (best.pt, results.csv)",
    )  # fmt: skip


def _loads(weights: Path) -> bool:
    """Whether a weights file is a readable PyTorch checkpoint holding a model."""
    if not weights.is_file():
        return False
    import torch

    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    except Exception:  # truncated, foreign: not weights to trust
        return False
    return isinstance(ckpt, dict) and (ckpt.get("model") is not None or ckpt.get("ema") is not None)


def _best_row_metrics(rows: list[dict[str, str]]) -> tuple[tuple[str, float], ...]:
    """The metrics of results.csv's best epoch by Ultralytics' fitness (mAP50-95 alone: utils/metrics.py, 8.4.190)."""
    best: tuple[float, dict[str, float]] | None = None
    for row in rows:
        try:
            m = {k.removeprefix("metrics/").removesuffix("(B)"): float(v) for k, v in row.items()
                 if k.startswith("metrics/")}  # fmt: skip
        except ValueError:
            continue
        fit = m.get("mAP50-95", 0.0)
        if math.isfinite(fit) and (best is None or fit > best[0]):
            best = (fit, m)
    return tuple((k, round(v, 5)) for k, v in best[1].items()) if best else ()


def _train_once(
    stage: Stage,
    weights: str,
    data_yaml: str | Path,
    project: Path,
    recorder: _Recorder,
    checkpoint: Path | None,
) -> tuple[Any, Any]:
    """One model.train() call: a fresh start from `weights`, or a resume from `checkpoint`."""
    from speedtrain import ultra

    args = stage.train_args() | {"project": str(project), "name": stage.name, "exist_ok": True}
    try:
        return ultra.train(weights, data_yaml, args, recorder.callbacks(), resume=checkpoint,
                           fast=stage.pipeline == "fast")  # fmt: skip
    finally:
        _free_memory()


def resume_point(stage_dir: Path) -> Path | None:
    """The checkpoint to go on from: resume.pt (always whole) if present, else an unstripped last.pt."""
    for candidate in (stage_dir / "weights" / RESUME_NAME, stage_dir / "weights" / "last.pt"):
        if candidate.is_file() and checkpoint_epoch(candidate) >= 0:
            return candidate
    return None


def checkpoint_epoch(path: Path) -> int:
    """The 0-based epoch a checkpoint was saved after; -1 for a finished (stripped) or unreadable one."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a truncated or foreign file is simply not a resume point
        return -1
    return int(ckpt.get("epoch", -1)) if isinstance(ckpt, dict) and ckpt.get("optimizer") is not None else -1


@contextlib.contextmanager
def torch_threads_restored(threads: int | None = None) -> Iterator[None]:
    """Leave torch's thread count as it was found (Ultralytics and the plan change it for CPU training);
    with `threads`, set it for the block."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _graceful_sigint(recorder: _Recorder, log: Log) -> Iterator[None]:
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
        recorder.stop_requested = True
        recorder.stop_signal = signal.Signals(signum).name
        first[0] = time.monotonic()
        if signum == signal.SIGINT:
            log("Ctrl-C: stopping after this epoch is saved; press Ctrl-C again to stop at once (loses this epoch)")
        else:
            log(f"{recorder.stop_signal} (preempted?): stopping after this epoch is saved; go on with --resume")

    previous = {sig: signal.signal(sig, handler) for sig in GRACEFUL_SIGNALS}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


RELAY_S = 2.0  # a second signal this soon after the first is the same request relayed, not a second Ctrl-C
GRACEFUL_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)


def _stage_result(
    stage: Stage,
    batch: int,
    rec: _Recorder,
    monitor: Monitor,
    trainer: Any,
    metrics: Any,
    stage_dir: Path,
    wall: float,
    fallbacks: list[OomFallback],
    status: ResultStatus | None,
    previous: StageResult | None,
) -> StageResult:
    epoch_times, train_times = _merged_times(rec, stage_dir, previous)
    images, iterations = rec.images or (previous.images_per_epoch if previous else 0), rec.iterations
    timed = train_times or epoch_times
    done = max([*rec.epoch_times, -1]) + 1 or len(epoch_times)
    summary = monitor.summary()
    curve_map, curve_loss, curve_epochs = epoch_curves(stage_dir / "results.csv")
    best, last = stage_dir / "weights" / "best.pt", stage_dir / "weights" / "last.pt"
    if not status:
        fitted = int(getattr(trainer, "epochs", 0) or 0) if "time" in dict(stage.extra) else 0
        status = "completed" if done >= (fitted or stage.epochs) else "early-stopped"  # --time: Ultralytics' epochs
    by = f" by {rec.stop_signal}" if rec.stop_signal and rec.stop_signal != "SIGINT" else ""
    note = f"interrupted{by} after epoch {done}; resume with --resume" if status == "interrupted" else ""
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
        threads=rec.threads_used or (previous.threads if previous else None),
        fast_store=rec.fast_store or (previous.fast_store if previous else None),
        oom_fallbacks=tuple(fallbacks),
        best_metrics=_metrics(metrics),
        weights=str(best) if best.is_file() else None,
        last_weights=str(last) if last.is_file() else None,
        save_dir=str(stage_dir),
        wall_time_s=round(wall + (previous.wall_time_s if previous else 0.0), 2),
        note=note,
        stopped_by=rec.stop_signal if status == "interrupted" else None,
        epoch_map50_95=curve_map,
        epoch_loss=curve_loss,
        epoch_validated=validated_epochs(curve_epochs),
        val_every=rec.cadence.cadence if rec.cadence else 1,
        val_time_s=round(sum(rec.cadence.val_s.values()), 2) if rec.cadence else 0.0,
        val_saved_s=round(rec.cadence.saved_s(), 1) if rec.cadence else 0.0,
        estimated_epoch_s=previous.estimated_epoch_s
        if previous and previous.estimated_epoch_s
        else (rec.estimated_epoch_s),
        estimated_from_batches=(
            previous.estimated_from_batches if previous and previous.estimated_epoch_s else rec.estimated_from
        ),
    )


def _merged_times(
    rec: _Recorder, stage_dir: Path, previous: StageResult | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-epoch times: this process's callbacks, and for earlier epochs the earlier run's (or results.csv)."""
    epochs = sorted(rec.epoch_times)
    first = epochs[0] if epochs else None
    if previous and previous.epoch_times_s:
        before_e, before_t = previous.epoch_times_s, previous.train_times_s
    else:  # killed runs left no report figures; DDP runs no callbacks here: results.csv has every epoch
        before_e = _epoch_times_from_csv(stage_dir / "results.csv")
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


def _csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of Ultralytics' results.csv (one per epoch, keys stripped); [] when it cannot be read."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _epoch_times_from_csv(path: Path) -> tuple[float, ...]:
    """Per-epoch seconds from the cumulative 'time' column Ultralytics writes to results.csv."""
    cumulative = [float(r["time"]) for r in _csv_rows(path) if r.get("time")]
    return tuple(round(b - a, 3) for a, b in zip([0.0, *cumulative], cumulative, strict=False))


LOSS_COLUMNS = ("train/box_loss", "train/cls_loss", "train/dfl_loss")


def epoch_curves(path: Path) -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]]:
    """Per epoch from results.csv: the training-time validation's mAP50-95, the training loss (box + cls + dfl,
    Ultralytics' weights already applied) and the 1-based epoch; epochs whose figures are missing or not numbers
    (not validated: --val-every) are left out of all three."""
    maps, losses, epochs = [], [], []
    for n, row in enumerate(_csv_rows(path), start=1):
        try:
            score = float(row["metrics/mAP50-95(B)"])
            loss = sum(float(row[c]) for c in LOSS_COLUMNS if row.get(c))
            epoch = int(float(row.get("epoch") or n))
        except (KeyError, ValueError):
            continue
        if math.isfinite(score) and math.isfinite(loss):
            maps.append(round(score, 5))
            losses.append(round(loss, 4))
            epochs.append(epoch)
    return tuple(maps), tuple(losses), tuple(epochs)


def validated_epochs(epochs: tuple[int, ...]) -> tuple[int, ...]:
    """epoch_validated as a StageResult keeps it: empty when the scores are epochs 1, 2, 3, ... (every epoch)."""
    return () if epochs == tuple(range(1, len(epochs) + 1)) else epochs


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
