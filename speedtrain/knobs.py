"""The planned knobs, each declared once, and the plan records they fill: Overrides in, Stage and TrainPlan out.

A knob is one field of `Overrides` declared with `knob(...)`: its name is the Python API's keyword, its type (a
`Literal` for a choice) is the value's, and the declaration holds its command-line flags and help, the Ultralytics
train argument it sets, Ultralytics' own value (the plan table's baseline) and where the rendered plan shows it.
The CLI's options, the API's keyword checks, the plan table's rows, `key=value` arguments that name a knob and the
docs' knob table are all derived from `KNOBS`; the planner holds each knob's rule.

Adding a knob: its field here (and a `Stage` field when Ultralytics gets a new argument), its rule with a reason in
`planner.py`, the rule's test in `tests/test_planner.py`, an example value in `EXAMPLES` in `tests/test_knobs.py`; then
`python tools/cli_docs.py` regenerates the CLI reference and the knob table. Pure data: no I/O, no torch.
"""

from __future__ import annotations

import contextvars
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from speedtrain.schedule import Schedule

COMMANDS = ("plan", "train", "compare")  # every knob is an option of these, unless its `not_in` says why not

When = Literal["always", "auto", "ask"]  # when a stage runs: always, when the main stage missed the target, if asked
PipelineKind = Literal["ultralytics", "fast"]
Cache = Literal["ram", "disk", False]  # as Ultralytics' cache argument takes it; False: no cache
DEFAULT_TARGET_MAP: float | None = None  # --target-map: unset, --finetune auto decides by the 640-px lag alone
# Ultralytics' default image size (cfg/default.yaml `imgsz`; tests/test_knobs.py checks): the untuned baseline, where
# a model is scored and timed besides its own size, and the fine-tune's size
ULTRALYTICS_IMGSZ = 640


@dataclass(frozen=True, slots=True)
class Knob:
    """One planned knob, as declared on its `Overrides` field."""

    name: str  # the Overrides field and the Python API's keyword
    flags: tuple[str, ...]  # command-line option names, the main one first; a boolean gets --x/--no-x
    help: str
    type: type  # the command line's value type: int, float, str or bool
    choices: tuple[str, ...]  # a Literal field's values, in order
    default: Any
    minimum: float | None
    maximum: float | None
    ultralytics: str | None  # the Ultralytics train argument it sets; `key=value` with that name folds into it
    planned: Any  # the plan's own default where it is one value (the help text says it; the planner reads it)
    stage: str  # the stage whose Ultralytics argument it sets: "main" or "finetune"
    baseline: Any  # Ultralytics' own value, the plan table's baseline column
    cell: Callable[[Any], Any] | None  # the plan table's cell, from the main Stage; None: shown in `shown`
    shown: str  # where the rendered plan shows it: "row" or the part that holds it
    not_in: tuple[tuple[str, str], ...]  # (command, why it is not an option there)
    tune: bool  # also an option of `speedtrain tune`

    @property
    def flag(self) -> str:
        return self.flags[0]

    @property
    def commands(self) -> tuple[str, ...]:
        skip = dict(self.not_in)
        return tuple(c for c in COMMANDS if c not in skip) + (("tune",) if self.tune else ())


def knob(
    *flags: str,
    help: str,  # noqa: A002 -- Typer's and click's own name for it
    default: Any = None,
    minimum: float | None = None,
    maximum: float | None = None,
    ultralytics: str | None = None,
    planned: Any = None,
    stage: str = "main",
    baseline: Any = None,
    cell: Callable[[Any], Any] | None = None,
    shown: str = "row",
    not_in: dict[str, str] | None = None,
    tune: bool = False,
) -> Any:
    """A planned knob's `Overrides` field: the default (None: the planner decides) and everything derived from it.
    `{planned}` in the help is the plan's own default."""
    spec = {
        "flags": flags,
        "help": help.format(planned=planned),
        "minimum": minimum,
        "maximum": maximum,
        "ultralytics": ultralytics,
        "planned": planned,
        "stage": stage,
        "baseline": baseline,
        "cell": cell,
        "shown": shown,
        "not_in": tuple((not_in or {}).items()),
        "tune": tune,
    }
    return field(default=default, metadata={"knob": spec})


