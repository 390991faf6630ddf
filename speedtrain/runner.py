"""The stage loop: run a TrainPlan's stages with Ultralytics, measure them, stop cleanly on Ctrl-C or SIGTERM, and
go on from a checkpoint. What a failure leads to is recovery.py's (OOM, host RAM, ranks), what a stage's folder
holds checkpoints.py's, and Ultralytics' callbacks are ultra.Recorder's.

Ultralytics is reached through speedtrain.ultra only; torch is imported inside functions.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speedtrain import checkpoints, distributed, interrupts, measured, planner, recovery, schedule, scoring
from speedtrain.knobs import ULTRALYTICS_IMGSZ, Stage, TrainPlan
from speedtrain.monitor import Monitor
from speedtrain.records import (
    FINISHED,
    Hooks,
    Log,
    OnProgress,
    OomFallback,
    RunResult,
    StageResult,
)
from speedtrain.util import torch_threads_restored, utc_now

if TYPE_CHECKING:
    from speedtrain.ultra import Recorder


BASELINE_IMGSZ = ULTRALYTICS_IMGSZ  # the untuned baseline the time estimate is set against


@dataclass(frozen=True, slots=True)
class StageContext:
    """What every stage of a run shares: the dataset it trains on (the data.yaml of its linked view), the folder its
    stages are written in, the caller's hooks (progress lines, each batch's progress, the fine-tune question), the
    file Ultralytics' own output goes to (None: the console) and whether the run goes on after an interruption or a
    kill (`resuming`: a stage goes on from its last checkpoint)."""

    data_yaml: str | Path
    project: Path
    hooks: Hooks = Hooks()
    log_file: Path | None = None
    resuming: bool = False


def run(
    plan: TrainPlan,
    context: StageContext,
    *,
    previous: tuple[StageResult, ...] = (),
    before_stage: Callable[[Stage], Stage] = lambda s: s,
    on_progress: Callable[[tuple[StageResult, ...], str | None], None] = lambda _r, _s: None,
) -> RunResult:
    """Train the plan's stages in order (finished ones from `previous` are kept) and return what was measured.

    `on_progress(results, running_stage)` is called before each stage and after it, so the caller can keep a
    report on disk that a later --resume reads.
    """
    from speedtrain import ultra

    with ultra.session():
        return _run(plan, context, previous, before_stage, on_progress)


def _run(
    plan: TrainPlan,
    context: StageContext,
    previous: tuple[StageResult, ...],
    before_stage: Callable[[Stage], Stage],
    on_progress: Callable[[tuple[StageResult, ...], str | None], None],
) -> RunResult:
    started, t0 = utc_now(), time.perf_counter()
    log, run_dir = context.hooks.log, str(context.project)
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
            skip = planner.skip_reason(stage, results, plan.target_map, context.hooks.ask)
            if skip:
                log(f"{stage.name}: skipped ({skip})")
                results.append(StageResult(stage.name, "skipped", stage.imgsz, stage.batch, stage.epochs, 0, note=skip))
                continue
            stage = before_stage(stage)
            on_progress(tuple(results), stage.name)
            trained = train_stage(stage, weights, context, prior, plan.stages[index + 1 :])
            result = _scored(plan, stage, trained, context)
            results.append(result)
            on_progress(tuple(results), None)
            if result.status == "interrupted":
                wall = round(time.perf_counter() - t0, 2)
                return RunResult(
                    run_dir, source, note, tuple(results), started, wall, interrupted=True, stopped_by=result.stopped_by
                )
        weights = results[-1].weights or results[-1].last_weights or weights
    return RunResult(run_dir, source, note, tuple(results), started, round(time.perf_counter() - t0, 2))


def _scored(plan: TrainPlan, stage: Stage, result: StageResult, context: StageContext) -> StageResult:
    """A trained stage's result with its weights' scores and latency (an interrupted one as it is)."""
    if result.status == "interrupted":
        return result
    world, log = distributed.world(), context.hooks.log
    # Ultralytics' validator gathers from every rank when ranks exist (detect/val.py gather_stats, 8.4.190): with
    # several, rank 0 cannot validate alone, and the fine-tune runs whatever the score
    sizes = scoring.score_sizes(plan, stage) if world is None or world.size == 1 else ()
    if world is None or world.leader:  # rank 0's model: rank 0 times it
        result = scoring.with_latency(result, stage, log)
    return scoring.with_scores(result, stage, context.data_yaml, sizes, context.log_file, log)


def train_stage(
    stage: Stage,
    weights: str,
    context: StageContext,
    previous: StageResult | None = None,
    later: tuple[Stage, ...] = (),
) -> StageResult:
    """Train one stage; on out-of-memory step down the batch chain and go on from the last checkpoint.
    `later`: the plan's stages after this one, for the time estimate of the whole run.

    With `previous` (an interrupted stage of an earlier run), training resumes from that stage's checkpoint.
    The hooks' `on_update` receives the stage's progress after every batch; with the context's `log_file`,
    Ultralytics' own output (its argument dump, layer table, progress bars) goes to that file, not the console.
    """
    from speedtrain import ultra

    log, project, resuming = context.hooks.log, context.project, context.resuming
    stage_dir = project / stage.name
    # A stage an earlier run was interrupted in, or was killed in (`resuming`, and no result in its report), goes on
    # from its last complete checkpoint; a folder reused by a fresh run (tune's trial runs) starts over.
    checkpoint = checkpoints.resume_point(stage_dir) if previous or resuming else None
    if previous or resuming:
        finished = checkpoints.finished_before(stage, stage_dir, checkpoint, previous)
        if finished is not None:
            log(f"{stage.name}: {finished.note}")
            return finished
    if previous and checkpoint is None:
        log(f"{stage.name}: no checkpoint of an earlier epoch; starting the stage again")
    world = distributed.world()
    recorder = _recorder(stage, later, world, context.hooks.on_update, log)
    if stage.schedule is not None:
        recorder.phases = _phases(stage, stage_dir, checkpoint, world, log)
    fallbacks: list[OomFallback] = list(previous.oom_fallbacks) if previous else []
    current = replace(stage, batch=previous.batch if previous and checkpoint else stage.batch)
    gpu_ids = stage.gpu_ids
    if world is not None:
        current, fallbacks = recovery.after_rank_oom(current, stage_dir, world, log)
        gpu_ids = gpu_ids[world.local_rank : world.local_rank + 1] or gpu_ids[:1]
    attempts = measured.Attempts(current, checkpoint, fallbacks)
    t0 = time.perf_counter()
    with (
        Monitor(gpu_ids) as monitor,
        interrupts.graceful_stop(recorder, log),
        torch_threads_restored(),
        ultra.output_to(context.log_file) as hidden,
        _heard_while_setting_up(recorder, hidden, log, stage.name),
    ):
        _train_until_done(attempts, stage, weights, context, recorder, world, gpu_ids)
    result = measured.stage_result(stage, attempts, recorder, monitor, stage_dir, time.perf_counter() - t0, previous)
    if world is not None:
        result = replace(result, ranks=measured.gather_rank_figures(result, world, attempts.trainer, gpu_ids))
    return replace(result, note=attempts.note) if attempts.note else result


def _train_until_done(
    attempts: measured.Attempts,
    stage: Stage,
    weights: str,
    context: StageContext,
    recorder: Recorder,
    world: distributed.World | None,
    gpu_ids: tuple[int, ...],
) -> None:
    """Training calls until the stage is trained or stopped; after each failure, recovery's next step (or its
    one-line error, raised)."""
    from speedtrain import ultra

    while True:
        _reset_peak_memory(gpu_ids)  # per attempt: after a fallback the report shows the batch that ran
        try:
            attempts.trainer, attempts.metrics = _train_once(
                attempts.current, weights, context, recorder, attempts.checkpoint
            )
            return
        except ultra.StopRequested:
            attempts.status = "interrupted"
            return
        except Exception as exc:
            step = recovery.recover(
                exc,
                stage,
                attempts.current,
                context.project / stage.name,
                context.data_yaml,
                world,
                bool(gpu_ids),
                recorder.in_final_eval,
                context.hooks.log,
            )
            if step.stage is None:  # only the final validation failed: the stage is trained
                attempts.metrics, attempts.note = step.metrics, step.note
                return
            attempts.current, attempts.checkpoint = step.stage, step.checkpoint
            attempts.fallbacks.append(step.fallback)  # type: ignore[arg-type]


def _recorder(
    stage: Stage, later: tuple[Stage, ...], world: distributed.World | None, on_update: OnProgress | None, log: Log
) -> Recorder:
    """The stage's callback adapter: its threads, progress, the time estimate (rank 0's) against the baseline at
    Ultralytics' 640 and the later stages, and the validation cadence."""
    from speedtrain import ultra

    leader = world is None or world.leader
    recorder = ultra.Recorder(
        threads=stage.threads,
        stage=stage.name,
        on_update=on_update,
        collective=world is not None,
        log=log if leader else None,
    )
    if stage.imgsz < BASELINE_IMGSZ:
        recorder.baseline_factor = (BASELINE_IMGSZ / stage.imgsz) ** 2
    recorder.max_epochs = stage.max_epochs
    recorder.later = tuple((s.name, s.epochs, (s.imgsz / stage.imgsz) ** 2, s.when != "always") for s in later)
    if stage.val_every != 1:
        recorder.cadence = ultra.ValCadence(schedule.Cadence(every=stage.val_every, patience=stage.patience))
    return recorder


