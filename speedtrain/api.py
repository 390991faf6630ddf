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
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speedtrain import comparison as compare_mod
from speedtrain import dataset as dataset_mod
from speedtrain import hardware, knobs, planner, resize, ultra_args, workflow
from speedtrain.dataset import Problem
from speedtrain.errors import UsageError
from speedtrain.hardware import HardwareSnapshot
from speedtrain.knobs import Overrides
from speedtrain.parallel import Progress
from speedtrain.records import (
    Hooks,
    Planned,
    ResizeSummary,
    TuneResult,
    silent,
)
from speedtrain.speedreport import SpeedReport
from speedtrain.util import closest

if TYPE_CHECKING:
    from typing_extensions import Unpack  # PEP 692: typing.Unpack from Python 3.11; read by type checkers only

    from speedtrain.comparison import Comparison
    from speedtrain.keywords import CompareKeywords, Keywords

PathLike = str | os.PathLike[str]
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
    **args: Unpack[Keywords],
) -> SpeedReport:
    """The training plan for `dataset` (the embedded sample when None) on this machine, or on the machine of a
    saved snapshot `hardware`: a SpeedReport with no run, which renders as the plan table with its reasons.
    `extra`: Ultralytics arguments as the yolo command line writes them ("mosaic=0.5")."""
    with process_state_restored():
        return SpeedReport.of(_planned(dataset, args, extra, hardware, allow_download))


def prepare(
    dataset: PathLike,
    size: int = 416,
    out: PathLike | None = None,
    *,
    workers: int | None = None,
    quality: int | str = "auto",
    in_place: bool = False,
    progress: Progress | None = None,
) -> ResizeSummary:
    """Write a copy of `dataset` with images resized to `size` on the long side (labels copied); the summary.

    quality: the JPEG/WebP quality of the copies, 1-100, or "auto": 95, or for a JPEG stored at a lower quality 15
    above its own and at least 85, so that the copy is not larger than its source."""
    if size < 32:
        raise UsageError(f"size {size}: a long side of at least 32 px")
    with process_state_restored():
        stats = workflow.scan_dataset(dataset)
        return resize.resize_dataset(
            stats,
            size,
            Path(out) if out else None,
            workers=workers,
            quality=quality,
            in_place=in_place,
            progress=progress,
        )


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
    hooks: Hooks | None = None,
    extra: Sequence[str] = (),
    **args: Unpack[Keywords],
) -> TuneResult:
    """Measure the model's step rate per batch and the dataloader's per workers and cache; the fastest setting.
    `hooks.log` receives its lines (printed when left out)."""
    if budget_s < 5:
        raise UsageError(f"budget_s {budget_s}: at least 5 seconds")
    refuse_external_launcher()
    with process_state_restored():
        ov = overrides(args)
        return workflow.tune(
            dataset, ov, tuple(extra), project=project, budget_s=budget_s, retune=retune, log=_heard(hooks).log
        )


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
    hooks: Hooks | None = None,
    extra: Sequence[str] = (),
    **args: Unpack[Keywords],
) -> SpeedReport:
    """Plan and train `dataset` (the embedded sample when None), prepare and tune as planned or asked; return the
    SpeedReport (also written to PROJECT/NAME/speed_report.json with its PNG).

    `verbose=False` sends Ultralytics' own output to the run folder's ultralytics.log. `hooks` (a speedtrain.Hooks)
    is what the caller hears and answers: `log` receives speedtrain's progress lines (printed when left out);
    `on_update` each stage's progress after every batch; `ask` decides a `finetune="ask"` stage (True, False, or
    None: decided as `finetune="auto"`, the default, decides); `on_event(kind, value)` hears "prepared" (a
    Preparation), "tuned" (a TuneResult) and "planned" (the SpeedReport about to run); `progress(label)` makes the
    context that reports the resize's (done, total).
    """
    hooks = _heard(hooks)
    with process_state_restored():
        request = workflow.TrainRequest(
            dataset,
            overrides(args),
            tuple(extra),
            project,
            name,
            autotune,
            retune,
            budget_s,
            allow_download,
            quiet=not verbose,
        )
        return workflow.train(request, hooks)