BUDGET = "compare's --budget sets each arm's length (Ultralytics' time=)"
ARMS = "compare's arms decide the fine-tune (plan+finetune)"
CLASSIC_ARM = "compare's plan-classic arm trains the classic recipe"


@dataclass(frozen=True, slots=True)
class Overrides:
    """What the user set; None means 'let the planner decide'. The knobs are in the plan table's order."""

    model: str | None = knob(
        "--model",
        "-m",
        help="A .pt file or model yaml. Default: {planned}.",
        shown="title",
        planned="yolo26n",
        tune=True,
    )
    imgsz: int | None = knob(
        "--img-size",
        "--imgsz",
        ultralytics="imgsz",
        baseline=ULTRALYTICS_IMGSZ,
        cell=lambda s: _sizes(s),
        tune=True,
        planned=416,
        help="Main-stage image size (multiple of 32); with --time, the first phase's. Default: {planned} "
        "(--time: from the boxes' sizes).",
    )
    batch: int | None = knob(
        "--batch-size",
        "--batch",
        "-b",
        help="Total batch size. Default: sized from free VRAM.",
        ultralytics="batch",
        baseline=16,
        cell=lambda s: _with_fallbacks(s),
    )
    cache: Literal["ram", "disk", "none"] | None = knob(
        "--cache",
        help="Image cache. Default: ram if it fits, else disk.",
        ultralytics="cache",
        baseline="disk",
        cell=lambda s: s.cache or "none",
    )
    workers: int | None = knob(
        "--workers",
        "-w",
        help="Dataloader workers per GPU. Default: by RAM.",
        ultralytics="workers",
        baseline=8,
        cell=lambda s: s.workers,
    )
    epochs: int | None = knob(
        "--epochs",
        "-e",
        minimum=1,
        help="Main-stage epochs. Default: {planned}.",
        planned=50,
        ultralytics="epochs",
        baseline=100,
        cell=lambda s: s.epochs,
        not_in={"compare": BUDGET},
    )
    optimizer: str | None = knob(
        "--optimizer",
        help="Ultralytics optimizer name. Default: auto (Ultralytics' choice).",
        ultralytics="optimizer",
        baseline="auto",
        cell=lambda s: f"{s.optimizer} lr0={s.lr0}",
    )
    lr0: float | None = knob(
        "--lr0", minimum=0.0, help="Initial learning rate. Default: auto's.", ultralytics="lr0", shown="optimizer row"
    )
    rect: bool | None = knob(
        "--rect",
        help="Rectangular batches (turns shuffle and mosaic off). Default: off.",
        ultralytics="rect",
        baseline=False,
        cell=lambda s: s.rect,
    )
    close_mosaic: int | None = knob(
        "--close-mosaic",
        minimum=0,
        planned=10,
        help="Last epochs without mosaic. Default: {planned} (--time: the budget's last 10%).",
        ultralytics="close_mosaic",
        baseline=10,
        cell=lambda s: f"last {s.schedule.close_mosaic:.0%} of budget" if s.schedule else s.close_mosaic,
    )
    patience: int | None = knob(
        "--patience",
        minimum=0,
        help="Early-stopping patience. Default: {planned} (--time: off).",
        planned=100,
        ultralytics="patience",
        baseline=100,
        cell=lambda s: "off" if s.schedule and not s.patience else s.patience,
    )
    val_every: str | int | None = knob(
        "--val-every",
        help="Validate every N epochs, or auto (under 15% of the run). Default: 1.",
        baseline=1,
        cell=lambda s: "at the end" if s.schedule else "auto" if s.val_every == 0 else s.val_every,
    )
    threads: int | None = knob(
        "--threads",
        minimum=1,
        help="torch threads in the training process. Default: physical cores on CPU.",
        baseline="auto",
        cell=lambda s: s.threads or "auto",
        tune=True,
    )
    deterministic: bool | None = knob(
        "--deterministic",
        help="Bitwise-repeatable runs (slower on a GPU). Default: off.",
        ultralytics="deterministic",
        baseline=True,
        cell=lambda s: s.deterministic,
    )
    amp: bool | None = knob(
        "--amp",
        help="Mixed precision on a GPU. Default: on for a GPU, off on CPU.",
        ultralytics="amp",
        baseline=True,
        cell=lambda s: s.amp,
    )
    pipeline: Literal["auto", "fast", "ultralytics"] = knob(
        "--pipeline",
        default="auto",
        help="Training input: fast (decode once, augment batches), ultralytics, auto.",
        baseline="ultralytics",
        cell=lambda s: s.pipeline,
    )
    device: str | None = knob(
        "--device",
        help="cpu, mps, 0 or 0,1. Default: all visible GPUs.",
        ultralytics="device",
        shown="device line",
        tune=True,
    )
    nproc_per_node: int | None = knob(
        "--nproc-per-node",
        minimum=1,
        shown="device line",
        not_in={"compare": "compare measures one process"},
        help="Training processes (ranks) on this node. Default: one per GPU of --device; on a CPU, N gloo ranks.",
    )
    time: str | float | None = knob(
        "--time",
        ultralytics="time",
        shown="time row",
        not_in={"compare": BUDGET},
        help="Time budget of the whole run (2h, 90m, 1h30m, or hours): Ultralytics' time= fits the epochs and the "
        "learning-rate schedule to it, at one size.",
    )
    phases: str | None = knob(
        "--phases",
        shown="time row",
        help="--time in phases of rising image size on one learning-rate curve to zero at the deadline: auto (sizes "
        "from the boxes), the sizes, e.g. 320,416,640, or with their shares, 416:0.6,640:0.4 (the last is the size "
        "the model is scored at). Default: off, one size.",
    )
    recipe: Literal["speedtrain", "classic"] = knob(
        "--recipe",
        default="speedtrain",
        shown="optimizer row",
        not_in={"compare": CLASSIC_ARM},
        help="classic: the single-script recipe (Adam at 0.001, rect, cosine, close_mosaic 10, patience 10).",
    )
    finetune: Literal["yes", "no", "auto", "ask"] = knob(
        "--finetune",
        default="auto",
        shown="fine-tune line",
        not_in={"compare": ARMS},
        help="640-px fine-tune: auto (when the main stage's weights lose accuracy at 640; with --time, the last "
        "30% of the budget), yes, no, or ask at the end.",
    )
    finetune_epochs: int | None = knob(
        "--finetune-epochs",
        minimum=1,
        help="Fine-tune epochs. Default: {planned}.",
        planned=25,
        ultralytics="epochs",
        stage="finetune",
        shown="fine-tune line",
        not_in={"compare": BUDGET},
    )
    finetune_imgsz: int | None = knob(
        "--finetune-img-size",
        help="Fine-tune image size. Default: {planned}.",
        planned=ULTRALYTICS_IMGSZ,
        ultralytics="imgsz",
        stage="finetune",
        shown="fine-tune line",
    )
    target_map: float | None = knob(
        "--target-map",
        default=DEFAULT_TARGET_MAP,
        minimum=0.0,
        maximum=1.0,
        shown="fine-tune line",
        help="--finetune auto: skip it once mAP50-95 at 640 reaches this.",
        not_in={"compare": ARMS},
    )
    prepare: Literal["auto", "yes", "no"] = knob(
        "--prepare",
        default="auto",
        shown="prepare line",
        help="Pre-resize the dataset once: auto (when most images are much larger), yes, no.",
    )
    # not knobs: set by speedtrain itself
    world: int | None = None  # ranks in all, when a launcher (torchrun, srun) started this process as one of them
    extra: tuple[tuple[str, Any], ...] = ()  # other Ultralytics train arguments, key=value
    sample: bool = False  # training on the embedded sample