def _phases(stage: Stage, stage_dir: Path, checkpoint: Path | None, world: distributed.World | None, log: Log) -> Any:
    """A budgeted stage's phase follower: fresh, or going on from the state saved with `checkpoint`."""
    from speedtrain import ultra

    assert stage.schedule is not None
    leader = world is None or world.leader
    saved = ultra.read_phase_state(stage_dir / checkpoints.PHASES_STATE) if checkpoint is not None else None
    deadline, elapsed = saved if saved else (schedule.Deadline(stage.schedule), 0.0)
    if saved:
        log(f"{stage.name}: going on at {deadline.imgsz} px, {elapsed:.0f} s into its {stage.schedule.budget_s:.0f} s")
    return ultra.Phases(
        deadline,
        stage_dir / checkpoints.PHASES_STATE if leader else None,
        elapsed,
        world is not None,
        log if leader else None,
    )


def _train_once(
    stage: Stage, weights: str, context: StageContext, recorder: Recorder, checkpoint: Path | None
) -> tuple[Any, Any]:
    """One model.train() call: a fresh start from `weights`, or a resume from `checkpoint`."""
    from speedtrain import ultra

    args = stage.train_args() | {"project": str(context.project), "name": stage.name, "exist_ok": True}
    try:
        return ultra.train(
            weights, context.data_yaml, args, recorder.callbacks(), resume=checkpoint, fast=stage.pipeline == "fast"
        )
    finally:
        recovery.free_memory()


