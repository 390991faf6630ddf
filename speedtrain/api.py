"""speedtrain's Python API: `import speedtrain`, then probe, plan, prepare, check, tune, train, resume, report.

Keyword names are the CLI's (`epochs`, `batch`, `imgsz`, `workers`, `cache`, `device`, `finetune`, ...), which are
Ultralytics' own where Ultralytics has the argument; any other Ultralytics train argument (`mosaic=0.5`,
`seed=1`) passes through, checked against Ultralytics' names and types first. Errors are SpeedtrainError
subclasses; nothing here exits the process. Each call leaves the process as it found it: environment variables
(Ultralytics sets some when it is imported), signal handlers, torch's thread count and Ultralytics' analytics
switch are restored when it returns, so a notebook can call it again or go on with plain Ultralytics.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speedtrain import dataset as dataset_mod
from speedtrain import distributed, hardware, knobs, launch, planner, resize, ultra_args, workflow
from speedtrain.dataset import Problem
from speedtrain.errors import PeerFailed, SpeedtrainError, UsageError
from speedtrain.hardware import HardwareSnapshot
from speedtrain.knobs import Overrides
from speedtrain.parallel import Progress
from speedtrain.records import OnProgress, Planned, ResizeSummary, StageResult, TuneResult
from speedtrain.speedreport import SpeedReport
from speedtrain.util import check_free_disk, closest, existing_parent

if TYPE_CHECKING:
    from speedtrain.comparison import Comparison

PathLike = str | os.PathLike[str]
Log = Callable[[str], None]
OnEvent = Callable[[str, Any], None]
ProgressFactory = Callable[[str], contextlib.AbstractContextManager[Progress | None]]
CHOICES = {k.name: k.choices for k in knobs.KNOBS if k.choices}  # declared once, in speedtrain/knobs.py
OVERRIDES = frozenset(k.name for k in knobs.KNOBS)


def probe(path: PathLike = ".") -> HardwareSnapshot:
    """This machine's GPUs (NVML), RAM, cores, /dev/shm and the free disk where `path` lives."""
    with process_state_restored():
        return hardware.probe(Path(path))


def plan(
    dataset: PathLike | None = None,
    *,
    hardware: PathLike | HardwareSnapshot | None = None,
    allow_download: bool = False,
    extra: Sequence[str] = (),
    **args: Any,
) -> SpeedReport:
    """The training plan for `dataset` (the embedded sample when None) on this machine, or on the machine of a
    saved snapshot `hardware`: a SpeedReport with no run, which renders as the plan table with its reasons.
    `extra`: Ultralytics arguments as the yolo command line writes them ("mosaic=0.5")."""
    with process_state_restored():
        return _planned(dataset, args, extra, hardware, allow_download).report()


def prepare(
    dataset: PathLike,
    size: int = 416,
    out: PathLike | None = None,
    *,
    workers: int | None = None,
    quality: int = 95,
    in_place: bool = False,
    progress: Progress | None = None,
) -> ResizeSummary:
    """Write a copy of `dataset` with images resized to `size` on the long side (labels copied); the summary."""
    if size < 32:
        raise UsageError(f"size {size}: a long side of at least 32 px")
    with process_state_restored():
        stats = workflow.scan_dataset(dataset)
        return resize.resize_dataset(
            stats, size, Path(out) if out else None, workers=workers, quality=quality, in_place=in_place,
            progress=progress,
        )  # fmt: skip


def check(dataset: PathLike, *, workers: int | None = None, progress: Progress | None = None) -> tuple[Problem, ...]:
    """Every image decoded and every label read: the problems found (empty when the dataset is clean)."""
    with process_state_restored():
        return dataset_mod.check(dataset_mod.scan(Path(dataset)), workers, progress)


def tune(
    dataset: PathLike | None = None,
    *,
    project: PathLike = workflow.DEFAULT_PROJECT,
    budget_s: float = 90.0,
    retune: bool = False,
    log: Log | None = None,
    extra: Sequence[str] = (),
    **args: Any,
) -> TuneResult:
    """Measure the model's step rate per batch and the dataloader's per workers and cache; the fastest setting."""
    if budget_s < 5:
        raise UsageError(f"budget_s {budget_s}: at least 5 seconds")
    args = {"finetune": "no", "prepare": "no", **args}
    refuse_external_launcher()
    with process_state_restored():
        planned = _planned(dataset, args, extra)
        return workflow.autotune(planned, Path(project), budget_s=budget_s, retune=retune, log=log or _print)[1]


