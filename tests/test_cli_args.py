"""The CLI is a thin shell: each command calls one API function with exactly these arguments (fastapi-cli's way of
testing a CLI: patch the library call, run the command, assert what it was given)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import fake_stats, snapshot
from typer.testing import CliRunner

from speedtrain import cli, knobs, planner
from speedtrain.records import ResizeSummary, TuneResult
from speedtrain.speedreport import SpeedReport

DATA = Path(__file__).parent / "data"
FINISHED = SpeedReport.from_json(DATA / "speed_report_v1.json")
PLANNED = SpeedReport.planned(snapshot(), fake_stats(), planner.plan(snapshot(), fake_stats()))
TUNED = TuneResult("k", "cpu", "yolo26n", 64, (), (), 8, 2, False, 10.0, "compute", 1.5, ("fine",))
RESIZED = ResizeSummary("out", "out/data.yaml", 416, 4, 3, 1, 0, (), 4, 0, 1000, 500, 0.5, 2)


@pytest.fixture
def calls(monkeypatch) -> dict[str, tuple[tuple, dict]]:
    """Replace each API function the CLI calls with a recorder returning a real value of the right type."""
    seen: dict[str, tuple[tuple, dict]] = {}
    returns: dict[str, Any] = {
        "probe": snapshot(),
        "plan": PLANNED,
        "train": FINISHED,
        "resume": FINISHED,
        "tune": TUNED,
        "prepare": RESIZED,
        "check": (),
        "report": FINISHED,
    }
    for name, value in returns.items():

        def record(*args: Any, _name: str = name, _value: Any = value, **kwargs: Any) -> Any:
            seen[_name] = (args, kwargs)
            return _value

        monkeypatch.setattr(cli.api, name, record)
    return seen


def invoke(*args: str):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    return result


PLAN_DEFAULTS = {k.name: k.default for k in knobs.KNOBS}  # every knob is an option of plan and train


def test_plan_passes_every_option(calls, tmp_path):
    result = invoke(
        "plan",
        "--dataset",
        tmp_path,
        "--hardware",
        tmp_path / "box.json",
        "--epochs",
        "7",
        "--batch-size",
        "16",
        "--img-size",
        "320",
        "--cache",
        "disk",
        "--no-rect",
        "--finetune",
        "no",
        "--pipeline",
        "fast",
        "--threads",
        "3",
        "--deterministic",
        "--val-every",
        "3",
        "--allow-download",
        "mosaic=0.5",
    )
    assert result.exit_code == 0, result.output
    args, kwargs = calls["plan"]
    assert args == (tmp_path,)
    assert kwargs == {
        **PLAN_DEFAULTS,
        "hardware": tmp_path / "box.json",
        "allow_download": True,
        "extra": ["mosaic=0.5"],
        "epochs": 7,
        "batch": 16,
        "imgsz": 320,
        "cache": "disk",
        "rect": False,
        "finetune": "no",
        "pipeline": "fast",
        "threads": 3,
        "deterministic": True,
        "val_every": "3",
    }


def test_plan_json_is_the_reports_json(calls):
    result = invoke("plan", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == PLANNED.to_dict()
    assert calls["plan"][1] == {**PLAN_DEFAULTS, "hardware": None, "allow_download": False, "extra": []}


def test_train_passes_every_option(calls, tmp_path):
    result = invoke(
        "train",
        "--dataset",
        tmp_path,
        "--epochs",
        "3",
        "--device",
        "cpu",
        "--finetune",
        "yes",
        "--project",
        tmp_path / "runs",
        "--name",
        "exp",
        "--autotune",
        "--budget-s",
        "30",
        "--verbose",
        "--nproc-per-node",
        "2",
        "--time",
        "2h",
        "seed=1",
    )
    assert result.exit_code == 0, result.output
    args, kwargs = calls["train"]
    assert args == (tmp_path,)
    hooks = kwargs.pop("hooks")
    assert all(callable(h) for h in (hooks.log, hooks.ask, hooks.on_event, hooks.progress))
    assert hooks.on_update is None  # --verbose: Ultralytics' own output, no progress display
    assert kwargs == {
        **PLAN_DEFAULTS,
        "project": tmp_path / "runs",
        "name": "exp",
        "autotune": True,
        "retune": False,
        "budget_s": 30.0,
        "allow_download": False,
        "verbose": True,
        "extra": ["seed=1"],
        "epochs": 3,
        "device": "cpu",
        "finetune": "yes",
        "nproc_per_node": 2,
        "time": "2h",
    }
    assert "Measured on this machine" in result.output
    assert "resume" not in calls


def test_train_resume_calls_resume_only(calls, tmp_path):
    result = invoke("train", "--resume", tmp_path)
    assert result.exit_code == 0, result.output
    args, kwargs = calls["resume"]
    assert args == (tmp_path,)
    assert set(kwargs) == {"hooks", "verbose"}
    assert kwargs["verbose"] is False
    assert callable(kwargs["hooks"].on_update)
    assert callable(kwargs["hooks"].ask)
    assert "train" not in calls


@pytest.mark.parametrize(
    "extra", [["--epochs", "5", "--batch-size", "4"], ["mosaic=0.5"], ["--dataset", "x", "--name", "y"]]
)
def test_flags_given_with_resume_are_one_line_not_ignored_in_silence(calls, tmp_path, extra):
    result = invoke("train", "--resume", tmp_path, *extra)
    assert result.exit_code == 2
    assert "with --resume: the run goes on as it was planned" in result.stderr
    assert all(t in result.stderr for t in extra if t.startswith(("--", "mosaic")))
    assert "resume" not in calls
    assert invoke("train", "--resume", tmp_path, "--verbose").exit_code == 0  # how it is shown may change


def test_an_interrupted_run_exits_130_with_the_resume_command(calls, monkeypatch, tmp_path):
    assert FINISHED.run is not None
    stopped = dataclasses.replace(FINISHED, run=dataclasses.replace(FINISHED.run, interrupted=True))
    monkeypatch.setattr(cli.api, "train", lambda *a, **k: stopped)
    result = invoke("train", "--dataset", tmp_path)
    assert result.exit_code == 130
    assert f"speedtrain train --resume {FINISHED.run.run_dir}" in result.stderr


def test_tune_passes_its_options(calls, tmp_path):
    result = invoke(
        "tune",
        "--dataset",
        tmp_path,
        "--imgsz",
        "320",
        "--budget-s",
        "20",
        "--retune",
        "--project",
        tmp_path,
        "--json",
        "fraction=0.5",
    )
    assert result.exit_code == 0, result.output
    args, kwargs = calls["tune"]
    assert args == (tmp_path,)
    assert callable(kwargs.pop("hooks").log)
    assert kwargs == {
        "project": tmp_path,
        "budget_s": 20.0,
        "retune": True,
        "extra": ["fraction=0.5"],
        "model": None,
        "imgsz": 320,
        "device": None,
        "threads": None,
    }
    assert json.loads(result.output) == TUNED.to_dict()


def test_prepare_check_probe_and_report(calls, tmp_path):
    assert invoke("prepare", "--dataset", tmp_path, "--size", "320", "--quality", "80", "--in-place").exit_code == 0
    args, kwargs = calls["prepare"]
    assert args == (tmp_path, 320, None)
    assert "progress" in kwargs  # a bar on a terminal, None with --json
    del kwargs["progress"]
    assert kwargs == {"workers": None, "quality": "80", "in_place": True}

    root = Path(__file__).parents[1] / "speedtrain" / "sample"
    assert invoke("check", "--dataset", root, "--workers", "2").exit_code == 0
    args, kwargs = calls["check"]
    assert args == (root,)
    assert kwargs["workers"] == 2

    assert invoke("probe", "--path", tmp_path).exit_code == 0
    assert calls["probe"] == ((tmp_path,), {})

    result = invoke("report", tmp_path, "--json")
    assert result.exit_code == 0
    assert calls["report"] == ((tmp_path,), {})
    assert json.loads(result.output) == FINISHED.to_dict()
