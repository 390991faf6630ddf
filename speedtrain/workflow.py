"""The steps behind each API function, in order: probe + scan + plan, prepare and tune as planned or asked, then
view + run + report (here, as speedtrain's own ranks, or as one rank under a launcher). speedtrain.api checks the
arguments, restores the process's state and makes one call here per function."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from speedtrain import dataset, distributed, hardware, launch, planner, render, resize, runner, tuner, ultra_args
from speedtrain.dataset import DatasetStats, load_yaml
from speedtrain.distributed import World
from speedtrain.errors import DatasetError, PeerFailed, SpeedtrainError, Terminated, UsageError
from speedtrain.hardware import HardwareSnapshot
from speedtrain.knobs import Overrides, Stage, said, voice
from speedtrain.parallel import Progress
from speedtrain.records import DatasetSummary, Hooks, Log, Planned, Preparation, StageResult, TuneResult
from speedtrain.speedreport import REPORT_NAME, SpeedReport
from speedtrain.util import check_free_disk, existing_parent, utc_now

SAMPLE_DIR = Path(__file__).parent / "sample"
DEFAULT_PROJECT: Path = Path("runs") / "speedtrain"
ULTRALYTICS_LOG = "ultralytics.log"  # Ultralytics' own output of a run, unless --verbose shows it


def scan_dataset(
    path: str | os.PathLike[str] | None, allow_download: bool = False, copy_of: DatasetStats | None = None
) -> DatasetStats:
    """Scan the dataset (the embedded sample when `path` is None) and refuse one training cannot use; `copy_of`:
    the dataset it is speedtrain's resized copy of (its labels are not read again).

    A yaml's `download:` script (which plain Ultralytics runs when data is missing) runs only with
    `allow_download`.
    """
    path = Path(path) if path is not None else SAMPLE_DIR
    try:
        stats = dataset.scan(path, copy_of=copy_of)
    except DatasetError as exc:
        script = dataset.download_script(path)
        if not script or "split" not in str(exc):
            raise
        if not allow_download:
            raise DatasetError(
                f"{exc}; the yaml has a download: script, which speedtrain does not run (it executes code from the "
                f"dataset): pass {said('allow_download')} to let Ultralytics run it"
            ) from None
        from speedtrain import ultra

        ultra.run_download_script(dataset.find_yaml(path))
        stats = dataset.scan(path)
    if stats.errors:
        first = stats.errors[0]
        more = f" (and {len(stats.errors) - 1} more; run `speedtrain check`)" if len(stats.errors) > 1 else ""
        raise DatasetError(f"{first.line()}{more}")
    return stats


def is_sample(dataset_path: str | os.PathLike[str] | None) -> bool:
    """The embedded sample, by default or named (the one-click script passes its path): the short demo plan."""
    if dataset_path is None:
        return True
    path = Path(dataset_path).absolute()
    return path in (SAMPLE_DIR.absolute(), (SAMPLE_DIR / "data.yaml").absolute())


def make_plan(
    dataset_path: str | os.PathLike[str] | None,
    overrides: Overrides,
    extra_args: list[str] | tuple[str, ...] = (),
    hardware_file: str | os.PathLike[str] | HardwareSnapshot | None = None,
    allow_download: bool = False,
) -> Planned:
    """Probe the hardware (or load a snapshot, or take one), scan the dataset and plan the run."""
    stats = scan_dataset(dataset_path, allow_download)
    if isinstance(hardware_file, HardwareSnapshot):
        hw = hardware_file
    else:
        hw = hardware.load(Path(hardware_file)) if hardware_file else hardware.probe(stats.root)
    if extra_args:
        extra = planner.parse_extra_args(list(extra_args), ultra_args.defaults())
        overrides = replace(overrides, extra=overrides.extra + extra)
    check_model(overrides.model)
    if str(overrides.device).strip().lower() == "mps" and not hardware_file and not _has_mps():
        raise UsageError(
            f"{said('device', 'mps')}: Apple's GPU, and this is {platform.system()} on {platform.machine()}; "
            f"use {said('device', 'cpu')}" + (" or a CUDA index such as 0" if hw.gpus else "")
        )
    overrides = replace(overrides, sample=is_sample(dataset_path))
    return Planned(hw, stats, overrides, planner.plan(hw, stats, overrides))


def _has_mps() -> bool:
    """Apple silicon under macOS, the only place torch's MPS device exists (checked without importing torch)."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def prepare_dataset(
    planned: Planned, project: str | Path = DEFAULT_PROJECT, progress: Progress | None = None
) -> Planned:
    """Resize the dataset as the plan says (into the project folder) and re-plan on the copy; else as is."""
    size = planned.plan.prepare_size
    if size is None:
        return planned
    out = resize.prepared_dir(planned.stats, project, size)
    summary = resize.resize_dataset(planned.stats, size, out, progress=progress)
    stats = scan_dataset(summary.yaml_path, copy_of=planned.stats)
    plan = planner.plan(planned.hw, stats, planned.overrides)
    decision = planned.plan.reason("prepare")
    plan = replace(plan, reasons=tuple((k, decision if k == "prepare" else v) for k, v in plan.reasons))
    train_images = [i for s in planned.stats.splits if s.name == "train" for i in s.image_files]
    copies = [i for s in stats.splits if s.name == "train" for i in s.image_files]
    imgsz = plan.stages[0].imgsz
    before, after = resize.measure_load_ms(train_images, imgsz), resize.measure_load_ms(copies, imgsz)
    sample, original = min(resize.LOAD_SAMPLE, len(train_images)), DatasetSummary.of(planned.stats)
    record = Preparation(decision, summary, before, after, sample, original, plan.stages[0].cache == "ram")
    return replace(planned, stats=stats, plan=plan, prepared=record)