def train(
    dataset: PathLike | None = None,
    *,
    project: PathLike = workflow.DEFAULT_PROJECT,
    name: str = "train",
    autotune: bool = False,
    retune: bool = False,
    budget_s: float = 90.0,
    allow_download: bool = False,
    verbose: bool = True,
    log: Log | None = None,
    on_update: OnProgress | None = None,
    ask: Callable[[StageResult], bool | None] | None = None,
    on_event: OnEvent | None = None,
    progress: ProgressFactory | None = None,
    extra: Sequence[str] = (),
    **args: Any,
) -> SpeedReport:
    """Plan and train `dataset` (the embedded sample when None), prepare and tune as planned or asked; return the
    SpeedReport (also written to PROJECT/NAME/speed_report.json with its PNG).

    `verbose=False` sends Ultralytics' own output to the run folder's ultralytics.log; `log` receives speedtrain's
    progress lines (printed when None); `on_update` each stage's progress after every batch; `ask` decides a
    `finetune="ask"` stage (True, False, or None: decided as `finetune="auto"`, the default, decides).
    `on_event(kind, value)` hears "prepared" (a Preparation), "tuned" (a TuneResult) and "planned" (the SpeedReport
    about to run); `progress(label)` makes the context that reports the resize's (done, total).
    """
    log, on_event = log or _print, on_event or (lambda _kind, _value: None)
    world = distributed.world()
    with process_state_restored():
        workflow.check_run_folder(project, name)
        if world is not None:  # torchrun, srun or another launcher started this process as one rank of several
            return _train_as_rank(world, dataset, project, name, args, extra, allow_download, verbose, log,
                                  on_event, autotune or retune, retune, budget_s)  # fmt: skip
        planned = _planned(dataset, args, extra, None, allow_download)
        if planned.plan.prepare_size:
            with (progress or _no_progress)(f"resizing to {planned.plan.prepare_size} px") as resized:
                planned = workflow.prepare_dataset(planned, Path(project), resized)
            on_event("prepared", planned.prepared)
        if autotune or retune:
            planned, tuned = workflow.autotune(planned, Path(project), budget_s=budget_s, retune=retune, log=log)
            on_event("tuned", tuned)
        on_event("planned", planned.report())
        if planned.plan.ranks > 1:  # several GPUs (or --nproc-per-node): speedtrain starts one rank each
            _, run_dir = workflow.start(planned, project, name, log)
            return launch.run(run_dir, planned.plan.ranks, quiet=not verbose, log=log)
        rep, _ = workflow.execute(planned, project, name, ask=ask, log=log, on_update=on_update, quiet=not verbose)
        return rep


def _train_as_rank(
    world: distributed.World,
    dataset: PathLike | None,
    project: PathLike,
    name: str,
    args: dict[str, Any],
    extra: Sequence[str],
    allow_download: bool,
    verbose: bool,
    log: Log,
    on_event: OnEvent,
    tune: bool,
    retune: bool,
    budget_s: float,
) -> SpeedReport:
    """One rank under an external launcher: rank 0 plans (for the launcher's WORLD_SIZE), prepares and starts the
    run folder while the others wait; then every rank trains its shard. The others' errors name rank 0's."""
    from speedtrain import ultra  # Ultralytics first, then the group

    ultra.join_group(distributed.rank_device(str(args.get("device") or "")))
    try:
        # every node probes itself (its local rank 0); rank 0 plans for the weakest
        mine = hardware.probe(existing_parent(Path(project))) if world.local_rank == 0 else None
        machine = hardware.weakest([s for s in distributed.gather(mine) if s is not None])
        outcome: tuple[str, Any] = ("error", None)
        restarted = distributed.restarted_run(Path(project)) if world.leader else None
        if restarted is not None:  # torchrun --max-restarts started the group again: go on with its run
            outcome = ("resume", str(restarted))
        elif world.leader:
            try:
                local = {"nproc_per_node": world.local_size}  # the launcher's ranks on this node
                planned = _planned(dataset, {**args, **local}, extra, machine, allow_download, world=world.size)
                if planned.plan.prepare_size:
                    planned = workflow.prepare_dataset(planned, Path(project))
                if tune:
                    planned, _ = workflow.autotune(planned, Path(project), budget_s=budget_s, retune=retune, log=log)
                on_event("planned", planned.report())
                run_dir = workflow.start(planned, project, name, log)[1]
                distributed.remember_run(Path(project), run_dir)
                outcome = ("run", str(run_dir))
            except SpeedtrainError as exc:
                outcome = ("error", exc)
        outcome = distributed.broadcast(outcome)
        if outcome[0] == "error":
            raise outcome[1] if world.leader else PeerFailed(f"rank 0 could not start the run: {outcome[1]}")
        rep, _ = workflow.run_as_rank(outcome[1], resuming=outcome[0] == "resume",
                                      log=log if world.leader else _silent, quiet=not verbose)  # fmt: skip
        return rep
    finally:
        distributed.leave()


