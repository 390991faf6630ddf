"""`speedtrain compare`: time to accuracy on the user's own data.

Each arm trains the same model from the same weights on the same data with the same seed for the same wall-clock
budget (Ultralytics' own `time=` argument ends each run), saving every epoch's weights. Afterwards, outside the
budget, every saved epoch of every arm is validated the same way (Ultralytics' validator, the same val split, one
image size), which gives each arm a curve of mAP50-95 against wall-clock seconds since its start (setup, caching
and retries included). The baseline's target is its final weights' mAP50-95; time to accuracy is the first
epoch at which an arm's curve reaches it (MLPerf Training's way of scoring detectors: time to a target mAP).

Arms: `defaults` is plain Ultralytics (its default.yaml: 640 px, batch 16, optimizer auto, 8 workers, no cache,
no rect, patience 100); `plan` is speedtrain's plan for this machine and budget; `plan-one-size`, `plan-rect`,
`plan-no-rect`, `plan-640` and `plan+finetune` change one thing each, so a user sees what each knob costs;
`plan-classic` is the plan with the classic single-script recipe (Adam at lr0 0.001, rect batches, patience 10).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rich.console import RenderableType
from rich.jupyter import JupyterMixin

from speedtrain import hardware, planner, render, resize, runner, scoring, workflow
from speedtrain.errors import SpeedtrainError, UsageError
from speedtrain.hardware import HardwareSnapshot
from speedtrain.knobs import Overrides, Stage, TrainPlan, said
from speedtrain.records import DatasetSummary, Hooks, OnProgress, Planned, StageResult
from speedtrain.util import (
    check_free_disk,
    first_line,
    fmt_map,
    parse_duration,
    read_json,
    spread,
    torch_threads_restored,
    utc_now,
    write_atomic,
)

ARMS = (
    "defaults",
    "plan",
    "plan-one-size",
    "plan-phases",
    "plan-no-rect",
    "plan-rect",
    "plan-640",
    "plan+finetune",
    "plan-classic",
)
DEFAULT_ARMS = ("defaults", "plan")
BASELINE_FACTOR = 3  # the defaults arm's budget against the plan arms' (--baseline-budget): its accuracy given time
FINETUNE_SHARE = planner.FINETUNE_TIME_SHARE  # plan+finetune: the share of its budget the 640-px fine-tune gets
MAX_CURVE_POINTS = 30  # saved epochs validated per arm (shared by its stages, evenly spaced, each one's last always)
FORMAT = 1
JSON_NAME, PNG_NAME = "compare.json", "compare.png"
Log = Callable[[str], None]


def parse_budget(text: str | float | int, name: str = "budget") -> float:
    """Seconds from "90s", "20m", "1h", "1h30m" or a plain number of seconds; one clear line otherwise, naming the
    option `name` (its keyword)."""
    seconds = parse_duration(text, name)
    if not 10 <= seconds <= 7 * 24 * 3600:
        raise UsageError(f"{said(name, text, quoted=True)}: between 10 seconds and 7 days per arm")
    return seconds


def parse_arms(arms: str | Sequence[str]) -> tuple[str, ...]:
    """Arm names from "defaults,plan" or a list; unknown names are one clear line."""
    names = [a.strip() for a in (arms.split(",") if isinstance(arms, str) else arms) if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise UsageError(
            f"{said('arms')}: unknown arm {unknown[0]!r}; known: {', '.join(ARMS)}"
            if unknown
            else f"{said('arms')}: none"
        )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class Arm:
    """What one arm trains: one stage, or the plan's main stage then its fine-tune (each with its budget share)."""

    name: str
    stages: tuple[Stage, ...]
    shares: tuple[float, ...]
    prepared: bool  # trains on speedtrain's pre-resized copy (its clock includes the resize)


