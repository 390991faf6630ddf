"""The Python API, as a notebook uses it: typed results, SpeedtrainError for bad input, process state restored."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import snapshot
from rich.console import Console

import speedtrain
from speedtrain import api, planner
from speedtrain.errors import SpeedtrainError, UsageError
from speedtrain.speedreport import SpeedReport

REPO = Path(__file__).resolve().parents[1]


def text_of(renderable) -> str:
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(renderable)
    return out.getvalue()


def test_the_package_exports_the_api():
    for name in ("probe", "plan", "prepare", "check", "tune", "train", "resume", "report"):
        assert getattr(speedtrain, name) is getattr(api, name)
    assert speedtrain.SpeedReport.__name__ == "SpeedReport"


def test_plan_on_a_saved_machine_returns_a_report_that_renders(make_dataset):
    rep = speedtrain.plan(make_dataset(8, 4), hardware=snapshot((24,)), epochs=7, batch=16, cache="disk")
    assert isinstance(rep, speedtrain.SpeedReport)
    assert rep.run is None
    main = rep.plan.stages[0]
    assert (main.epochs, main.batch, main.cache, main.device) == (7, 16, "disk", "0")
    text = text_of(rep)
    assert "Plan: yolo26n on 0" in text
    assert "Fake GPU 24GB" in text


def test_ultralytics_arguments_pass_through_checked(make_dataset):
    root = make_dataset(4, 2)
    rep = speedtrain.plan(root, hardware=snapshot(), mosaic=0.5, seed=3, extra=["fliplr=0.0"])
    assert dict(rep.plan.stages[0].extra) == {"mosaic": 0.5, "seed": 3, "fliplr": 0.0}
    with pytest.raises(UsageError, match="mosaiq= is not an Ultralytics train argument"):
        speedtrain.plan(root, hardware=snapshot(), mosaiq=0.5)
    with pytest.raises(UsageError, match="expected a number"):
        speedtrain.plan(root, hardware=snapshot(), mosaic="lots")
    with pytest.raises(UsageError, match="data= is set by speedtrain; use the dataset argument"):
        speedtrain.plan(root, hardware=snapshot(), data="x.yaml")
    with pytest.raises(UsageError, match="cache='fast': expected one of ram, disk, none"):
        speedtrain.plan(root, hardware=snapshot(), cache="fast")


def test_bad_input_is_a_speedtrain_error_not_an_exit(tmp_path):
    with pytest.raises(SpeedtrainError, match="no such file or folder|does not exist|not found"):
        speedtrain.plan(tmp_path / "missing", hardware=snapshot())
    with pytest.raises(SpeedtrainError, match="no speed_report.json"):
        speedtrain.report(tmp_path)
    with pytest.raises(UsageError, match="budget_s 1"):
        speedtrain.tune(budget_s=1)


def test_library_code_never_exits_the_process():
    cli_only = {"cli.py", "__main__.py", "rank.py"}  # the entry points: the CLI and a launched rank's main
    pattern = re.compile(r"\bsys\.exit\(|\bSystemExit\b|\bimport typer\b|\bos\._exit\(")
    offenders = [
        p.name for p in (REPO / "speedtrain").glob("*.py") if p.name not in cli_only and pattern.search(p.read_text())
    ]
    assert offenders == []


def test_process_state_is_restored_after_a_failed_call(tmp_path, monkeypatch):
    monkeypatch.delenv("SPEEDTRAIN_PROBE_ENV", raising=False)
    before_env, before_int = dict(os.environ), signal.getsignal(signal.SIGINT)

    def meddle(*_args, **_kwargs):
        os.environ["SPEEDTRAIN_PROBE_ENV"] = "1"
        os.environ.pop("YOLO_OFFLINE", None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise UsageError("stop here")

    monkeypatch.setattr(api.workflow, "make_plan", meddle)
    with pytest.raises(UsageError, match="stop here"):
        speedtrain.plan(tmp_path)
    assert dict(os.environ) == before_env
    assert signal.getsignal(signal.SIGINT) is before_int


@pytest.mark.slow
def test_notebook_style_training_returns_a_real_report_and_leaves_the_process_alone(make_dataset, tmp_path):
    import torch

    dataset = make_dataset(16, 4)
    env, handlers = dict(os.environ), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    lines: list[str] = []
    rep = speedtrain.train(
        dataset=dataset,
        epochs=1,
        imgsz=64,
        device="cpu",
        finetune="no",
        project=tmp_path / "runs",
        verbose=False,
        hooks=speedtrain.Hooks(log=lines.append),
    )
    assert isinstance(rep, speedtrain.SpeedReport)
    assert rep.run is not None
    assert rep.run.status == "finished"
    m = rep.main.measured
    assert m is not None
    assert (m.epochs_done, m.images_per_epoch) == (1, 16)
    assert m.images_per_s
    assert m.images_per_s > 0
    assert m.wall_time_s > 0
    assert rep.metric("mAP50-95") is not None  # Ultralytics' final validation ran (0.0 from scratch at 64 px)
    assert any(line.startswith("run folder:") for line in lines)
    assert dict(os.environ) == env  # YOLO_OFFLINE, and what importing Ultralytics sets (OMP_NUM_THREADS, ...)
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert torch.get_num_threads() == threads
    path = Path(rep.run.run_dir) / "speed_report.json"
    assert speedtrain.SpeedReport.from_json(path) == rep
    assert speedtrain.report(rep.run.run_dir).to_dict() == json.loads(path.read_text())
    assert "Measured on this machine" in text_of(rep)
    png = rep.save_png(tmp_path / "again.png")
    assert png.stat().st_size > 10_000


def test_tune_and_compare_under_a_launcher_are_refused_in_one_line(monkeypatch, tmp_path):
    """train and resume run as ranks (tests/test_distributed.py); tune and compare measure one process."""
    from typer.testing import CliRunner

    from speedtrain.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UsageError, match="started as rank 1 of 2 by a launcher"):
        speedtrain.tune(project=tmp_path)
    for command in ("tune", "compare"):
        result = CliRunner().invoke(app, [command, "--project", str(tmp_path)])
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1: one process, allowed
    api.refuse_external_launcher()


def test_a_run_of_several_nodes_is_resumed_through_its_launcher(tmp_path, monkeypatch):
    """A run planned for torchrun's WORLD_SIZE 16 on nodes of 2 GPUs cannot be started again as local ranks."""
    from conftest import fake_stats

    from speedtrain.knobs import Overrides

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    hw, stats = snapshot((24, 24)), fake_stats()
    plan = planner.plan(hw, stats, Overrides(world=16, nproc_per_node=2))
    assert plan.ranks == 16
    assert plan.stages[0].batch % 16 == 0  # per-GPU batch x 16 ranks
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    SpeedReport.planned(hw, stats, plan).started(run_dir, tmp_path / "view.yaml").to_json(run_dir / "speed_report.json")
    with pytest.raises(UsageError, match="trained as 16 ranks across nodes; go on with the launcher command"):
        speedtrain.resume(run_dir)