def _silent(_line: str) -> None:
    pass


def compare(
    dataset: PathLike | None = None,
    *,
    budget: str | float = "20m",
    arms: str | Sequence[str] = ("defaults", "plan"),
    val_imgsz: int | None = None,
    baseline_imgsz: int | None = None,
    seed: int = 0,
    project: PathLike = workflow.DEFAULT_PROJECT,
    name: str = "compare",
    verbose: bool = True,
    log: Log | None = None,
    on_update: OnProgress | None = None,
    extra: Sequence[str] = (),
    **args: Any,
) -> Comparison:
    """Train each arm (plain Ultralytics "defaults", speedtrain's "plan", and variants) on `dataset` for the same
    wall-clock `budget` each ("20m", "90s", or seconds), validate every saved epoch the same way, and return the
    Comparison: per-arm table, mAP-over-time curves and time to accuracy (also PROJECT/NAME/compare.json and .png).
    `val_imgsz` is the size every curve is validated at (default: the baseline's size, Ultralytics' 640 unless
    `baseline_imgsz` says otherwise); `**args` shape the plan as for train()."""
    from speedtrain import comparison as compare_mod

    budget_s = compare_mod.parse_budget(budget)
    names = compare_mod.parse_arms(arms)
    log = log or _print
    refuse_external_launcher()
    with process_state_restored():
        workflow.check_run_folder(project, name)
        planned = _planned(dataset, {**args, "finetune": "yes"}, extra)
        from speedtrain import ultra

        defaults = ultra.defaults()
        workflow.check_ultralytics_args(planned)
        base_size = baseline_imgsz or int(defaults["imgsz"])
        need = len(names) * workflow.CHECKPOINT_ROOM_GB  # each arm's checkpoints (saved epochs go once scored)
        check_free_disk(Path(project), need, f"comparing {len(names)} arms", "free some space")
        run_dir = workflow.new_run_dir(project, name)
        log(f"run folder: {run_dir}")
        prepared, original_yaml, prepared_yaml, prepare_s = compare_mod.prepare_views(planned, Path(project))
        arm_list = compare_mod.arms_for(prepared.plan, names, defaults, base_size)
        return compare_mod.run(
            prepared, arm_list, budget_s, run_dir, original_yaml=original_yaml, prepared_yaml=prepared_yaml,
            prepare_s=prepare_s, val_imgsz=val_imgsz or base_size, seed=seed, log=log, on_update=on_update,
            log_file=None if verbose else run_dir / workflow.ULTRALYTICS_LOG,
        )  # fmt: skip


def resume(
    run_dir: PathLike,
    *,
    verbose: bool = True,
    log: Log | None = None,
    on_update: OnProgress | None = None,
    ask: Callable[[StageResult], bool | None] | None = None,
) -> SpeedReport:
    """Go on with an interrupted or killed run from its last saved epoch; the finished SpeedReport.

    A run of several ranks goes on with as many (speedtrain starts them; under a launcher, this process is one)."""
    log = log or _print
    world = distributed.world()
    with process_state_restored():
        if world is not None:
            from speedtrain import ultra  # Ultralytics first, then the group

            ultra.join_group(distributed.rank_device(SpeedReport.from_json(Path(run_dir)).plan.device))
            try:
                return workflow.run_as_rank(run_dir, resuming=True, log=log if world.leader else _silent,
                                            quiet=not verbose)[0]  # fmt: skip
            finally:
                distributed.leave()
        planned_run = SpeedReport.from_json(Path(run_dir)).plan
        ranks, gpus = planned_run.ranks, len(planned_run.stages[0].gpu_ids)
        if ranks > 1 and gpus and ranks > gpus:
            raise UsageError(
                f"{run_dir}: this run trained as {ranks} ranks across nodes; go on with the launcher command that "
                "started it (torchrun or srun on every node), with `train --resume RUN_DIR` in place of its flags"
            )
        if ranks > 1:
            workflow.check_resumable(run_dir)
            return launch.run(Path(run_dir).absolute(), ranks, resuming=True, quiet=not verbose, log=log)
        rep, _ = workflow.resume(run_dir, ask=ask, log=log, on_update=on_update, quiet=not verbose)
        return rep


def report(run_dir: PathLike) -> SpeedReport:
    """A run's SpeedReport, read from its folder (or its speed_report.json)."""
    return SpeedReport.from_json(Path(run_dir))