SETUP_HEARTBEAT_S = 10.0  # while a stage sets up with Ultralytics' output hidden: a line at least this often


@contextlib.contextmanager
def _heard_while_setting_up(
    recorder: Recorder, hidden: Any, log: Log, stage: str, every: float = SETUP_HEARTBEAT_S
) -> Iterator[None]:
    """Until the stage's first batch, with Ultralytics' output in its log file (`hidden`: that stream, None when it
    is on the console): every `every` s a line with the time so far and Ultralytics' latest line (its label scan,
    its image cache's fill, with their counts and rates), so that minutes of setup at 25,000 images are not silence.
    """
    if hidden is None:
        yield
        return
    done, t0 = threading.Event(), time.monotonic()

    def beat() -> None:
        while not done.wait(every) and not (recorder.batches or recorder.epoch_times):
            latest = hidden.latest[:100]
            log(f"{stage}: setting up, {time.monotonic() - t0:.0f} s" + (f": {latest}" if latest else ""))

    thread = threading.Thread(target=beat, name="speedtrain-setup-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _reset_peak_memory(gpu_ids: tuple[int, ...]) -> None:
    if not gpu_ids:
        return
    import torch

    if torch.cuda.is_available():
        for i in gpu_ids:
            torch.cuda.reset_peak_memory_stats(i)