def compare(
    dataset: PathLike | None = None,
    *,
    budget: str | float = "20m",
    arms: str | Sequence[str] = ("defaults", "plan"),
    baseline_budget: str | float | None = None,
    val_imgsz: int | None = None,
    baseline_imgsz: int | None = None,
    seed: int = 0,
    project: PathLike = workflow.DEFAULT_PROJECT,
    name: str = "compare",
    verbose: bool = True,
    hooks: Hooks | None = None,
    extra: Sequence[str] = (),
    **args: Unpack[CompareKeywords],
) -> Comparison:
    """Train each arm (plain Ultralytics "defaults", speedtrain's "plan", and variants) on `dataset` for the
    wall-clock `budget` each ("20m", "90s", or seconds; the defaults arm for `baseline_budget`, default 3x `budget`:
    the accuracy plain Ultralytics reaches given time is the target), validate every saved epoch the same way, and
    return the Comparison: per-arm table, mAP-over-time curves, time to the defaults' accuracy and the same at equal
    time (also PROJECT/NAME/compare.json and .png).
    `val_imgsz` is the size every curve is validated at (default: the baseline's size, Ultralytics' 640 unless
    `baseline_imgsz` says otherwise); `**args` shape the plan as for train(), and `hooks` as for train() (its
    `log` and `on_update`)."""

    budget_s, names = compare_mod.parse_budget(budget), compare_mod.parse_arms(arms)
    baseline_s = None if baseline_budget is None else compare_mod.parse_budget(baseline_budget, "baseline_budget")
    refuse_external_launcher()
    with process_state_restored():
        request = compare_mod.CompareRequest(
            dataset,
            overrides(args),
            tuple(extra),
            names,
            budget_s,
            val_imgsz,
            baseline_imgsz,
            seed,
            project,
            name,
            quiet=not verbose,
            baseline_budget_s=baseline_s,
        )
        return compare_mod.compare(request, _heard(hooks))


def resume(
    run_dir: PathLike,
    *,
    verbose: bool = True,
    hooks: Hooks | None = None,
) -> SpeedReport:
    """Go on with an interrupted or killed run from its last saved epoch; the finished SpeedReport. `hooks` as for
    train() (its `log`, `on_update` and `ask`).

    A run of several ranks goes on with as many (speedtrain starts them; under a launcher, this process is one)."""
    with process_state_restored():
        return workflow.resume_run(run_dir, quiet=not verbose, hooks=_heard(hooks))


def report(run_dir: PathLike) -> SpeedReport:
    """A run's SpeedReport, read from its folder (or its speed_report.json)."""
    return SpeedReport.from_json(Path(run_dir))


def overrides(args: Mapping[str, Any]) -> Overrides:
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
                raise UsageError(
                    f"{key}= is not a keyword of speedtrain nor an Ultralytics train argument; did you "
                    f"mean {' or '.join(c + '=' for c in close)}?"
                )
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
    args: Mapping[str, Any],
    extra: Sequence[str] = (),
    hardware_file: PathLike | HardwareSnapshot | None = None,
    allow_download: bool = False,
    world: int | None = None,
) -> Planned:
    ov = dataclasses.replace(overrides(args), world=world)
    return workflow.make_plan(dataset, ov, tuple(extra), hardware_file, allow_download)


def _print(message: str) -> None:
    print(f"speedtrain: {message}", flush=True)


def _heard(hooks: Hooks | None) -> Hooks:
    """The caller's hooks, with speedtrain's lines printed where they give no `log`."""
    if hooks is None:
        return Hooks(log=_print)
    return dataclasses.replace(hooks, log=_print) if hooks.log is silent else hooks


SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)


@contextlib.contextmanager
def process_state_restored() -> Iterator[None]:
    """Environment variables, signal handlers and torch's thread count as they were, after the block; messages
    worded for Python (keywords, not flags: knobs.said) unless the command line is calling."""
    environ = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in SIGNALS} if _main_thread() else {}
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    voice = knobs.VOICE.set(knobs.VOICE.get() or "api")
    os.environ[knobs.VOICE_ENV] = knobs.voice()  # the run's ranks word their messages alike
    try:
        yield
    finally:
        knobs.VOICE.reset(voice)
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


def _main_thread() -> bool:

    return threading.current_thread() is threading.main_thread()