def overrides(args: dict[str, Any]) -> Overrides:
    """Overrides from keyword arguments named like the CLI's options; any other name must be an Ultralytics train
    argument of the right type (those go to Ultralytics as given)."""
    bad = {k: v for k, v in args.items() if k in CHOICES and v is not None and v not in CHOICES[k]}
    for key, value in bad.items():
        raise UsageError(f"{key}={value!r}: expected one of {', '.join(CHOICES[key])}")
    picked = {k: v for k, v in args.items() if k in OVERRIDES}
    rest = {k: v for k, v in args.items() if k not in OVERRIDES}
    extra: tuple[tuple[str, Any], ...] = ()
    if rest:  # Ultralytics' argument names and types, read without importing it
        known = ultra_args.defaults()
        for key in rest:
            close = closest(key, OVERRIDES) if key not in known and key not in planner.RESERVED_ARGS else []
            if close:  # a mistyped keyword of speedtrain's own
                raise UsageError(f"{key}= is not a keyword of speedtrain nor an Ultralytics train argument; did you "
                                 f"mean {' or '.join(c + '=' for c in close)}?")  # fmt: skip
        extra = planner.check_extra_args(rest, known)
    return Overrides(**picked, extra=extra)


def refuse_external_launcher() -> None:
    """tune and compare measure one process: under torchrun, srun or another launcher with several processes,
    refuse in one line (WORLD_SIZE 1 is fine); train and resume run as ranks."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.strip().isdigit() and int(world) > 1:
        raise UsageError(
            f"started as rank {os.environ.get('RANK', '?')} of {world} by a launcher (torchrun or srun set "
            "WORLD_SIZE): tune and compare measure a single process; run them once, without the launcher "
            "(`speedtrain train` runs as a rank)"
        )


def _planned(
    dataset: PathLike | None,
    args: dict[str, Any],
    extra: Sequence[str] = (),
    hardware_file: PathLike | HardwareSnapshot | None = None,
    allow_download: bool = False,
    world: int | None = None,
) -> Planned:
    ov = dataclasses.replace(overrides(args), world=world)
    return workflow.make_plan(dataset, ov, tuple(extra), hardware_file, allow_download)


@contextlib.contextmanager
def _no_progress(_label: str) -> Iterator[Progress | None]:
    yield None


def _print(message: str) -> None:
    print(f"speedtrain: {message}", flush=True)


SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)


@contextlib.contextmanager
def process_state_restored() -> Iterator[None]:
    """Environment variables, signal handlers and torch's thread count as they were, after the block; an error's
    hints in the API's words (keywords, not flags) unless the command line is calling."""
    environ = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in SIGNALS} if _main_thread() else {}
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    except SpeedtrainError as exc:
        if not CLI_VOICE.get() and exc.args:
            exc.args = (in_api_words(str(exc.args[0])), *exc.args[1:])
        raise
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        for sig, handler in handlers.items():
            if signal.getsignal(sig) is not handler and handler is not None:
                signal.signal(sig, handler)
        if threads is not None and torch is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


# Messages name the CLI's flags; called from Python, a hint names the keyword instead (`finetune="yes"`, not
# `--finetune yes`). The CLI sets this for the calls it makes.
CLI_VOICE: contextvars.ContextVar[bool] = contextvars.ContextVar("speedtrain_cli_voice", default=False)
FLAG_KEYWORDS = {k.flag: k.name for k in knobs.KNOBS if k.flag != "--" + k.name.replace("_", "-")}
FLAG_KEYWORDS["--dataset"] = "the dataset argument"
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(?:[ =]((?!--)[^\s;:,)]+))?")


def in_api_words(message: str) -> str:
    """A message's flags as the API's keywords: "--finetune yes" becomes finetune='yes', "--resume DIR"
    speedtrain.resume('DIR')."""

    def keyword(m: re.Match[str]) -> str:
        flag, value = f"--{m.group(1)}", m.group(2)
        if flag == "--resume":
            return f"speedtrain.resume({value!r})" if value else "speedtrain.resume()"
        key = FLAG_KEYWORDS.get(flag, m.group(1).replace("-", "_"))
        if value is None:
            return f"{key}=True" if key in BOOLEAN_KEYWORDS else key
        try:
            float(value)
        except ValueError:
            return f"{key}={value!r}"
        return f"{key}={value}"

    return _FLAG.sub(keyword, message)


BOOLEAN_KEYWORDS = {"allow_download", "autotune", "retune", "verbose", "in_place"} | {
    k.name for k in knobs.KNOBS if k.type is bool
}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