def arms_for(
    plan: TrainPlan,
    names: Sequence[str],
    defaults: dict[str, Any],
    baseline_imgsz: int,
    timed: TrainPlan | None = None,
    classic: TrainPlan | None = None,
    phased: TrainPlan | None = None,
) -> tuple[Arm, ...]:
    """The arms' stages: pure, from the plan (made with a fine-tune stage), the plan made for the arms' budget
    (`timed`: what `train --time` plans, for the plan arm; `phased`: in phases), the classic recipe's plan and
    Ultralytics' defaults."""
    main = plan.stages[0]
    ft = plan.stage("finetune") or replace(main, name="finetune", imgsz=planner.FINETUNE_IMGSZ)
    train = replace(main, name="train", when="always")
    out = []
    for name in names:
        if name == "defaults":
            out.append(Arm(name, (defaults_stage(defaults, baseline_imgsz, main),), (1.0,), prepared=False))
        elif name == "plan":  # as `train --time` plans it: with --finetune auto, the last 30 % at 640
            stages = timed.stages if timed else plan.stages[:1]
            named = tuple(replace(s, name="train" if s.name == "main" else s.name, when="always") for s in stages)
            out.append(Arm(name, named, planner.time_shares(stages), prepared=True))
        elif name == "plan-one-size":  # `plan` without its fine-tune: the main stage for the whole budget
            main_timed = (timed or plan).stages[0]
            out.append(Arm(name, (replace(main_timed, name="train", when="always"),), (1.0,), prepared=True))
        elif name == "plan-phases":
            out.append(Arm(name, (replace((phased or plan).stages[0], name="train", when="always"),), (1.0,), True))
        elif name in ("plan-no-rect", "plan-rect"):
            out.append(Arm(name, (replace(train, rect=name == "plan-rect"),), (1.0,), prepared=True))
        elif name == "plan-classic":
            recipe = replace((classic or plan).stages[0], name="train", when="always")
            out.append(Arm(name, (recipe,), (1.0,), prepared=True))
        elif name == "plan-640":
            at = replace(train, imgsz=ft.imgsz, batch=ft.batch, batch_fallbacks=ft.batch_fallbacks, cache=ft.cache)
            out.append(Arm(name, (at,), (1.0,), prepared=True))
        elif name == "plan+finetune":
            tune_stage = replace(ft, when="always")
            out.append(Arm(name, (train, tune_stage), (1 - FINETUNE_SHARE, FINETUNE_SHARE), prepared=True))
    return tuple(out)


