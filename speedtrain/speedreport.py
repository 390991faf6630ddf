"""SpeedReport: what a run planned, measured and ended with, as one typed value, and its JSON.

`SpeedReport.to_dict`/`from_dict` (and `to_json`/`from_json` around them) are the only code that knows the layout
of speed_report.json and of `speedtrain plan --json` (README, "JSON formats"). The hardware block is the hardware
snapshot's own format (hardware.to_dict/from_dict, also `probe --save` files) and the tune block the tune cache's
(TuneResult.to_dict/from_dict). Format 1 is written; format 1 is read, including reports written before the
prepare, tune and data_yaml entries existed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, cast, get_args

from rich.console import RenderableType
from rich.jupyter import JupyterMixin

from speedtrain import hardware, render
from speedtrain.dataset import NO_VAL_BOXES, DatasetStats, Problem
from speedtrain.errors import SpeedtrainError
from speedtrain.hardware import HardwareSnapshot
from speedtrain.knobs import BASELINE, DEFAULT_TARGET_MAP, ULTRALYTICS_IMGSZ, Stage, TrainPlan
from speedtrain.records import (
    DatasetSummary,
    OomFallback,
    Planned,
    Preparation,
    RankFigures,
    ResizeSummary,
    RunResult,
    StageResult,
    TuneResult,
)
from speedtrain.schedule import Schedule
from speedtrain.util import read_json, utc_now, write_atomic

FORMAT = 1
REPORT_NAME = "speed_report.json"
StageStatus = Literal["pending", "running", "completed", "early-stopped", "skipped", "interrupted"]
RunStatus = Literal["running", "finished", "interrupted"]
PENDING: tuple[StageStatus, ...] = ("pending",)  # stages a run never reached; "running" ones resume from a checkpoint
FINAL_SIZE = ULTRALYTICS_IMGSZ  # besides its training size, the model is scored where an untuned model is used


@dataclass(frozen=True, slots=True)
class StageReport:
    """One stage: as planned (`stage`, with any change made just before it trained), where it is, what it measured."""

    stage: Stage
    status: StageStatus = "pending"
    note: str = ""
    result: StageResult | None = None  # the JSON's "measured"; None for a stage not run or skipped

    @property
    def measured(self) -> StageResult | None:
        return self.result if self.result is not None and self.status != "skipped" else None


@dataclass(frozen=True, slots=True)
class RunInfo:
    run_dir: str
    data_yaml: str | None = None
    status: RunStatus = "running"
    model_source: str | None = None
    model_note: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    wall_time_s: float | None = None
    interrupted: bool = False
    stopped_by: str | None = None  # "SIGINT" (Ctrl-C) or "SIGTERM" (a scheduler) when interrupted
    resumed_at: str | None = None


@dataclass(frozen=True, slots=True)
class SpeedReport(JupyterMixin):
    """The speed report of a run (or, with `run` None, of a plan): renders itself in a terminal (rich) and in
    Jupyter, draws its PNG, and reads and writes speed_report.json."""

    plan: TrainPlan
    hardware: HardwareSnapshot
    dataset: DatasetSummary
    stages: tuple[StageReport, ...] = ()
    run: RunInfo | None = None
    prepare: Preparation | None = None
    tune: TuneResult | None = None
    version: int = FORMAT
    source: str = field(default="", compare=False)  # the file it was read from, for messages

    # --- building ----------------------------------------------------------------------------------------------

    @classmethod
    def planned(
        cls,
        hw: HardwareSnapshot,
        stats: DatasetStats | DatasetSummary,
        plan: TrainPlan,
        prepare: Preparation | None = None,
        tune: TuneResult | None = None,
    ) -> SpeedReport:
        summary = stats if isinstance(stats, DatasetSummary) else DatasetSummary.of(stats)
        return cls(plan, hw, summary, tuple(StageReport(s) for s in plan.stages), None, prepare, tune)

    @classmethod
    def of(cls, planned: Planned) -> SpeedReport:
        """A planned run as a report (no stage run yet): what `speedtrain plan` shows and prints as JSON."""
        return cls.planned(planned.hw, planned.stats, planned.plan, planned.prepared, planned.tuned)

    def started(self, run_dir: Path, data_yaml: Path) -> SpeedReport:
        return replace(self, run=RunInfo(str(run_dir), str(data_yaml), "running"))

    def resumed(self) -> SpeedReport:
        """The report going on: stages that had started lose their status (they run or are kept again)."""
        run = replace(self.run or RunInfo(""), status="running", resumed_at=utc_now())
        return replace(self, run=run, stages=tuple(StageReport(s.stage) for s in self.stages))

    def with_results(self, results: tuple[StageResult, ...], running: str | None = None) -> SpeedReport:
        """Each stage's status and figures: from `results`, "running" for `running`, else "pending"."""
        by_name = {r.name: r for r in results}
        stages = []
        for s in self.stages:
            res = by_name.get(s.stage.name)
            if res:
                stages.append(replace(s, status=cast(StageStatus, res.status), note=res.note, result=res))
            else:
                stages.append(
                    replace(s, status="running" if s.stage.name == running else "pending", note="", result=None)
                )
        return replace(self, stages=tuple(stages))

    def finished(self, result: RunResult) -> SpeedReport:
        run = replace(
            self.run or RunInfo(result.run_dir),
            run_dir=result.run_dir,
            model_source=result.model_source,
            model_note=result.model_note,
            started_at=result.started_at,
            finished_at=utc_now(),
            wall_time_s=result.wall_time_s,
            interrupted=result.interrupted,
            stopped_by=result.stopped_by,
            status="interrupted" if result.interrupted else "finished",
        )
        return replace(self.with_results(result.stages), run=run)

    def with_stage(self, stage: Stage, warning: str = "") -> SpeedReport:
        """A stage changed just before it trained (a RAM cache that no longer fits), with the warning saying so."""
        plan = replace(
            self.plan,
            stages=tuple(stage if s.name == stage.name else s for s in self.plan.stages),
            warnings=self.plan.warnings + ((warning,) if warning else ()),
        )
        stages = tuple(replace(s, stage=stage) if s.stage.name == stage.name else s for s in self.stages)
        return replace(self, plan=plan, stages=stages)

    # --- reading -----------------------------------------------------------------------------------------------

    def stage(self, name: str) -> StageReport | None:
        return next((s for s in self.stages if s.stage.name == name), None)

    def results(self) -> tuple[StageResult, ...]:
        """The stages that ran (or were skipped): what --resume keeps or goes on from."""
        return tuple(s.result for s in self.stages if s.result is not None and s.status not in PENDING)

    @property
    def main(self) -> StageReport:
        return self.stages[0]

    def metric(self, key: str = "mAP50-95") -> float | None:
        """The last stage that measured it: its final validation's figure."""
        values = [s.result.metric(key) for s in self.stages if s.measured and s.result]
        values = [v for v in values if v is not None]
        return values[-1] if values else None

    @property
    def no_metrics(self) -> str:
        """Why the run has no validation metrics ("" when it has): a val split without a single box."""
        found = next((p for p in self.dataset.problems if p.kind == NO_VAL_BOXES), None)
        return f"no validation metrics: the val split has no boxes ({found.file})" if found else ""

    def final_scores(self) -> tuple[tuple[int, float], ...]:
        """The final model's mAP50-95 at its training size and at 640 (Ultralytics' default size), (size, mAP50-95)
        ascending: the last stage that trained; none when the val split has no boxes to score against."""
        if self.no_metrics:
            return ()
        for s in reversed(self.stages):
            r = s.measured
            if r and r.epochs_done:
                own = r.metric("mAP50-95")
                scores = tuple((size, v) for size, v in r.scores if size in (r.imgsz, FINAL_SIZE))
                return scores or (((r.imgsz, own),) if own is not None else ())
        return ()

    @property
    def images_per_s(self) -> float | None:
        """The main stage's training images/s (steady state when there were several epochs)."""
        m = self.main.measured if self.stages else None
        return (m.images_per_s_steady or m.images_per_s) if m else None

    # --- rendering ---------------------------------------------------------------------------------------------

    def __rich__(self) -> RenderableType:

        return render.render_report(self) if self.run else render.render_planned(self)

    def save_png(self, path: str | Path) -> Path:

        return render.save_png(self, path)

    # --- JSON ----------------------------------------------------------------------------------------------------

    def to_json(self, path: str | Path | None = None) -> str:
        """The JSON text; with `path` (a file or a run folder), also written there atomically."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            target = Path(path)
            write_atomic(target / REPORT_NAME if target.is_dir() else target, text.encode())
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> SpeedReport:
        """Read speed_report.json (or a run folder holding one); one SpeedtrainError line when it is not one."""
        given = Path(path)
        path = given / REPORT_NAME if given.is_dir() else given
        missing = f"no {REPORT_NAME} in {given}" if given.is_dir() else f"{given}: no such run folder or report file"
        doc = read_json(path, "a speed report", SpeedtrainError, missing)
        return cls.from_dict(doc, str(path))

    def to_dict(self) -> dict[str, Any]:
        p = self.plan
        doc: dict[str, Any] = {
            "device": p.device,
            "model": p.model,
            "stages": [_stage_dict(s, with_status=self.run is not None) for s in self.stages],
            "reasons": dict(p.reasons),
            "target_map": p.target_map,
            "estimates": dict(p.estimates),
            "warnings": list(p.warnings),
            "cache_estimate_gb": p.cache_estimate_gb,
            "prepare_size": p.prepare_size,
            "baseline": dict(p.baseline),
            "ranks": p.ranks,
            "hardware": hardware.to_dict(self.hardware),
            "dataset": self.dataset.to_dict(),
        }
        if self.run is None:  # a plan (`speedtrain plan --json`)
            return doc
        doc["prepare"] = _preparation_dict(self.prepare) if self.prepare else None
        doc["tune"] = self.tune.to_dict() if self.tune else None
        run = asdict(self.run)
        for optional in ("resumed_at", "stopped_by"):  # present only when they happened
            if run[optional] is None:
                del run[optional]
        doc["run"] = {"version": self.version, **run}
        return doc

    @classmethod
    def from_dict(cls, doc: Any, source: str = "dict") -> SpeedReport:
        """Rebuild a report (or a plan document); a wrong shape is one line naming what is missing."""
        if not isinstance(doc, dict) or "stages" not in doc:
            raise SpeedtrainError(f"{source}: not a speedtrain speed report")
        shape = {"stages": list, "reasons": dict, "baseline": dict, "hardware": dict, "dataset": dict}
        wrong = [k for k, kind in shape.items() if not isinstance(doc.get(k), kind)]
        stages = doc["stages"] if isinstance(doc["stages"], list) else []
        if (
            wrong
            or not stages
            or not all(isinstance(s, dict) and {"name", "imgsz", "epochs"} <= set(s) for s in stages)
        ):
            what = ", ".join(wrong) if wrong else "stages"
            raise SpeedtrainError(f"{source}: not a complete speedtrain speed report ({what} missing or malformed)")
        run = doc.get("run")
        version = int(run.get("version", 1)) if isinstance(run, dict) else FORMAT
        if version > FORMAT:
            raise SpeedtrainError(f"{source}: report format {version} is newer than this speedtrain reads ({FORMAT})")
        try:
            plan = _plan(doc)
            reports = tuple(_stage_report(s, raw) for s, raw in zip(plan.stages, stages, strict=True))
            return cls(
                plan=plan,
                hardware=hardware.from_dict(doc["hardware"], str(doc["hardware"].get("source", source))),
                dataset=DatasetSummary.from_dict(doc["dataset"]),
                stages=reports,
                run=_run(run) if isinstance(run, dict) else None,
                prepare=_preparation(doc["prepare"]) if doc.get("prepare") else None,
                tune=TuneResult.from_dict(doc["tune"]) if doc.get("tune") else None,
                version=version,
                source=source,
            )
        except SpeedtrainError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SpeedtrainError(
                f"{source}: not a complete speedtrain speed report ({type(exc).__name__}: {exc})"
            ) from None


# --- the layout, block by block ------------------------------------------------------------------------------------


def _stage_dict(s: StageReport, with_status: bool) -> dict[str, Any]:
    data = asdict(s.stage)
    data["batch_fallbacks"] = list(s.stage.batch_fallbacks)
    data["extra"] = dict(s.stage.extra)
    if with_status:
        data["status"] = s.status
        data["note"] = s.note
        data["measured"] = _measured_dict(s.measured) if s.measured else None
    return data


def _measured_dict(r: StageResult) -> dict[str, Any]:
    data = asdict(r)
    for key in ("name", "status", "imgsz", "epochs_planned", "note", "stopped_by"):  # the stage's and run's own
        data.pop(key)
    data["epoch_times_s"] = list(r.epoch_times_s)
    data["train_times_s"] = list(r.train_times_s)
    data["epoch_end_s"] = list(r.epoch_end_s)
    data["latency_ms"] = {str(size): ms for size, ms in r.latency_ms}
    data["epoch_map50_95"] = list(r.epoch_map50_95)
    data["epoch_loss"] = list(r.epoch_loss)
    data["epoch_validated"] = list(r.epoch_validated)
    data["scores"] = {str(size): value for size, value in r.scores}  # final weights' mAP50-95 by image size
    data["oom_fallbacks"] = [asdict(o) for o in r.oom_fallbacks]
    data["ranks"] = [asdict(figures) for figures in r.ranks]
    data["best_metrics"] = dict(r.best_metrics)
    data["phase_log"] = [dict(e) for e in r.phase_log]
    return data


def _plan(doc: dict[str, Any]) -> TrainPlan:
    names = {f.name for f in fields(Stage)}
    stages = []
    for raw in doc["stages"]:
        kw = {k: v for k, v in raw.items() if k in names}
        kw["batch_fallbacks"] = tuple(kw.get("batch_fallbacks", ()))
        kw["extra"] = tuple((kw.get("extra") or {}).items())
        kw["schedule"] = Schedule.from_dict(kw["schedule"]) if kw.get("schedule") else None
        stages.append(Stage(**kw))
    return TrainPlan(
        device=doc["device"],
        model=doc["model"],
        stages=tuple(stages),
        reasons=tuple(doc.get("reasons", {}).items()),
        target_map=doc.get("target_map", DEFAULT_TARGET_MAP),
        estimates=tuple(doc.get("estimates", {}).items()),
        warnings=tuple(doc.get("warnings", ())),
        cache_estimate_gb=doc.get("cache_estimate_gb", 0.0),
        prepare_size=doc.get("prepare_size"),
        baseline=dict(doc.get("baseline", BASELINE)),
        ranks=int(doc.get("ranks", 1)),
    )


def _stage_report(stage: Stage, raw: dict[str, Any]) -> StageReport:
    status = raw.get("status", "pending")
    if status not in get_args(StageStatus):
        status = "pending" if status == "not run" else status  # "not run": an early version's word for pending
    if status not in get_args(StageStatus):
        raise ValueError(f"stage {stage.name} has status {status!r}")
    m = raw.get("measured")
    result = None
    if m or status in ("skipped", "completed", "early-stopped", "interrupted"):
        m = m or {}
        known = {f.name for f in fields(StageResult)}
        kw = {k: v for k, v in m.items() if k in known}
        kw.update(
            name=stage.name,
            status=status,
            imgsz=stage.imgsz,
            batch=m.get("batch", stage.batch),
            epochs_planned=stage.epochs,
            epochs_done=m.get("epochs_done", 0),
            note=raw.get("note", ""),
            epoch_times_s=tuple(m.get("epoch_times_s", ())),
            train_times_s=tuple(m.get("train_times_s", ())),
            epoch_end_s=tuple(m.get("epoch_end_s", ())),
            latency_ms=tuple((int(k), float(v)) for k, v in (m.get("latency_ms") or {}).items()),
            epoch_map50_95=tuple(float(v) for v in m.get("epoch_map50_95", ())),
            epoch_loss=tuple(float(v) for v in m.get("epoch_loss", ())),
            epoch_validated=tuple(int(v) for v in m.get("epoch_validated", ())),
            scores=tuple(sorted((int(k), float(v)) for k, v in (m.get("scores") or {}).items())),
            oom_fallbacks=tuple(OomFallback(**o) for o in m.get("oom_fallbacks", [])),
            ranks=tuple(RankFigures(**r) for r in m.get("ranks", [])),
            best_metrics=tuple(m.get("best_metrics", {}).items()),
            phase_log=tuple(dict(e) for e in m.get("phase_log", ())),
        )
        result = StageResult(**kw)
    return StageReport(stage, cast(StageStatus, status), raw.get("note", ""), result)


def _preparation_dict(p: Preparation) -> dict[str, Any]:
    return {
        "decision": p.decision,
        "summary": p.summary.to_dict(),
        "load_ms_original": p.load_ms_original,
        "load_ms_prepared": p.load_ms_prepared,
        "load_sample": p.load_sample,
        "saving_s_per_epoch": p.saving_s_per_epoch,
        "ram_cache": p.ram_cache,
        "original_dataset": p.original_dataset.to_dict(),
    }


def _preparation(raw: dict[str, Any]) -> Preparation:
    s = dict(raw["summary"])
    s.pop("images_per_s", None)  # derived
    failed = []
    for line in s.get("failed", []):
        file, _, detail = str(line).partition(": ")
        failed.append(Problem("warning", "unreadable-image", file, detail))
    s["failed"] = tuple(failed)
    s["qualities"] = tuple((int(q), int(n)) for q, n in dict(s.get("qualities") or {}).items())
    known = {f.name for f in fields(ResizeSummary)}
    return Preparation(
        decision=raw["decision"],
        summary=ResizeSummary(**{k: v for k, v in s.items() if k in known}),
        load_ms_original=raw.get("load_ms_original"),
        load_ms_prepared=raw.get("load_ms_prepared"),
        load_sample=int(raw.get("load_sample", 0)),
        original_dataset=DatasetSummary.from_dict(raw["original_dataset"]),
        ram_cache=bool(raw.get("ram_cache", False)),
    )


def _run(raw: dict[str, Any]) -> RunInfo:
    known = {f.name for f in fields(RunInfo)}
    kw = {k: v for k, v in raw.items() if k in known}
    if kw.get("status") not in get_args(RunStatus):  # reports written before "status" existed
        kw["status"] = "interrupted" if raw.get("interrupted") else "finished"
    return RunInfo(**kw)
