"""The `speedtrain` command line: flags in, one library call, rich output; errors become one line and an exit code."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import inspect
import json
import os
import re
import select
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from typer._click.exceptions import UsageError as ClickUsageError
from typer.core import TyperCommand, TyperGroup

from speedtrain import api, distributed, hardware, knobs, planner, render, ultra_args, workflow
from speedtrain import dataset as dataset_mod
from speedtrain.errors import DatasetError, PeerFailed, SpeedtrainError, Terminated, UsageError
from speedtrain.records import DatasetSummary, Hooks, OnProgress, StageProgress, StageResult
from speedtrain.speedreport import REPORT_NAME, SpeedReport
from speedtrain.util import closest, plain_streams


class _Console(Console):
    """Rich output on a terminal; plain ASCII (no colours, no box-drawing characters) in logs and pipes."""

    @property
    def encoding(self) -> str:
        return super().encoding if self.is_terminal else "ascii"


console = _Console(highlight=False)
err_console = _Console(stderr=True, highlight=False)


class _Commands(TyperGroup):
    """The one place where a SpeedtrainError becomes one line on stderr and its exit code."""

    def invoke(self, ctx: Any) -> Any:
        voice = knobs.VOICE.set("cli")  # the library's messages name flags
        try:
            with _stop_signals_interrupt():
                return super().invoke(ctx)
        except PeerFailed as exc:  # one rank of several: the rank that failed first says why
            raise typer.Exit(exc.exit_code) from None
        except SpeedtrainError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except ClickUsageError as exc:  # a bad flag value, a missing option, an unknown command: one line too
            err_console.print(f"[bold red]error:[/] {usage_line(exc)}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.filename is not None or exc.errno not in OUTPUT_FAILED:
                raise
            _quiet_stdout()  # what is left in its buffer must not fail again at exit
            err_console.print(
                f"[bold red]error:[/] cannot write to standard output ({exc.strerror}): the disk "
                "under it is full, or it was closed",
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            what = {
                "train": "a training run goes on with --resume RUN_DIR (its folder is above)",
                "prepare": "the images finished so far are kept; run the same prepare again to complete the copy",
                "check": "nothing was changed; run check again",
                "tune": "nothing was cached; run tune again",
                "compare": "compare.json in the run folder keeps the arms that finished; run compare again",
            }.get(ctx.invoked_subcommand or "", "nothing was changed")
            by = getattr(exc, "signal_name", "")
            err_console.print(f"[bold red]interrupted[/]{f' by {by}' if by else ''}: {what}", soft_wrap=True)
            raise typer.Exit(EXIT_BY_SIGNAL.get(by, 130)) from None
        finally:
            knobs.VOICE.reset(voice)


EXIT_BY_SIGNAL = {"SIGTERM": 143, "SIGHUP": 129}  # 128 + the signal's number, what shells and schedulers expect
# an output that cannot be written: a full disk or quota (> file), a closed pipe (| head), a closed descriptor
OUTPUT_FAILED = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EPIPE, errno.EBADF, errno.EIO}


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush of it cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, `timeout`, CI) and SIGHUP (a closed terminal) end a command as Ctrl-C does: cleanly,
    its worker processes stopped, one line and 143 or 129, instead of Python's default of dying at once and leaving
    them behind. A training stage installs its own handler over this one (it finishes its epoch first)."""

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        exc = Terminated()
        exc.signal_name = signal.Signals(signum).name
        raise exc

    wanted = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    before = {s: signal.signal(s, stop) for s in wanted}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


app = typer.Typer(
    cls=_Commands,
    name="speedtrain",
    help="Plan and run fast Ultralytics YOLO training for this machine, and report how fast it went.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    add_completion=False,
    # click's own help layout: rich's option panel truncates long flag names at 80 columns ("--batch-size,--b…")
    rich_markup_mode=None,
)