def autotune(
    planned: Planned,
    project: str | Path = DEFAULT_PROJECT,
    *,
    budget_s: float = 90.0,
    retune: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[Planned, TuneResult]:
    """Measure the main stage's batch, workers and cache (or reuse a cached measurement) and apply the winner."""
    from speedtrain import ultra

    project = Path(project)
    view_yaml = resize.make_view(planned.stats, resize.view_dir(planned.stats, project))
    source, _ = ultra.resolve_model(planned.plan.model)
    result = tuner.tune(
        planned.plan.stages[0],
        source,
        view_yaml,
        planned.hw,
        planned.stats,
        budget_s=budget_s,
        cache_dir=project / ".tune",
        retune=retune,
        project=project,
        log=log,
    )
    if not result.predicted_images_per_s:
        return planned, result
    why = f"{result.predicted_images_per_s} img/s predicted, {result.bound}-bound" + (
        "; the plan's own configuration, nothing measurably faster" if result.kept_plan else ""
    )
    fast = tuner.fast_pipeline_faster(result)
    auto = planned.overrides.pipeline == "auto"
    plan = planner.apply_tuned(
        planned.plan, result.batch, result.workers, result.cache, why, fast_measured_faster=fast, pipeline_auto=auto
    )
    return replace(planned, plan=plan, tuned=result), result


NAME_MAX_BYTES = 200


def check_run_folder(project: str | os.PathLike[str], name: str) -> Path:
    """--project must be (or become) a folder and --name a plain folder name inside it; checked before any work."""
    project = Path(project)
    if not name or name in (".", "..") or any(sep in name for sep in ("/", "\\")):
        raise UsageError(
            f"{said('name', name, quoted=True)}: a run folder name, without / or \\ (it stays inside {said('project')})"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in name):  # a newline in a folder name breaks every path printed
        raise UsageError(
            f"{said('name', name, quoted=True)}: control characters (a newline, a tab) cannot be in a run folder name"
        )
    if len(name.encode()) > NAME_MAX_BYTES:  # file systems allow 255 bytes; a suffix (train2, ...) may follow
        raise UsageError(
            f"{said('name')}: {len(name.encode())} bytes; a run folder name of at most {NAME_MAX_BYTES} bytes"
        )
    parent = existing_parent(project)  # nothing is created here: a refused run leaves no folder behind
    if not parent.is_dir():
        raise UsageError(f"{said('project', project)}: cannot hold run folders ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{said('project', project)}: cannot hold run folders ({parent} is not writable)")
    return project


def new_run_dir(project: str | os.PathLike[str], name: str) -> Path:
    """A fresh run folder: project/name, or name2, name3, ... when taken; an earlier run is never reused."""
    project = check_run_folder(project, name)
    try:
        project.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{said('project', project)}: cannot hold run folders ({exc.strerror or exc})") from None
    for n in range(1, 10_000):
        candidate = project / (name if n == 1 else f"{name}{n}")
        try:
            candidate.mkdir()
            return candidate.absolute()
        except FileExistsError:
            continue
    raise DatasetError(f"{project}: no free run folder name for {name!r}")


def execute(
    planned: Planned,
    project: str | os.PathLike[str] = DEFAULT_PROJECT,
    name: str = "train",
    *,
    hooks: Hooks = Hooks(),
    quiet: bool = False,
) -> tuple[SpeedReport, Path]:
    """Train the plan through a linked view of the dataset; keep speed_report.json current; return it and its path.

    With `quiet`, Ultralytics' own output goes to RUN_DIR/ultralytics.log instead of the console.
    """
    rep, run_dir = start(planned, project, name, hooks.log)
    return _run(rep, run_dir, (), hooks, quiet)


def check_ultralytics_args(planned: Planned) -> None:
    """Ultralytics' own checks of every stage's arguments, before anything is created."""
    from speedtrain import ultra  # imports Ultralytics: after planning, so that a planning error answers at once

    for stage in planned.plan.stages:
        ultra.check_args(stage.train_args())


def start(
    planned: Planned,
    project: str | os.PathLike[str] = DEFAULT_PROJECT,
    name: str = "train",
    log: Callable[[str], None] = lambda _: None,
) -> tuple[SpeedReport, Path]:
    """A new run folder with the dataset's linked view and the report of the run about to start, written."""
    check_ultralytics_args(planned)
    _check_disk(planned, Path(project))
    run_dir = new_run_dir(project, name)
    view_yaml = resize.make_view(planned.stats, resize.view_dir(planned.stats, Path(project)))
    log(f"run folder: {run_dir}")
    rep = SpeedReport.of(planned).started(run_dir, view_yaml)
    rep.to_json(run_dir / REPORT_NAME)
    return rep, run_dir


def run_as_rank(
    run_dir: str | os.PathLike[str], *, resuming: bool, hooks: Hooks = Hooks(), quiet: bool = False
) -> tuple[SpeedReport, Path]:
    """One rank's part of a run that rank 0 started (`start`): train its stages with the other ranks; rank 0 keeps
    the report. `resuming`: go on after an interruption, a lost rank or an out-of-memory restart."""
    hooks = replace(hooks, ask=None)  # ranks never ask: the fine-tune is decided alike on every rank
    if resuming:
        return resume(run_dir, hooks=hooks, quiet=quiet)
    run_dir = Path(run_dir).absolute()
    return _run(SpeedReport.from_json(run_dir), run_dir, (), hooks, quiet)


def resume(run_dir: str | os.PathLike[str], *, hooks: Hooks = Hooks(), quiet: bool = False) -> tuple[SpeedReport, Path]:
    """Go on with an interrupted or killed run: the running stage from its last checkpoint, then the rest."""
    run_dir = Path(run_dir).absolute()
    rep = check_resumable(run_dir)
    hooks.log(f"resuming {run_dir}")
    return _run(rep.resumed(), run_dir, rep.results(), hooks, quiet)


def check_resumable(run_dir: str | os.PathLike[str]) -> SpeedReport:
    """The report of a run --resume can go on with; one clear error for anything else."""
    run_dir = Path(run_dir).absolute()
    rep = SpeedReport.from_json(run_dir)
    if rep.run is None:
        raise UsageError(f"{run_dir}: a plan, not a run's report; start a run with speedtrain train")
    if rep.run.status == "finished":
        raise UsageError(f"{run_dir}: this run finished; start a new one instead of {said('resume')}")
    data_yaml = rep.run.data_yaml
    if not data_yaml or not Path(data_yaml).is_file():
        raise DatasetError(f"{run_dir}: the dataset view {data_yaml} is gone; start a new run")
    _refuse_a_changed_dataset(rep, run_dir)
    return rep


def _refuse_a_changed_dataset(rep: SpeedReport, run_dir: Path) -> None:
    """--resume goes on with the images a run started with: a dataset changed since (images deleted, labels edited)
    is one line saying what changed, instead of training on a stale resized copy without a word."""
    original = rep.prepare.original_dataset if rep.prepare else rep.dataset
    if not original.fingerprint:  # a report from before fingerprints: nothing to compare with
        return
    where = original.yaml_path or original.root
    try:
        now = dataset.scan(where)
    except SpeedtrainError as exc:
        raise DatasetError(f"{run_dir}: its dataset {where} cannot be read now ({exc}); restore it to go on") from None
    changed = dataset.changes(original, now)
    if changed:
        raise DatasetError(
            f"{run_dir}: its dataset changed since the run started ({'; '.join(changed)}); a run goes on with the "
            f"images it started with: restore them, or start a new run on {where}"
        )


def _run(
    rep: SpeedReport, run_dir: Path, previous: tuple[StageResult, ...], hooks: Hooks, quiet: bool = False
) -> tuple[SpeedReport, Path]:
    """Run the stages, saving the report before and after each one, and draw the PNG at the end."""
    log = hooks.log
    path = run_dir / REPORT_NAME
    current = rep  # the latest state, saved whenever it changes
    world = distributed.world()
    owner = world is None or world.leader  # rank 0 owns the report

    def save(results: tuple[StageResult, ...], running: str | None) -> None:
        nonlocal current
        current = current.with_results(results, running)
        if owner:
            current.to_json(path)

    def before_stage(stage: Stage) -> Stage:
        nonlocal current
        stage, note = planner.recheck_cache(stage, psutil.virtual_memory().available / 1024**3)
        if world is not None:
            stage, note = distributed.broadcast((stage, note))  # every rank trains with rank 0's choice
        if note:
            log(note)
            current = current.with_stage(stage, note)
        return stage

    save(previous, None)
    if rep.run is None or rep.run.data_yaml is None:
        raise UsageError(f"{run_dir}: the report has no dataset view to train on; start a new run")
    try:
        with _sigterm_interrupts(world is None):
            log_file = run_dir / ULTRALYTICS_LOG if quiet else None
            context = runner.StageContext(rep.run.data_yaml, run_dir, hooks, log_file, rep.run.resumed_at is not None)
            result = runner.run(current.plan, context, previous=previous, before_stage=before_stage, on_progress=save)
    except KeyboardInterrupt as exc:  # between stages (scoring, latency): inside one, the stage saves its epoch first
        if owner and current.run is not None:
            stopped = getattr(exc, "signal_name", "SIGINT")
            run = replace(
                current.run, status="interrupted", interrupted=True, stopped_by=stopped, finished_at=utc_now()
            )
            replace(current.with_results(current.results(), None), run=run).to_json(path)
        raise
    final = current.finished(result)
    if not owner:
        return final, path
    final.to_json(path)
    try:
        final.save_png(run_dir / render.PNG_NAME)
    except Exception as exc:  # the picture is a convenience: its failure must not hide a finished run's report
        log(f"could not draw {render.PNG_NAME} ({type(exc).__name__}: {exc}); the JSON report is complete")
    return final, path


@contextlib.contextmanager
def _sigterm_interrupts(active: bool) -> Iterator[None]:
    """SIGTERM raises Terminated while the run is outside a stage (Python's default would end the process with the
    report still saying "running"); a stage's own handler, installed over this one, finishes its epoch first."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Terminated

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


CHECKPOINT_ROOM_GB = 1.0  # checkpoints, results.csv and plots of a run; a yolo26n checkpoint is about 5.5 MB


def _check_disk(planned: Planned, project: Path) -> None:
    """Refuse to start a run that cannot fit its checkpoints (and disk cache) on the disk."""
    disk_cache = any(s.cache == "disk" for s in planned.plan.stages)
    need = CHECKPOINT_ROOM_GB + (planned.stats.decoded_gb(None) if disk_cache else 0.0)
    remedy = "checkpoints and the disk image cache: try --cache none or free some space"
    check_free_disk(project, need, "the run", remedy if disk_cache else "checkpoints: free some space")


def check_model(requested: str | None) -> None:
    """Refuse a --model file that cannot be a YOLO model, with what was found, before any work (no import)."""
    if not requested:
        return
    path = Path(requested)
    if not path.exists():
        return  # a model name (yolo26n, yolo11s.yaml) that Ultralytics resolves; resolve_model checks it
    if path.is_dir():
        raise UsageError(f"{said('model', requested)}: a folder; expected a .pt checkpoint or a model .yaml file")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        with path.open("rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip, or a legacy pickle
            found = "an empty file" if not head else "text" if head.isascii() else f"bytes {head.hex()}"
            raise UsageError(
                f"{said('model', requested)}: not a PyTorch checkpoint (found {found}); expected a YOLO .pt"
            )
    elif suffix in (".yaml", ".yml"):
        try:
            cfg = load_yaml(path)
        except DatasetError as exc:
            raise UsageError(f"{said('model', exc)}") from None
        if not isinstance(cfg, dict) or not {"backbone", "head"} <= set(cfg):
            raise UsageError(f"{said('model', requested)}: not a YOLO model yaml (no backbone: and head: sections)")
    else:
        raise UsageError(
            f"{said('model', requested)}: a {suffix or 'suffix-less'} file; expected a .pt checkpoint or a model .yaml"
        )


@dataclass(frozen=True, slots=True)
class TrainRequest:
    """What a training run was asked for: the dataset (None: the embedded sample), the plan's overrides and
    Ultralytics arguments (`extra`, as the yolo command line writes them), the run folder PROJECT/NAME, whether to
    tune first (`retune`: measure again even where a tune is cached) within `budget_s`, whether the dataset's
    download script may run, and whether Ultralytics' own output goes to the run's log file (`quiet`)."""

    dataset: str | os.PathLike[str] | None
    overrides: Overrides
    extra: tuple[str, ...] = ()
    project: str | os.PathLike[str] = DEFAULT_PROJECT
    name: str = "train"
    autotune: bool = False
    retune: bool = False
    budget_s: float = 90.0
    allow_download: bool = False
    quiet: bool = False

    @property
    def tunes(self) -> bool:
        return self.autotune or self.retune


def train(request: TrainRequest, hooks: Hooks = Hooks()) -> SpeedReport:
    """A whole training run: plan, prepare the dataset when planned, tune when asked, then train here, as
    speedtrain's own ranks (several GPUs, --nproc-per-node), or as one rank of a launcher's group (torchrun, srun)."""
    r = request
    check_run_folder(r.project, r.name)
    world = distributed.world()
    if world is not None:  # torchrun, srun or another launcher started this process as one rank of several
        return _train_as_rank(world, r, hooks)
    planned = make_plan(r.dataset, r.overrides, r.extra, None, r.allow_download)
    check_ultralytics_args(planned)  # before the resized copy or a tune's files exist, as before the run folder
    if planned.plan.prepare_size:
        with hooks.progress_of(f"resizing to {planned.plan.prepare_size} px") as resized:
            planned = prepare_dataset(planned, Path(r.project), resized)
        hooks.event("prepared", planned.prepared)
    if r.tunes:
        planned, tuned = autotune(planned, Path(r.project), budget_s=r.budget_s, retune=r.retune, log=hooks.log)
        hooks.event("tuned", tuned)
    hooks.event("planned", SpeedReport.of(planned))
    if planned.plan.ranks > 1:  # several GPUs (or --nproc-per-node): speedtrain starts one rank each
        _, run_dir = start(planned, r.project, r.name, hooks.log)
        return launch.run(run_dir, planned.plan.ranks, quiet=r.quiet, log=hooks.log)
    return execute(planned, r.project, r.name, hooks=hooks, quiet=r.quiet)[0]


def _train_as_rank(world: World, r: TrainRequest, hooks: Hooks) -> SpeedReport:
    """One rank under an external launcher: rank 0 plans (for the launcher's WORLD_SIZE), prepares and starts the
    run folder while the others wait; then every rank trains its shard. The others' errors name rank 0's."""
    from speedtrain import ultra  # Ultralytics first, then the group

    ultra.join_group(distributed.rank_device(str(r.overrides.device or "")))
    try:
        # every node probes itself (its local rank 0); rank 0 plans for the weakest
        mine = hardware.probe(existing_parent(Path(r.project))) if world.local_rank == 0 else None
        machine = hardware.weakest([s for s in distributed.gather(mine) if s is not None])
        outcome: tuple[str, Any] = ("error", None)
        restarted = distributed.restarted_run(Path(r.project)) if world.leader else None
        if restarted is not None:  # torchrun --max-restarts started the group again: go on with its run
            outcome = ("resume", str(restarted))
        elif world.leader:
            try:
                # the launcher's ranks on this node, and in all
                ours = replace(r.overrides, nproc_per_node=world.local_size, world=world.size)
                planned = make_plan(r.dataset, ours, r.extra, machine, r.allow_download)
                if planned.plan.prepare_size:
                    planned = prepare_dataset(planned, Path(r.project))
                if r.tunes:
                    planned, _ = autotune(planned, Path(r.project), budget_s=r.budget_s, retune=r.retune, log=hooks.log)
                hooks.event("planned", SpeedReport.of(planned))
                run_dir = start(planned, r.project, r.name, hooks.log)[1]
                distributed.remember_run(Path(r.project), run_dir)
                outcome = ("run", str(run_dir))
            except SpeedtrainError as exc:
                outcome = ("error", exc)
        outcome = distributed.broadcast(outcome)
        if outcome[0] == "error":
            raise outcome[1] if world.leader else PeerFailed(f"rank 0 could not start the run: {outcome[1]}")
        mine_hooks = hooks if world.leader else hooks.silent()
        return run_as_rank(outcome[1], resuming=outcome[0] == "resume", hooks=mine_hooks, quiet=r.quiet)[0]
    finally:
        distributed.leave()


def resume_run(run_dir: str | os.PathLike[str], *, quiet: bool = False, hooks: Hooks = Hooks()) -> SpeedReport:
    """Go on with an interrupted or killed run from its last saved epoch, with as many ranks as it trained with:
    here, as speedtrain's own ranks, or as this rank of a launcher's group."""
    world = distributed.world()
    if world is not None:
        from speedtrain import ultra  # Ultralytics first, then the group

        ultra.join_group(distributed.rank_device(SpeedReport.from_json(Path(run_dir)).plan.device))
        try:
            mine = hooks if world.leader else hooks.silent()
            return run_as_rank(run_dir, resuming=True, hooks=mine, quiet=quiet)[0]
        finally:
            distributed.leave()
    planned_run = SpeedReport.from_json(Path(run_dir)).plan
    ranks, gpus = planned_run.ranks, len(planned_run.stages[0].gpu_ids)
    if ranks > 1 and gpus and ranks > gpus:
        instead = (
            "speedtrain.resume(RUN_DIR) in place of its speedtrain.train(...) call"
            if voice() == "api"
            else "`train --resume RUN_DIR` in place of its flags"
        )
        raise UsageError(
            f"{run_dir}: this run trained as {ranks} ranks across nodes; go on with the launcher command that "
            f"started it (torchrun or srun on every node), with {instead}"
        )
    if ranks > 1:
        check_resumable(run_dir)
        return launch.run(Path(run_dir).absolute(), ranks, resuming=True, quiet=quiet, log=hooks.log)
    return resume(run_dir, hooks=hooks, quiet=quiet)[0]


def tune(
    dataset_path: str | os.PathLike[str] | None,
    overrides: Overrides,
    extra: tuple[str, ...] = (),
    *,
    project: str | os.PathLike[str] = DEFAULT_PROJECT,
    budget_s: float = 90.0,
    retune: bool = False,
    log: Log = lambda _: None,
) -> TuneResult:
    """`speedtrain tune`: the plan's main stage measured (no fine-tune, no resize), or its cached measurement."""
    planned = make_plan(dataset_path, replace(overrides, finetune="no", prepare="no"), extra)
    return autotune(planned, Path(project), budget_s=budget_s, retune=retune, log=log)[1]