def _sizes(stage: Stage) -> str:
    """The training size, or a budgeted run's phases: "320->416->640"."""
    return "->".join(str(p.imgsz) for p in stage.schedule.phases) if stage.schedule else str(stage.imgsz)


def _with_fallbacks(stage: Stage) -> str:
    """The batch and the out-of-memory chain below it: "48 ->32->16->8"."""
    return f"{stage.batch}" + (" ->" + "->".join(map(str, stage.batch_fallbacks)) if stage.batch_fallbacks else "")


@dataclass(frozen=True, slots=True)
class Row:
    """A plan-table row that is planned but not a flag: (name, Ultralytics' value, the cell, the reason's key)."""

    name: str
    baseline: Any
    cell: Callable[[Any], Any]
    reason: tuple[str, ...]


PLANNED_ROWS = (
    Row("cos_lr", False, lambda s: "linear to 0 at the deadline" if s.schedule else s.cos_lr, ("cos_lr", "lr0")),
    Row(
        "warmup_epochs",
        3.0,
        lambda s: f"{s.schedule.warmup:.0%} of budget" if s.schedule else s.warmup_epochs,
        ("warmup_epochs",),
    ),
)


def _declared() -> tuple[Knob, ...]:
    hints = typing.get_type_hints(Overrides)
    out = []
    for f in fields(Overrides):
        if "knob" not in f.metadata:
            continue
        kind, choices = _value_type(hints[f.name])
        out.append(Knob(name=f.name, type=kind, choices=choices, default=f.default, **f.metadata["knob"]))
    return tuple(out)


