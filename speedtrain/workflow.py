"""The steps behind each command: probe + scan + plan, then view + run + report. The CLI only calls these."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from speedtrain import dataset, hardware, planner, prepare, report, runner
from speedtrain.dataset import DatasetStats
from speedtrain.errors import DatasetError
from speedtrain.hardware import HardwareSnapshot
from speedtrain.planner import Overrides, TrainPlan

SAMPLE_DIR = Path(__file__).parent / "sample"
DEFAULT_PROJECT = Path("runs") / "speedtrain"


def scan_dataset(path: str | Path | None) -> DatasetStats:
    """Scan the dataset (the embedded sample when `path` is None) and refuse one training cannot use."""
    stats = dataset.scan(path if path is not None else SAMPLE_DIR)
    if stats.errors:
        first = stats.errors[0]
        more = f" (and {len(stats.errors) - 1} more; run `speedtrain check`)" if len(stats.errors) > 1 else ""
        raise DatasetError(f"{first.line()}{more}")
    return stats


def make_plan(
    dataset_path: str | Path | None,
    overrides: Overrides,
    extra_args: list[str] | tuple[str, ...] = (),
    hardware_file: str | Path | None = None,
) -> tuple[HardwareSnapshot, DatasetStats, TrainPlan]:
    """Probe (or load) the hardware, scan the dataset and plan the run."""
    stats = scan_dataset(dataset_path)
    hw = hardware.load(hardware_file) if hardware_file else hardware.probe(stats.root)
    if extra_args:
        extra = planner.parse_extra_args(list(extra_args), runner.ultralytics_defaults())
        overrides = replace(overrides, extra=overrides.extra + extra)
    overrides = replace(overrides, sample=dataset_path is None)
    return hw, stats, planner.plan(hw, stats, overrides)


def new_run_dir(project: str | Path, name: str) -> Path:
    """A fresh run folder: project/name, or name2, name3, ... when taken; an earlier run is never reused."""
    project = Path(project)
    project.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = project / (name if n == 1 else f"{name}{n}")
        try:
            candidate.mkdir()
            return candidate.absolute()
        except FileExistsError:
            continue
    raise DatasetError(f"{project}: no free run folder name for {name!r}")


def execute(
    hw: HardwareSnapshot,
    stats: DatasetStats,
    plan: TrainPlan,
    project: str | Path = DEFAULT_PROJECT,
    name: str = "train",
    *,
    ask: Callable[[runner.StageResult], bool | None] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[dict[str, Any], Path]:
    """Train the plan through a linked view of the dataset; write speed_report.json; return it and its path."""
    os.environ.setdefault("YOLO_VERBOSE", "True")
    run_dir = new_run_dir(project, name)
    view_yaml = prepare.make_view(stats, prepare.view_dir(stats, project))
    log(f"run folder: {run_dir}")
    result = runner.run(plan, view_yaml, run_dir, decide_finetune=ask, log=log)
    doc = report.build_report(hw, stats, plan, result)
    return doc, report.save_report(doc, run_dir)