def defaults_stage(defaults: dict[str, Any], imgsz: int, main: Stage) -> Stage:
    """Plain Ultralytics: every Stage field that is an Ultralytics train argument takes its default.yaml value (so a
    field added to Stage is plain Ultralytics' here too); the device, the user's key=value and `imgsz` are the
    comparison's, the out-of-memory chain halves the batch twice."""
    args = {f.name: defaults[f.name] for f in fields(Stage) if f.name in defaults and f.name not in ("device", "name")}
    batch = int(args["batch"])
    args.update(imgsz=imgsz, cache=args["cache"] or False)
    return Stage(
        name="train",
        batch_fallbacks=tuple(b for b in (batch // 2, batch // 4) if b),
        device=main.device,
        extra=main.extra,
        **args,
    )


# --- results ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    """One saved epoch: wall-clock seconds since the arm started, and its weights' scores at the common size."""

    epoch: int
    seconds: float
    map50: float
    map50_95: float


@dataclass(frozen=True, slots=True)
class Score:
    imgsz: int
    map50: float
    map50_95: float


@dataclass(frozen=True, slots=True)
class ArmResult:
    name: str
    imgsz: int
    batch: int
    epochs_done: int
    images_per_s: float | None
    wall_s: float  # the arm's training, from its start to its end (pre-resizing included for plan arms)
    eval_s: float  # validating its saved epochs afterwards (outside the budget)
    status: str
    note: str = ""
    weights: str | None = None
    curve: tuple[Point, ...] = ()
    final: tuple[Score, ...] = ()  # the final weights at each validation size
    latency_ms: tuple[tuple[int, float], ...] = ()
    phases: tuple[int, ...] = ()  # a budgeted arm's image sizes, phase by phase
    stopped_by: str | None = None  # the signal that interrupted the arm ("SIGINT", "SIGTERM")

    @property
    def size(self) -> str:
        """ "640", or a budgeted arm's phases: "320-416-640"."""
        return "-".join(map(str, self.phases)) if self.phases else str(self.imgsz)

    def final_at(self, imgsz: int) -> Score | None:
        return next((s for s in self.final if s.imgsz == imgsz), None)


def time_to_reach(curve: Sequence[Point], target: float) -> float | None:
    """Seconds at which the curve first reaches `target` mAP50-95 (in epoch order); None if it never does."""
    return next((p.seconds for p in sorted(curve, key=lambda p: p.epoch) if p.map50_95 >= target), None)


@dataclass(frozen=True, slots=True)
class TimeToAccuracy:
    arm: str
    target: float | None  # the baseline's final mAP50-95 at the common size
    seconds: float | None  # when the arm first reached it
    baseline_seconds: float | None  # when the baseline itself first reached it
    line: str

    @property
    def ratio(self) -> float | None:
        if self.seconds is None or not self.baseline_seconds:
            return None
        return round(self.seconds / self.baseline_seconds, 3)


@dataclass(frozen=True, slots=True)
class Comparison(JupyterMixin):
    """A finished comparison: renders as its table and headline, draws its PNG, reads and writes compare.json."""

    budget_s: float
    val_imgsz: int
    val_sizes: tuple[int, ...]
    seed: int
    model: str
    device: str
    run_dir: str
    started_at: str
    finished_at: str
    prepare_s: float
    hardware: HardwareSnapshot
    dataset: DatasetSummary
    arms: tuple[ArmResult, ...]
    requested: tuple[str, ...] = ()  # the arms asked for; fewer ran when the comparison was interrupted
    baseline_budget_s: float = 0.0  # the defaults arm's budget (0, in documents from before it existed: the same)
    format: int = FORMAT
    source: str = field(default="", compare=False)

    @property
    def interrupted(self) -> bool:
        return any(a.status == "interrupted" for a in self.arms) or len(self.arms) < len(self.requested)

    @property
    def stopped_by(self) -> str | None:
        """The signal that interrupted the comparison (None: Ctrl-C, or not interrupted)."""
        return next((a.stopped_by for a in self.arms if a.stopped_by and a.stopped_by != "SIGINT"), None)

    def arm(self, name: str) -> ArmResult | None:
        return next((a for a in self.arms if a.name == name), None)

    def time_to_accuracy(self, name: str = "plan") -> TimeToAccuracy:
        """The headline: when `name` first reached the baseline's final mAP50-95, against when the baseline did."""
        base, arm = self.arm("defaults"), self.arm(name)
        size = self.val_imgsz
        if base is None or arm is None:
            return TimeToAccuracy(name, None, None, None, "time to accuracy needs the defaults arm and this arm")
        score = base.final_at(size)
        if score is None:
            return TimeToAccuracy(name, None, None, None, "the baseline has no final validation to aim at")
        target = score.map50_95
        if target <= 0:
            own = arm.final_at(size)
            first = next((p.seconds for p in sorted(arm.curve, key=lambda p: p.epoch) if p.map50_95 > 0), None)
            if own is not None and own.map50_95 > 0:  # the arm learned something the baseline did not
                since = f"first measured above 0 at {first:.0f} s and " if first is not None else ""
                line = (
                    f"the baseline's final mAP50-95 at {size} px is 0 (nothing measurable learned in this budget) "
                    f"while {name} {since}its final weights score {fmt_map(own.map50_95)}: {name} is ahead, but "
                    "a time ratio needs a baseline above 0 (give it more time, or start from pretrained "
                    "weights)"
                )
            else:
                line = (
                    f"the baseline's final mAP50-95 at {size} px is {fmt_map(target)}: no accuracy to compare "
                    "within this budget (give it more time, or start from pretrained weights)"
                )
            return TimeToAccuracy(name, target, None, None, line)
        seconds, base_s = time_to_reach(arm.curve, target), time_to_reach(base.curve, target)
        if seconds is None:
            best = max((p.map50_95 for p in arm.curve), default=0.0)
            line = (
                f"{name} did not reach the baseline's mAP50-95 {fmt_map(target)} (at {size} px) within the "
                f"budget; its best was {fmt_map(best)}"
            )
            return TimeToAccuracy(name, target, None, base_s, line)
        result = TimeToAccuracy(name, target, seconds, base_s, "")
        share = f"{result.ratio:.0%} of the time" if result.ratio is not None else f"{seconds:.0f} s"
        line = (
            f"{name} reached the baseline's mAP50-95 {fmt_map(target)} (at {size} px) in {share}: "
            f"{seconds:.0f} s against {base_s or 0:.0f} s"
        )
        return replace(result, line=line)

    def equal_budget(self, name: str = "plan") -> TimeToAccuracy | None:
        """With a longer baseline budget: when `name` first reached the defaults' best within the arms' budget (the
        first `budget_s` seconds of their longer run, measured on the same curve); None at equal budgets."""
        base, arm = self.arm("defaults"), self.arm(name)
        if base is None or arm is None or not self.baseline_budget_s or self.baseline_budget_s <= self.budget_s:
            return None
        within = [p for p in base.curve if p.seconds <= self.budget_s]
        if not within:
            return None
        best = max(within, key=lambda p: p.map50_95)
        seconds = time_to_reach(arm.curve, best.map50_95)
        head = (
            f"at equal time: the defaults' best in their first {self.budget_s:.0f} s was {fmt_map(best.map50_95)} "
            f"(at {best.seconds:.0f} s, epoch {best.epoch}, {self.baseline_budget_s:.0f} s schedule)"
        )
        if seconds is None:
            return TimeToAccuracy(name, best.map50_95, None, best.seconds, f"{head}; {name} did not reach it")
        ratio = seconds / best.seconds if best.seconds else None
        share = f" ({ratio:.0%} of the time)" if ratio is not None else ""
        return TimeToAccuracy(
            name, best.map50_95, seconds, best.seconds, f"{head}; {name} reached it at {seconds:.0f} s{share}"
        )

    # --- rendering ---------------------------------------------------------------------------------------------

    def __rich__(self) -> RenderableType:

        return render.render_comparison(self, saved=Path(self.run_dir) / JSON_NAME)

    def save_png(self, path: str | Path) -> Path:
        """mAP50-95 against wall-clock seconds, every arm on one axis, the baseline's target as a line."""

        return render.save_comparison_png(self, Path(path))

    # --- JSON --------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        arms = []
        for a in self.arms:
            d = asdict(a)
            d["curve"] = [
                {"epoch": p.epoch, "seconds": p.seconds, "mAP50": p.map50, "mAP50-95": p.map50_95} for p in a.curve
            ]
            d["final"] = [{"imgsz": s.imgsz, "mAP50": s.map50, "mAP50-95": s.map50_95} for s in a.final]
            d["latency_ms"] = {str(size): ms for size, ms in a.latency_ms}
            arms.append(d)
        heads = [self.time_to_accuracy(a.name) for a in self.arms if a.name != "defaults"]
        equal = [e for e in (self.equal_budget(a.name) for a in self.arms if a.name != "defaults") if e is not None]
        return {
            "format": self.format,
            "budget_s": self.budget_s,
            "baseline_budget_s": self.baseline_budget_s,
            "val_imgsz": self.val_imgsz,
            "val_sizes": list(self.val_sizes),
            "seed": self.seed,
            "model": self.model,
            "device": self.device,
            "run_dir": self.run_dir,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "prepare_s": self.prepare_s,
            "hardware": hardware.to_dict(self.hardware),
            "dataset": self.dataset.to_dict(),
            "requested": list(self.requested),
            "interrupted": self.interrupted,
            "arms": arms,
            "time_to_accuracy": [
                {
                    "arm": t.arm,
                    "target_mAP50-95": t.target,
                    "seconds": t.seconds,
                    "baseline_seconds": t.baseline_seconds,
                    "ratio": t.ratio,
                    "line": t.line,
                }
                for t in heads
            ],
            "equal_budget": [
                {
                    "arm": t.arm,
                    "target_mAP50-95": t.target,
                    "seconds": t.seconds,
                    "baseline_seconds": t.baseline_seconds,
                    "ratio": t.ratio,
                    "line": t.line,
                }
                for t in equal
            ],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            write_atomic(Path(path), text.encode())
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> Comparison:
        given = Path(path)
        path = given / JSON_NAME if given.is_dir() else given
        missing = f"no {JSON_NAME} in {given}" if given.is_dir() else f"{given}: no such compare folder or file"
        doc = read_json(path, "a comparison", SpeedtrainError, missing)
        try:
            if int(doc.get("format", 0)) > FORMAT:
                raise SpeedtrainError(f"{path}: compare format {doc['format']} is newer than this speedtrain reads")
            arms = tuple(
                ArmResult(
                    **{k: v for k, v in a.items() if k not in ("curve", "final", "latency_ms", "phases")},
                    phases=tuple(int(p) for p in a.get("phases", ())),
                    curve=tuple(Point(p["epoch"], p["seconds"], p["mAP50"], p["mAP50-95"]) for p in a["curve"]),
                    final=tuple(Score(s["imgsz"], s["mAP50"], s["mAP50-95"]) for s in a["final"]),
                    latency_ms=tuple((int(k), float(v)) for k, v in a["latency_ms"].items()),
                )
                for a in doc["arms"]
            )
            dataset = DatasetSummary.from_dict(doc["dataset"])
            return cls(
                budget_s=doc["budget_s"],
                val_imgsz=doc["val_imgsz"],
                val_sizes=tuple(doc["val_sizes"]),
                seed=doc["seed"],
                model=doc["model"],
                device=doc["device"],
                run_dir=doc["run_dir"],
                started_at=doc["started_at"],
                finished_at=doc["finished_at"],
                prepare_s=doc["prepare_s"],
                requested=tuple(doc.get("requested", ())),
                baseline_budget_s=float(doc.get("baseline_budget_s", 0.0)),
                hardware=hardware.from_dict(doc["hardware"], str(doc["hardware"].get("source", path))),
                dataset=dataset,
                arms=arms,
                format=doc.get("format", FORMAT),
                source=str(path),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SpeedtrainError(f"{path}: not a speedtrain comparison ({first_line(exc)})") from None


# --- running ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompareRequest:
    """What a comparison was asked for: the dataset (None: the embedded sample), the plan's overrides and
    Ultralytics arguments, the arms and each one's wall-clock budget (the defaults arm's `baseline_budget_s`,
    default BASELINE_FACTOR x `budget_s`), the size every curve is validated at (default: the baseline's), the
    baseline's size (default Ultralytics'), the random seed, the run folder PROJECT/NAME and whether Ultralytics' own
    output goes to its log file (`quiet`)."""

    dataset: str | os.PathLike[str] | None
    overrides: Overrides
    extra: tuple[str, ...]
    arms: tuple[str, ...]
    budget_s: float
    val_imgsz: int | None = None
    baseline_imgsz: int | None = None
    seed: int = 0
    project: str | os.PathLike[str] = workflow.DEFAULT_PROJECT
    name: str = "compare"
    quiet: bool = False
    baseline_budget_s: float | None = None


@dataclass(frozen=True, slots=True)
class Views:
    """The datasets the arms train on: the original's linked view (the defaults arm) and the prepared copy's (the
    plan arms; the original's when the plan does not resize), and the seconds the resize took."""

    original: Path
    prepared: Path
    prepare_s: float


def compare(request: CompareRequest, hooks: Hooks = Hooks()) -> Comparison:
    """`speedtrain compare` from its checked arguments: plan with a fine-tune stage (and for the arms' budget, in
    phases), check Ultralytics' arguments and the disk before the run folder exists, prepare the views, then train
    every arm; the defaults arm for its baseline budget."""
    from speedtrain import ultra

    r, overrides, names, budget_s = request, request.overrides, request.arms, request.budget_s
    workflow.check_run_folder(r.project, r.name)
    # the one-size arms' plan (a fine-tune stage for plan+finetune and plan-640; the phases are the plan arm's)
    planned = workflow.make_plan(r.dataset, replace(overrides, finetune="yes", phases=None), r.extra)
    defaults = ultra.defaults()
    workflow.check_ultralytics_args(planned)
    base_size = r.baseline_imgsz or int(defaults["imgsz"])
    need = len(names) * workflow.CHECKPOINT_ROOM_GB  # each arm's checkpoints (saved epochs go once scored)
    check_free_disk(Path(r.project), need, f"comparing {len(names)} arms", "free some space")
    plan_ov = replace(overrides, finetune="yes", extra=planned.plan.stages[0].extra, phases=None)
    # the plan arms for the arms' budget, as `train --time` plans it and in phases (planned for a minute at least;
    # each arm sets its own deadline)
    budgeted = replace(plan_ov, time=max(budget_s, 60.0) / 3600, finetune=overrides.finetune)
    timed = planner.plan(planned.hw, planned.stats, replace(budgeted, phases=overrides.phases))
    phased = None
    if "plan-phases" in names:
        phased = planner.plan(planned.hw, planned.stats, replace(budgeted, phases=overrides.phases or "auto"))
    classic = planner.plan(planned.hw, planned.stats, replace(plan_ov, recipe="classic"))
    run_dir = workflow.new_run_dir(r.project, r.name)
    hooks.log(f"run folder: {run_dir}")
    prepared, original_yaml, prepared_yaml, prepare_s = prepare_views(planned, Path(r.project))
    arms = arms_for(prepared.plan, names, defaults, base_size, timed, classic, phased)
    decided = replace(
        r, val_imgsz=r.val_imgsz or base_size, baseline_budget_s=r.baseline_budget_s or BASELINE_FACTOR * budget_s
    )
    return run(prepared, arms, decided, run_dir, Views(original_yaml, prepared_yaml, prepare_s), hooks)


def run(
    planned: Planned,  # made with a fine-tune stage
    arms: tuple[Arm, ...],
    request: CompareRequest,
    run_dir: Path,
    views: Views,
    hooks: Hooks = Hooks(),
) -> Comparison:
    """Train every arm for the request's budget (the defaults arm for its baseline budget, default the same),
    validate their saved epochs and final weights at its `val_imgsz` (default the plan's size), measure their
    latency."""
    from speedtrain import ultra

    log, budget_s, seed = hooks.log, request.budget_s, request.seed
    baseline_budget_s = request.baseline_budget_s
    log_file = run_dir / workflow.ULTRALYTICS_LOG if request.quiet else None
    prepare_s = views.prepare_s
    started = utc_now()
    plan: TrainPlan = planned.plan
    val_imgsz = request.val_imgsz or plan.stages[0].imgsz
    val_sizes = tuple(sorted({val_imgsz, plan.stages[0].imgsz, *(s.imgsz for a in arms for s in a.stages[:1])}))
    results = []
    with ultra.session():
        source, note = ultra.fetch(*ultra.resolve_model(plan.model))
        ultra.check_loads(source)
        ultra.go_offline()
        log(note)
        for arm in arms:
            data = views.prepared if arm.prepared else views.original
            results.append(
                _run_arm(
                    arm,
                    source,
                    runner.StageContext(data, run_dir / arm.name, hooks, log_file),
                    (baseline_budget_s or budget_s) if arm.name == "defaults" else budget_s,
                    prepare_s if arm.prepared else 0.0,
                    val_imgsz,
                    val_sizes,
                    seed,
                )
            )
            partial = _comparison(planned, budget_s, val_imgsz, val_sizes, seed, run_dir, started, prepare_s, results)
            partial = replace(
                partial, requested=tuple(a.name for a in arms), baseline_budget_s=baseline_budget_s or 0.0
            )
            partial.to_json(run_dir / JSON_NAME)  # after every arm: an interrupted comparison keeps what finished
            if results[-1].status == "interrupted":
                log(f"stopped during {arm.name}; {JSON_NAME} keeps the arms trained so far")
                break
    final = _comparison(planned, budget_s, val_imgsz, val_sizes, seed, run_dir, started, prepare_s, results)
    final = replace(final, requested=tuple(a.name for a in arms), baseline_budget_s=baseline_budget_s or 0.0)
    final.to_json(run_dir / JSON_NAME)
    try:
        final.save_png(run_dir / PNG_NAME)
    except Exception as exc:  # a convenience: the JSON has everything
        log(f"could not draw {PNG_NAME} ({type(exc).__name__}: {exc})")
    return final


def _comparison(
    planned: Planned,
    budget_s: float,
    val_imgsz: int,
    val_sizes: tuple[int, ...],
    seed: int,
    run_dir: Path,
    started: str,
    prepare_s: float,
    results: list[ArmResult],
) -> Comparison:
    return Comparison(
        budget_s=budget_s,
        val_imgsz=val_imgsz,
        val_sizes=val_sizes,
        seed=seed,
        model=planned.plan.model,
        device=planned.plan.device,
        run_dir=str(run_dir),
        started_at=started,
        finished_at=utc_now(),
        prepare_s=round(prepare_s, 2),
        hardware=planned.hw,
        dataset=DatasetSummary.of(planned.stats),
        arms=tuple(results),
    )


def _run_arm(
    arm: Arm,
    source: str,
    context: runner.StageContext,
    budget_s: float,
    offset_s: float,
    val_imgsz: int,
    val_sizes: tuple[int, ...],
    seed: int,
) -> ArmResult:
    """One arm trained for `budget_s` in the context's folder (its stages in turn, from `source`), `offset_s` of
    preparation already on its clock; then its saved epochs validated at `val_imgsz` and its final weights at each
    of `val_sizes`."""
    log, on_update, log_file = context.hooks.log, context.hooks.on_update, context.log_file
    data_yaml, arm_dir = Path(context.data_yaml), context.project
    log(f"{arm.name}: training for {budget_s:.0f} s")
    weights, clock, curve_parts, stage_results = source, offset_s, [], []
    t0 = time.perf_counter()
    for stage, share in zip(arm.stages, arm.shares, strict=True):
        timed = _for_budget(stage, budget_s * share, seed)
        progress = _renamed(on_update, arm.name)
        result = runner.train_stage(timed, weights, replace(context, hooks=replace(context.hooks, on_update=progress)))
        stage_results.append(result)
        curve_parts.append((clock, timed, result))
        clock += result.wall_time_s
        weights = result.weights or result.last_weights or weights
        if result.status == "interrupted":
            break
    wall = round(offset_s + time.perf_counter() - t0, 2)
    last = stage_results[-1]
    ran = arm.stages[len(stage_results) - 1]
    final_weights = last.weights or last.last_weights
    if last.status == "interrupted":  # stopped (Ctrl-C, SIGTERM): no minutes of validation after the request
        return _interrupted(arm, stage_results, wall, arm_dir)
    log(f"{arm.name}: validating its saved epochs at {val_imgsz} px")
    t_eval = time.perf_counter()
    from speedtrain import ultra

    with ultra.output_to(log_file), torch_threads_restored():  # the validator sets its own threads
        points: list[Point] = []
        epochs_before = 0
        limits = curve_limits([res.epochs_done for _, _, res in curve_parts], MAX_CURVE_POINTS)
        for (start, st, res), limit in zip(curve_parts, limits, strict=True):  # a fine-tune's go on from main's
            part = _curve(st, res, start, data_yaml, arm_dir, val_imgsz, limit)
            points += [replace(p, epoch=p.epoch + epochs_before) for p in part]
            epochs_before += res.epochs_done
        curve = tuple(points)
        final = tuple(_score(final_weights, data_yaml, s, ran, arm_dir) for s in val_sizes) if final_weights else ()
        eval_s = round(time.perf_counter() - t_eval, 2)
        measured = scoring.with_latency(last, ran, log)
    main = stage_results[0]
    note = last.note
    if last.status == "early-stopped":
        note = note or _why_it_ended(stage_results, ran, budget_s)
    return ArmResult(
        name=arm.name,
        imgsz=arm.stages[0].imgsz,
        batch=main.batch,
        epochs_done=sum(r.epochs_done for r in stage_results),
        images_per_s=main.images_per_s_steady or main.images_per_s,
        wall_s=wall,
        eval_s=eval_s,
        status=last.status,
        note=note,
        weights=final_weights,
        curve=curve,
        final=final,
        latency_ms=measured.latency_ms,
        phases=tuple(p.imgsz for p in arm.stages[0].schedule.phases) if arm.stages[0].schedule else (),
    )


def _for_budget(stage: Stage, seconds: float, seed: int) -> Stage:
    """An arm's stage for `seconds`: saving every epoch; a budgeted stage's phases with that deadline, else
    Ultralytics' time= fitting the epochs."""
    extra = {**dict(stage.extra), "save_period": 1, "plots": False, "val": True, "seed": seed}
    if stage.schedule is not None:
        return replace(stage, schedule=replace(stage.schedule, budget_s=seconds), extra=tuple(extra.items()))
    return replace(stage, extra=tuple({**extra, "time": seconds / 3600}.items()))


def _interrupted(arm: Arm, results: list[StageResult], wall: float, arm_dir: Path) -> ArmResult:
    """An arm stopped by Ctrl-C or SIGTERM: what it trained, its saved epochs kept and not validated."""
    last = results[-1]
    by = f" by {last.stopped_by}" if last.stopped_by and last.stopped_by != "SIGINT" else ""
    return ArmResult(
        name=arm.name,
        imgsz=arm.stages[0].imgsz,
        batch=results[0].batch,
        epochs_done=sum(r.epochs_done for r in results),
        images_per_s=None,
        wall_s=wall,
        eval_s=0.0,
        status="interrupted",
        weights=last.weights or last.last_weights,
        stopped_by=last.stopped_by,
        note=f"interrupted{by}: its saved epochs are kept in {arm_dir}, not validated",
    )


def _why_it_ended(results: list[StageResult], ran: Stage, budget_s: float) -> str:
    """Why an arm ended before its planned epochs: the budget, early stopping, or Ultralytics' time= fitting (it
    sets the epochs from the mean epoch time, so a slow first epoch can leave part of the budget unused)."""
    trained = sum(r.wall_time_s for r in results)
    if trained >= 0.9 * budget_s:
        return "ended by the time budget"
    last = results[-1]
    best = max(range(len(last.epoch_map50_95)), key=last.epoch_map50_95.__getitem__, default=None)
    epochs = last.epoch_validated or tuple(range(1, len(last.epoch_map50_95) + 1))  # --val-every: the validated ones
    if best is not None and last.epochs_done - epochs[best] >= ran.patience * last.val_every:
        return f"ended before the budget: no improvement for {ran.patience} epochs (patience)"
    return (
        f"ended before the budget ({trained:.0f} of {budget_s:.0f} s): Ultralytics' time= fitted "
        f"{last.epochs_done} epochs to the budget from the mean epoch time"
    )


def _renamed(on_update: OnProgress | None, name: str) -> OnProgress | None:
    """Progress events under the arm's name (the stages are all called "train")."""
    if on_update is None:
        return None
    return lambda ev: on_update(replace(ev, stage=name))


def curve_limits(epochs: list[int], cap: int) -> list[int]:
    """How many saved epochs of each of an arm's stages its curve validates: all of them while the arm has at most
    `cap`, else `cap` shared in proportion to the epochs (largest remainders), at least the last of each stage."""
    total = sum(epochs)
    if total <= cap:
        return list(epochs)
    exact = [cap * e / total for e in epochs]
    limits = [min(e, max(1, int(x))) for e, x in zip(epochs, exact, strict=True)]
    by_remainder = sorted(range(len(epochs)), key=lambda i: int(exact[i]) - exact[i])
    for i in by_remainder:
        if sum(limits) < cap and limits[i] < epochs[i]:
            limits[i] += 1
    return limits


def _curve(
    stage: Stage, result: StageResult, start: float, data: Path, arm_dir: Path, imgsz: int, limit: int
) -> list[Point]:
    """Validate `limit` of the stage's saved epochs (evenly spaced, the last always) at `imgsz`, then delete their
    checkpoints (best.pt and last.pt stay)."""
    weights = Path(result.save_dir or arm_dir / stage.name) / "weights"
    saved = sorted((int(p.stem.removeprefix("epoch")), p) for p in weights.glob("epoch*.pt"))
    picked = {saved[i][0] for i in spread(len(saved), limit)}
    points = []
    for epoch, path in saved:
        if epoch in picked and epoch < len(result.epoch_end_s):
            score = _score(str(path), data, imgsz, stage, arm_dir)
            points.append(Point(epoch + 1, round(start + result.epoch_end_s[epoch], 2), score.map50, score.map50_95))
        path.unlink(missing_ok=True)
    return points


def _score(weights: str | Path, data: Path, imgsz: int, stage: Stage, arm_dir: Path) -> Score:
    """Ultralytics' validator on `weights` at `imgsz`: the same split and settings for every arm."""
    return Score(imgsz, *scoring.validate_at(weights, data, imgsz, stage, arm_dir / "eval"))


def prepare_views(planned: Planned, project: Path) -> tuple[Planned, Path, Path, float]:
    """The original dataset's view (the defaults arm) and, when the plan resizes, the prepared copy's (plan arms),
    with the seconds the resize took."""

    original = resize.make_view(planned.stats, resize.view_dir(planned.stats, project))
    if not planned.plan.prepare_size:
        return planned, original, original, 0.0
    t0 = time.perf_counter()
    prepared = workflow.prepare_dataset(planned, project)
    seconds = time.perf_counter() - t0
    view = resize.make_view(prepared.stats, resize.view_dir(prepared.stats, project))
    return prepared, original, view, seconds