def _value_type(hint: Any) -> tuple[type, tuple[str, ...]]:
    """(the command line's type, the choices) of a field's type: `int | None` -> int; a Literal -> str and its
    values; a union of several types (`"auto"` or a number) -> str, parsed by the planner."""
    if typing.get_origin(hint) is Literal:
        return str, tuple(typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _value_type(args[0]) if len(args) == 1 else (str, ())
    return hint, ()


KNOBS: tuple[Knob, ...] = _declared()
BY_NAME = {k.name: k for k in KNOBS}
PLANNED = {k.name: k.planned for k in KNOBS if k.planned is not None}  # the plan's own one-value defaults
# key=value arguments (Ultralytics' names) that set a knob of the main stage
FROM_ULTRALYTICS = {k.ultralytics: k.name for k in KNOBS if k.ultralytics and k.stage == "main" and k.name != "model"}


# --- a knob or option named as the face a message is for ------------------------------------------------------------

# Which face a message is worded for: "api" (keywords: imgsz=416) while the Python API runs a call; otherwise flags
# (--img-size 416): the command line, a rank's process, a module called directly. The API sets it; SPEEDTRAIN_VOICE
# carries it to the processes a run starts (its ranks).
VOICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("speedtrain_voice", default=None)
VOICE_ENV = "SPEEDTRAIN_VOICE"
_NO_VALUE = object()
# options that are not knobs but that messages name: their keywords where the flag is not "--" + the keyword
OPTION_FLAGS = {"dataset": "--dataset", "resume": "--resume", "budget_s": "--budget-s"}
SWITCHES = {"allow_download", "autotune", "retune", "verbose", "in_place"}  # keyword options that are True or False


def voice() -> str:
    """ "api" or "cli": the face a message is worded for now."""
    return VOICE.get() or os.environ.get(VOICE_ENV) or "cli"


def said(name: str, value: Any = _NO_VALUE, quoted: bool = False) -> str:
    """The knob or option `name` (its API keyword: "imgsz", "finetune", "resume", "dataset"), with `value` when
    given, as the face the message is for names it: `--img-size 416` on the command line, `imgsz=416` in Python;
    `--resume DIR` there, `speedtrain.resume('DIR')` here. `quoted`: the command line shows the value's repr."""
    known = BY_NAME.get(name)
    if voice() != "api":
        flag = known.flag if known else OPTION_FLAGS.get(name, "--" + name.replace("_", "-"))
        return flag if value is _NO_VALUE else f"{flag} {value!r}" if quoted else f"{flag} {value}"
    if name == "resume":
        return "speedtrain.resume()" if value is _NO_VALUE else f"speedtrain.resume({str(value)!r})"
    if name == "dataset":
        return "the dataset argument" if value is _NO_VALUE else f"the dataset {str(value)!r}"
    if value is _NO_VALUE:
        switch = name in SWITCHES or (known is not None and known.type is bool)
        return f"{name}=True" if switch else name
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return f"{name}={value}" if number or value is None or isinstance(value, bool) else f"{name}={str(value)!r}"


def resume_command(run_dir: Any) -> str:
    """How the face a message is for goes on with the run in `run_dir`: the command, or the API's call."""
    return f"`speedtrain train --resume {run_dir}`" if voice() != "api" else said("resume", run_dir)


# the untuned baseline the report's estimates are set against: Ultralytics' image size, batch and workers, with the
# tutorials' disk cache
BASELINE: dict[str, Any] = {k: BY_NAME[k].baseline for k in ("imgsz", "batch", "cache", "workers")}


def table_cell(name: str, stage: Stage) -> Any:
    """A knob's cell in the plan table for `stage` (its declaration's)."""
    cell = BY_NAME[name].cell
    return cell(stage) if cell is not None else getattr(stage, name)


def for_command(command: str) -> tuple[Knob, ...]:
    return tuple(k for k in KNOBS if command in k.commands)


def table_rows() -> tuple[tuple[str, Any, Callable[[Any], Any], tuple[str, ...]], ...]:
    """The plan table's rows in order: (knob, baseline, cell from the main Stage, reason keys)."""
    rows = [(k.name, k.baseline, k.cell, (k.name,)) for k in KNOBS if k.cell is not None]
    return (*rows, *((r.name, r.baseline, r.cell, r.reason) for r in PLANNED_ROWS))


def markdown_table() -> str:
    """The docs' knob table, generated from the declarations (tools/cli_docs.py writes it into docs/plan.md)."""
    lines = [
        "| knob (Python) | flag | Ultralytics argument | Ultralytics' value | shown in the plan | commands |",
        "|---|---|---|---|---|---|",
    ]
    for k in KNOBS:
        ult = f"`{k.ultralytics}`" + (" (fine-tune)" if k.stage == "finetune" else "") if k.ultralytics else "-"
        base = "-" if k.baseline is None else f"`{k.baseline}`"
        shown = "its row" if k.shown == "row" else k.shown
        lines.append(f"| `{k.name}` | `{k.flag}` | {ult} | {base} | {shown} | {', '.join(k.commands)} |")
    for r in PLANNED_ROWS:
        lines.append(f"| {r.name} (planned, no flag) | - | `{r.name}` | `{r.baseline}` | its row | - |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Stage:
    """One model.train() call; fields named like Ultralytics' train arguments."""

    name: str
    imgsz: int
    epochs: int
    batch: int
    batch_fallbacks: tuple[int, ...]
    workers: int
    cache: Cache  # "ram", "disk" or False, as Ultralytics takes it
    optimizer: str
    lr0: float
    cos_lr: bool
    close_mosaic: int
    rect: bool
    patience: int
    amp: bool
    device: str
    deterministic: bool = False
    val_every: int = 1  # validate every N epochs (1: every epoch, as Ultralytics); VAL_AUTO: from measured times
    warmup_epochs: float = 3.0
    when: When = "always"  # "always", or for the fine-tune: "auto" or "ask"
    ram_cache_need_gb: float = 0.0  # available RAM a RAM cache needs, margins included; re-checked before training
    pipeline: PipelineKind = "ultralytics"  # "fast": speedtrain.pipeline's decode-once store, batched augmentation
    threads: int | None = None  # torch intra-op threads, set after Ultralytics' device selection; None: its own
    schedule: Schedule | None = None  # --time: the phases and the learning-rate curve, followed during training
    max_epochs: int | None = None  # --time with --epochs: the most epochs time= may fit; None: as many as fit
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        """The CUDA indices this stage trains on; () on the CPU or MPS."""
        return tuple(int(d) for d in self.device.split(",")) if self.device[:1].isdigit() else ()

    @property
    def on_gpu(self) -> bool:
        return bool(self.gpu_ids)

    def train_args(self) -> dict[str, Any]:
        """Arguments for model.train(); every key is an Ultralytics train argument."""
        skip = {
            "name",
            "batch_fallbacks",
            "when",
            "ram_cache_need_gb",
            "pipeline",
            "threads",
            "extra",
            "val_every",
            "schedule",
            "max_epochs",
        }
        args = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        args.update(self.extra)
        return args


@dataclass(frozen=True, slots=True)
class TrainPlan:
    device: str
    model: str
    stages: tuple[Stage, ...]
    reasons: tuple[tuple[str, str], ...]
    target_map: float | None
    estimates: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()
    cache_estimate_gb: float = 0.0
    prepare_size: int | None = None  # resize the dataset to this long side before training; None: train as is
    baseline: dict[str, Any] = field(default_factory=lambda: dict(BASELINE))
    ranks: int = 1  # training processes in all (one per GPU; or the launcher's WORLD_SIZE)

    def reason(self, key: str) -> str:
        return dict(self.reasons).get(key, "")

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)