def test_hints_name_the_keyword_in_python_and_the_flag_on_the_command_line(make_dataset, tmp_path):
    from typer.testing import CliRunner

    from speedtrain.cli import app

    root = make_dataset(2, 1)
    with pytest.raises(UsageError, match=r"^threads=1000: this machine has \d+ logical cores"):
        speedtrain.plan(root, threads=1000)
    with pytest.raises(UsageError, match=r"^imgsz=100000: a batch of"):
        speedtrain.plan(root, imgsz=100_000, device="cpu")
    result = CliRunner().invoke(app, ["plan", "--dataset", str(root), "--threads", "1000"])
    assert result.exit_code == 2
    assert "--threads 1000: this machine has" in result.stderr


def test_the_keywords_are_typed_so_a_type_checker_catches_a_typo(tmp_path):
    """speedtrain/keywords.py (generated from the knobs and Ultralytics' arguments): mypy accepts the API's real
    keywords, Ultralytics' own included, and names a mistyped keyword or a choice that does not exist."""
    snippet = tmp_path / "use.py"
    snippet.write_text(
        "import speedtrain\n"
        'speedtrain.train("data", epochs=30, finetune="yes", mosaic=0.5, time="20m", seed=1)\n'
        'speedtrain.plan("data", epoch=30)\n'
        'speedtrain.train("data", finetune="maybe")\n'
        'speedtrain.compare("data", budget="20m", phases="416,640")\n'
    )
    # in a child process: mypy's in-process run leaves millions of objects behind, and every later gc.collect()
    # in this test process (speedtrain frees memory after each training call) would take seconds
    done = subprocess.run(
        [sys.executable, "-m", "mypy", str(snippet), "--no-incremental", "--follow-imports=silent"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out, code = done.stdout, done.returncode
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert code == 1
    assert [line.split(":")[1] for line in errors] == ["3", "4"], out
    assert '"epoch"' in errors[0]
    assert '"maybe"' in errors[1] or "finetune" in errors[1]