def usage_line(exc: ClickUsageError) -> str:
    """click's message for a bad flag value in one line, with the closest valid choice and where help is."""

    message = " ".join(exc.format_message().split()).replace("Value error, ", "")  # click's word for a bad choice
    found = re.search(r"'([^']*)' is not one of ((?:'[^']*'(?:, )?)+)", message)
    if found:
        close = closest(found.group(1), re.findall(r"'([^']*)'", found.group(2)))
        message += f" Did you mean {close[0]!r}?" if close else ""
    command = exc.ctx.command_path if exc.ctx is not None else "speedtrain"
    return f"{message} ({command} -h)"


class _PassThrough(TyperCommand):
    """A command whose key=value arguments go on to Ultralytics: a --flag it does not know is a typo, answered with
    the closest flags before anything heavy is imported (click's own suggestion, for the commands that take none)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        for token in ctx.args:
            if token.startswith("-") and not _is_number(token):
                raise UsageError(unknown_option(token, self))
        return rest


def unknown_option(token: str, command: Any) -> str:
    """'no such option --epoch; did you mean --epochs?' from the command's own option names."""
    name = token.split("=", 1)[0]
    close = closest(name, [o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")])
    hint = f"; did you mean {' or '.join(close)}?" if close else "; Ultralytics arguments are written key=value"
    return f"no such option {name}{hint} (speedtrain {command.name} -h lists them)"


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


Command = TypeVar("Command", bound=Callable[..., Any])
LOG_EVERY_S = 30.0  # in a log or a pipe: a progress line at least this often during an epoch

EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["-h", "--help"]}


DatasetOpt = Annotated[
    Path | None,
    typer.Option(
        "--dataset",
        "-d",
        help="Dataset folder (with data.yaml or images/+labels/) or a data yaml. Default: the embedded sample.",
    ),
]
HardwareOpt = Annotated[
    Path | None,
    typer.Option("--hardware", help="Plan for the machine in this snapshot (from `speedtrain probe --json`)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
AllowDownloadOpt = Annotated[
    bool, typer.Option("--allow-download", help="Let Ultralytics run the dataset yaml's download: script.")
]
RetuneOpt = Annotated[bool, typer.Option("--retune", help="Measure again even when a cached tune result exists.")]
BudgetOpt = Annotated[float, typer.Option("--budget-s", min=5.0, help="Time budget of the tune probes, seconds.")]
ProjectOpt = Annotated[Path, typer.Option("--project", help="Folder for run folders.")]
RequiredDatasetOpt = Annotated[
    Path, typer.Option("--dataset", "-d", help="Dataset folder (with data.yaml or images/+labels/) or a data yaml.")
]
ProcsOpt = Annotated[int | None, typer.Option("--workers", "-w", min=1, help="Processes. Default: all cores.")]


def _with_knobs(command: str, after: str) -> Callable[[Command], Command]:
    """The command's options for the planned knobs, made from their one declaration (speedtrain/knobs.py) and
    placed after its option `after`; their values reach the function as `**knob_values`."""

    def add(func: Command) -> Command:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = next(i for i, p in enumerate(own) if p.name == after) + 1
        added = [_knob_option(k) for k in knobs.for_command(command)]
        func.__signature__ = signature.replace(parameters=[*own[:at], *added, *own[at:]])  # type: ignore[attr-defined]
        return func

    return add


def _knob_option(knob: knobs.Knob) -> inspect.Parameter:
    """A Typer option for a knob: its flags (a boolean gets --x/--no-x), help, range and choices."""
    flags = (f"{knob.flag}/--no-{knob.flag[2:]}",) if knob.type is bool else knob.flags
    option = typer.Option(*flags, help=knob.help, min=knob.minimum, max=knob.maximum)
    kind: Any = Literal[knob.choices] if knob.choices else knob.type
    kind = kind | None if knob.default is None else kind
    return inspect.Parameter(
        knob.name, inspect.Parameter.KEYWORD_ONLY, default=knob.default, annotation=Annotated[kind, option]
    )


@app.command()
def probe(
    *,
    as_json: JsonOpt = False,
    save: Annotated[Path | None, typer.Option("--save", help="Also write the snapshot to this JSON file.")] = None,
    path: Annotated[Path, typer.Option("--path", help="Measure free disk where this folder lives.")] = Path("."),
) -> None:
    """Show this machine's GPUs, RAM, CPU cores and free disk.

    Example: speedtrain probe --json > my_machine.json
    """
    snapshot = api.probe(path)
    if save:
        hardware.save(snapshot, save)
    if as_json:
        typer.echo(json.dumps(hardware.to_dict(snapshot), indent=2))
    else:
        console.print(render.render_hardware(snapshot))


@app.command(context_settings=EXTRA_ARGS, cls=_PassThrough)
@_with_knobs("plan", after="as_json")
def plan(
    ctx: typer.Context,
    *,
    dataset: DatasetOpt = None,
    hardware_file: HardwareOpt = None,
    as_json: JsonOpt = False,
    allow_download: AllowDownloadOpt = False,
    **knob_values: Any,
) -> None:
    """Print the training plan and its reasons without training. Extra key=value go to Ultralytics.

    Example: speedtrain plan --dataset datasets/coco128 --hardware my_gpu_box.json mosaic=0.5
    """
    planned = api.plan(dataset, hardware=hardware_file, allow_download=allow_download, extra=ctx.args, **knob_values)
    if as_json:
        typer.echo(planned.to_json(), nl=False)
    else:
        console.print(planned)


@app.command(context_settings=EXTRA_ARGS, cls=_PassThrough)
@_with_knobs("train", after="dataset")
def train(
    ctx: typer.Context,
    *,
    dataset: DatasetOpt = None,
    project: ProjectOpt = workflow.DEFAULT_PROJECT,
    name: Annotated[str, typer.Option("--name", help="Run folder name; taken names get 2, 3, ...")] = "train",
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Go on with an interrupted run folder, as it was planned (with --verbose only)."),
    ] = None,
    allow_download: AllowDownloadOpt = False,
    autotune: Annotated[
        bool, typer.Option("--autotune", help="Measure batch, workers and cache first (speedtrain tune) and use them.")
    ] = False,
    retune: RetuneOpt = False,
    budget_s: BudgetOpt = 90.0,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show Ultralytics' own output while training (else in the run folder).")
    ] = False,
    **knob_values: Any,
) -> None:
    """Plan and train, then print and save the speed report. Extra key=value go to Ultralytics.

    Example: speedtrain train --dataset dataset --epochs 50 --batch-size 32 --img-size 416 mosaic=0.5
    """
    if resume:
        _refuse_flags_with_resume(ctx)
    with _plain_text_when_piped(ctx.args, dataset):
        _train(ctx, locals())


RESUME_TAKES = {"resume", "verbose"}  # --resume goes on with the run's own plan; how it is shown may change


def _refuse_flags_with_resume(ctx: typer.Context) -> None:
    """Flags given with --resume would be ignored (the run goes on as it was planned): one line, not a silence."""
    # the parameter source compared by name: Typer may bring its own copy of click's enum
    given = [
        p
        for p in ctx.command.params
        if p.name
        and p.name not in RESUME_TAKES
        and getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"
    ]
    names = [next((o for o in p.opts if o.startswith("--")), p.opts[0]) for p in given] + list(ctx.args)
    if names:
        raise UsageError(
            f"{', '.join(names)} with --resume: the run goes on as it was planned, so these would be ignored; leave "
            "them out, or start a new run with them"
        )


def _train(ctx: typer.Context, params: dict[str, Any]) -> None:
    """The train command: api.train (or api.resume) with the plan, preparation and tune shown as they happen, a
    progress line per stage, and the report at the end."""
    p = types.SimpleNamespace(**params)
    out = _Console(file=sys.stdout, highlight=False)  # the real output: Ultralytics' goes to the run's log file

    def log(message: str) -> None:
        out.print(f"[bold cyan]speedtrain:[/] {message}")

    def on_event(kind: str, value: Any) -> None:
        if kind == "prepared":
            console.print(render.render_prepared(value))
        elif kind == "tuned":
            console.print(render.render_tune(value))
        elif kind == "planned":
            console.print(render.render_dataset(value.dataset))
            console.print(render.render_plan(value.plan))

    ctrl_c_at_prompt = [False]
    with contextlib.ExitStack() as stack:
        display: list[_Display] = []

        def on_update(event: StageProgress) -> None:  # the progress display starts with training, after any resize bar
            if not display:
                display.append(stack.enter_context(_run_display(out)))
            display[0](event)

        def ask(main: StageResult) -> bool | None:
            with display[0].paused() if display else contextlib.nullcontext():
                answer, ctrl_c_at_prompt[0] = ask_finetune(main, out)
            return answer

        hooks = Hooks(log, None if p.verbose else on_update, ask, on_event, _progress)
        if p.resume:
            result = api.resume(
                p.resume, verbose=p.verbose, hooks=dataclasses.replace(hooks, on_event=None, progress=None)
            )
        else:
            result = api.train(
                p.dataset,
                project=p.project,
                name=p.name,
                autotune=p.autotune,
                retune=p.retune,
                budget_s=p.budget_s,
                allow_download=p.allow_download,
                verbose=p.verbose,
                hooks=hooks,
                extra=ctx.args,
                **params["knob_values"],
            )
    _finish(result, plan_shown=not p.resume)
    if ctrl_c_at_prompt[0]:  # the run is finished and its report printed; the exit code still says Ctrl-C
        raise typer.Exit(130)


class _Display:
    """The run's progress display: called with each progress event; paused around a question."""

    def __init__(self, update: OnProgress, bar: Progress | None = None) -> None:
        self.update, self.bar = update, bar

    def __call__(self, event: StageProgress) -> None:
        self.update(event)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop redrawing (a prompt gets its own line, and the answer typed is not drawn into the bar)."""
        if self.bar is None:
            yield
            return
        self.bar.stop()
        try:
            yield
        finally:
            self.bar.start()


@contextlib.contextmanager
def _run_display(out: Console) -> Iterator[_Display]:
    """One progress line per stage (epoch x/N, images/s, last mAP, ETA) on a terminal, a line per epoch in a log
    (--verbose shows Ultralytics' own output instead, and no display)."""
    if not out.is_terminal:
        now = time.monotonic()
        last = [now]  # when a line was last printed
        # when each stage's current epoch began, and how far it is: an epoch that starts again (a compare arm's
        # fine-tune under the arm's name, a retry one batch smaller) is timed from its new start
        current: dict[str, tuple[int, float, float]] = {}

        def line(ev: StageProgress) -> None:
            now = time.monotonic()
            epoch, began, done = current.get(ev.stage, (-1, now, 0.0))
            if epoch != ev.epoch or ev.fraction < done:
                began = now
            current[ev.stage] = (ev.epoch, began, ev.fraction)
            if ev.epoch_done:
                out.print(render.epoch_line(ev))
            elif now - last[0] >= LOG_EVERY_S:  # a long epoch is not minutes of silence in a log
                out.print(render.batch_line(ev, now - began))
            else:
                return
            last[0] = now

        yield _Display(line)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[score]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=out, redirect_stdout=False, redirect_stderr=False) as bar:
        tasks: dict[str, Any] = {}
        reached: dict[str, float] = {}  # each stage's epochs done so far

        def update(ev: StageProgress) -> None:
            if ev.stage not in tasks:
                tasks[ev.stage] = bar.add_task(ev.stage, total=ev.epochs, epoch="", rate="", score="")
            elif ev.epoch + ev.fraction < reached[ev.stage]:  # started again (a fine-tune, a retry): a new ETA
                bar.reset(tasks[ev.stage], total=ev.epochs)
            reached[ev.stage] = ev.epoch + ev.fraction
            bar.update(
                tasks[ev.stage],
                completed=ev.epoch + ev.fraction,
                total=ev.epochs,
                epoch=f"{min(ev.epoch + 1, ev.epochs)}/{ev.epochs}",
                rate=f"{ev.images_per_s} img/s" if ev.images_per_s else "",
                score=f"mAP50-95 {ev.map50_95:.3f}" if ev.map50_95 is not None else "",
            )

        yield _Display(update, bar)


def _finish(result: SpeedReport, plan_shown: bool = False) -> None:
    """Print the speed report (without the plan when it was shown before the run); an interrupted run exits 130
    and says how to go on."""
    assert result.run is not None  # a finished or interrupted run's report
    run_dir = Path(result.run.run_dir)
    world = distributed.world()
    if world is not None and not world.leader:  # one rank of several: rank 0 prints the report
        if result.run.interrupted:
            raise typer.Exit(143 if result.run.stopped_by == "SIGTERM" else 130)
        return
    console.rule("speed report")
    console.print(render.render_report(result, with_plan=not plan_shown))
    log_file = run_dir / workflow.ULTRALYTICS_LOG
    if log_file.is_file():
        console.print(f"Ultralytics' full log: {log_file} (--verbose shows it while training)", soft_wrap=True)
    console.print(f"report: {run_dir / REPORT_NAME} and {run_dir / render.PNG_NAME}", soft_wrap=True)
    if result.run.interrupted:
        err_console.print(f"interrupted; go on with: speedtrain train --resume {run_dir}", soft_wrap=True)
        raise typer.Exit(143 if result.run.stopped_by == "SIGTERM" else 130)


@app.command("prepare")
def prepare_command(
    *,
    dataset: RequiredDatasetOpt,
    size: Annotated[int, typer.Option("--size", "-s", help="Long side of the resized images.")] = 416,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder. Default: DATASET_SIZE beside it.")
    ] = None,
    workers: ProcsOpt = None,
    quality: Annotated[
        str,
        typer.Option(
            "--quality",
            help="JPEG/WebP quality of the copies, 1-100, or auto: 95, or for a JPEG stored lower 15 above its own "
            "(at least 85), so that a copy is not larger than its source.",
        ),
    ] = "auto",
    in_place: Annotated[bool, typer.Option("--in-place", help="Overwrite the images themselves (atomically).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a copy of the dataset with images resized to --size on the long side, in parallel; labels copied.

    Example: speedtrain prepare --dataset datasets/mine --size 416
    """
    with _progress(f"resizing to {size} px", quiet=as_json) as progress:
        summary = api.prepare(
            dataset, size, out, workers=workers, quality=quality, in_place=in_place, progress=progress
        )
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        console.print(render.render_resize(summary))
        if summary.yaml_path:
            console.print(f"train on it: speedtrain train --dataset {summary.yaml_path}", soft_wrap=True)


@app.command()
def check(
    *,
    dataset: RequiredDatasetOpt,
    workers: ProcsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a dataset: unreadable images, labels without images, bad label lines, duplicates. Exit 1 if any.

    Example: speedtrain check --dataset datasets/mine
    """
    stats = dataset_mod.scan(dataset)
    with _progress("checking images", quiet=as_json) as progress:
        problems = api.check(dataset, workers=workers, progress=progress)
    summary = DatasetSummary.of(stats)
    if as_json:
        typer.echo(json.dumps(summary.to_dict() | {"problems": [dataclasses.asdict(p) for p in problems]}, indent=2))
    else:
        console.print(render.render_dataset(dataclasses.replace(summary, problems=problems)))
        console.print(render.render_problems(problems))
    if problems:
        raise typer.Exit(1)


@app.command("tune", context_settings=EXTRA_ARGS, cls=_PassThrough)
@_with_knobs("tune", after="dataset")
def tune_command(
    ctx: typer.Context,
    *,
    dataset: DatasetOpt = None,
    budget_s: BudgetOpt = 90.0,
    retune: RetuneOpt = False,
    project: ProjectOpt = workflow.DEFAULT_PROJECT,
    as_json: JsonOpt = False,
    **knob_values: Any,
) -> None:
    """Measure the model's step rate per batch and the dataloader's rate per workers and cache; pick the fastest.

    Example: speedtrain tune --dataset datasets/mine --budget-s 60
    """
    log = _quiet if as_json else _log
    # With --json, stdout carries the JSON alone: Ultralytics' logs and progress bars go to stderr.
    with (
        contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext(),
        _plain_text_when_piped(ctx.args, dataset),
    ):
        result = api.tune(
            dataset,
            project=project,
            budget_s=budget_s,
            retune=retune,
            hooks=Hooks(log=log),
            extra=ctx.args,
            **knob_values,
        )
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        console.print(render.render_tune(result))


@app.command("compare", context_settings=EXTRA_ARGS, cls=_PassThrough)
@_with_knobs("compare", after="seed")
def compare_command(
    ctx: typer.Context,
    *,
    dataset: DatasetOpt = None,
    budget: Annotated[str, typer.Option("--budget", help="Wall-clock time per arm: 90s, 20m, 1h or 1h30m.")] = "20m",
    arms: Annotated[
        str,
        typer.Option(
            "--arms",
            help="Comma-separated: defaults, plan, plan-one-size, plan-phases, plan-rect, plan-no-rect, plan-640, "
            "plan+finetune, plan-classic.",
        ),
    ] = "defaults,plan",
    baseline_budget: Annotated[
        str | None,
        typer.Option(
            "--baseline-budget", help="The defaults arm's time, its accuracy the target. Default: 3x --budget."
        ),
    ] = None,
    val_imgsz: Annotated[
        int | None,
        typer.Option(
            "--val-img-size", help=f"Size every saved epoch is validated at. Default: {knobs.ULTRALYTICS_IMGSZ}."
        ),
    ] = None,
    baseline_imgsz: Annotated[
        int | None,
        typer.Option("--baseline-img-size", help=f"The defaults arm's image size. Default: {knobs.ULTRALYTICS_IMGSZ}."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="The same seed for every arm.")] = 0,
    project: ProjectOpt = workflow.DEFAULT_PROJECT,
    name: Annotated[str, typer.Option("--name", help="Run folder name; taken names get 2, 3, ...")] = "compare",
    as_json: JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Ultralytics' own output while training.")] = False,
    **knob_values: Any,
) -> None:
    """Train plain Ultralytics (given 3x the time) and the plan on your data; report the plan's time to their accuracy.

    Example: speedtrain compare --dataset datasets/mine --budget 20m --baseline-budget 1h --arms defaults,plan
    """
    out = _Console(file=sys.stderr if as_json else sys.stdout, highlight=False)

    def log(message: str) -> None:
        out.print(f"[bold cyan]speedtrain:[/] {message}")

    # With --json, stdout carries the JSON alone: Ultralytics' output (--verbose) goes to stderr.
    with (
        contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext(),
        _plain_text_when_piped(ctx.args, dataset),
        contextlib.ExitStack() as stack,
    ):
        display: list[_Display] = []

        def on_update(event: StageProgress) -> None:
            if not display:
                display.append(stack.enter_context(_run_display(out)))
            display[0](event)

        result = api.compare(
            dataset,
            budget=budget,
            arms=arms,
            baseline_budget=baseline_budget,
            val_imgsz=val_imgsz,
            baseline_imgsz=baseline_imgsz,
            seed=seed,
            project=project,
            name=name,
            verbose=verbose,
            hooks=Hooks(log=log, on_update=None if verbose else on_update),
            extra=ctx.args,
            **knob_values,
        )
    if as_json:
        typer.echo(result.to_json(), nl=False)
    else:
        console.print(result)
    if result.interrupted:
        by = result.stopped_by
        err_console.print(
            f"interrupted{f' by {by}' if by else ''}: {result.run_dir} keeps the arms that finished; "
            "run compare again for all",
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_BY_SIGNAL.get(by or "", 130))


@app.command("report")
def show_report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (or its speed_report.json).")],
    *,
    as_json: JsonOpt = False,
    png: Annotated[Path | None, typer.Option("--png", help="Also draw the report's picture to this PNG file.")] = None,
) -> None:
    """Print a finished run's speed report again from its speed_report.json.

    Example: speedtrain report runs/speedtrain/train --png render.png
    """
    rep = api.report(run_dir)
    if png:
        rep.save_png(png)
        err_console.print(f"picture: {png}", soft_wrap=True)
    if as_json:
        typer.echo(rep.to_json(), nl=False)
    else:
        console.print(rep)


PROMPT_TIMEOUT_S = 60.0  # then the prompt's default (what --finetune auto decides) is taken


def ask_finetune(main: StageResult, out: Console) -> tuple[bool | None, bool]:
    """(answer, Ctrl-C pressed) for --finetune ask: a question on its own line on an interactive terminal, whose
    default is what --finetune auto decides, taken after PROMPT_TIMEOUT_S; EOF or Ctrl-C mean no. Nobody to ask
    (input or output not a terminal): (None, False), and auto decides."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return None, False

    size = max((s for s, _ in main.scores), default=knobs.ULTRALYTICS_IMGSZ)
    skip = planner.finetune_skip_reason(main, size, None)
    scores = ", ".join(f"{v:.3f} at {s} px" for s, v in main.scores) or "not measured"
    default = "n" if skip else "y"
    choices = "[y/N]" if skip else "[Y/n]"
    out.print(
        f"\nMain stage mAP50-95: {scores}. Fine-tune at {size} px now? {choices} "
        f"({default} after {PROMPT_TIMEOUT_S:.0f} s) ",
        end="",
    )
    try:
        line = _read_line(PROMPT_TIMEOUT_S)
    except KeyboardInterrupt:
        out.print("\nno (Ctrl-C): the run ends here; its report follows")
        return False, True
    if line is None:
        out.print(f"\n{default} (no answer in {PROMPT_TIMEOUT_S:.0f} s)")
        line = default
    elif line == "":  # EOF: nobody will answer
        out.print("\nno (end of input)")
        return False, False
    answer = line.strip().lower() or default
    return answer.startswith("y"), False


def _read_line(timeout: float) -> str | None:
    """A line from standard input ("" at end of input), or None when none came within `timeout` seconds."""
    if os.name == "nt":  # no select() on a Windows console: a reader thread, left behind if nobody answers
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(sys.stdin.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return box[0] if box else None

    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return sys.stdin.readline() if ready else None


@contextlib.contextmanager
def _progress(label: str, quiet: bool = False) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar (count, rate, ETA) fed by a (done, total) callback; plain output when not a terminal."""
    if quiet:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=err_console, transient=False)
    task, t0 = None, time.perf_counter()

    def update(done: int, total: int) -> None:  # the bar appears with the first progress, not before a refusal
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(label, total=None, rate="")
        elapsed = time.perf_counter() - t0
        rate = f"{done / elapsed:.0f} img/s" if done and elapsed > 0 else ""
        bar.update(task, completed=done, total=total, rate=rate)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


def _quiet(message: str) -> None:
    """Progress lines go nowhere when --json owns standard output."""


def _log(message: str) -> None:
    console.print(f"[bold cyan]speedtrain:[/] {message}", soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `speedtrain` script, `python -m speedtrain` and the top-level shims."""
    if sys.stdout is None:  # started with its standard output closed (`>&-`): what it prints would be lost
        if sys.stderr is not None:
            sys.stderr.write(
                "error: standard output is closed, so the plan and the report would be lost; redirect "
                "it instead (> run.log)\n"
            )
        raise SystemExit(1)
    app(args=argv, prog_name="speedtrain")


def _plain_text_when_piped(
    extra: list[str] | None = None, dataset: Path | None = None
) -> contextlib.AbstractContextManager[None]:
    """Ultralytics' output without colour codes in a pipe or a file. Importing it imports torch (seconds): a mistyped
    key=value in `extra` or a `dataset` that does not exist is answered first, in a fraction of a second."""
    if extra:
        planner.parse_extra_args(list(extra), ultra_args.defaults())
    if dataset is not None and not dataset.exists():
        raise DatasetError(f"dataset not found: {dataset}")
    if sys.stdout.isatty():
        return contextlib.nullcontext()
    if "ultralytics" in sys.modules:  # its log handlers already hold the streams: filter them too
        from speedtrain import ultra

        return ultra.plain_text_when_piped()
    # Ultralytics is imported later, when training starts (after the plan, so that a bad argument is answered
    # without torch): its log handlers then write to these streams
    return plain_streams()
