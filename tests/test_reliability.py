"""Surviving OOM, Ctrl-C and kill -9 (with --resume), memory and disk pressure, dataset scripts and odd inputs."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tree_hash, wait_for
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from speedtrain import checkpoints, planner, render, schedule, workflow
from speedtrain.cli import app
from speedtrain.knobs import Overrides

TINY = {"imgsz": 64, "finetune": "no", "prepare": "no"}


def csv_epochs(stage_dir: Path) -> list[int]:
    with (stage_dir / "results.csv").open(newline="") as f:
        return [int(float(row["epoch"])) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_oom_mid_training_goes_on_from_the_checkpoint_with_smaller_batches(make_dataset, tmp_path, fake_cuda_oom):
    fake_cuda_oom.from_epoch = 1  # the second epoch runs out of memory at any batch over 4
    planned = workflow.make_plan(make_dataset(8, 2), Overrides(epochs=3, batch=16, **TINY), ["plots=False"])
    rep = workflow.execute(planned, tmp_path / "runs")[0]
    doc = rep.to_dict()
    m = doc["stages"][0]["measured"]
    assert (m["batch"], m["epochs_done"], doc["stages"][0]["status"]) == (4, 3, "completed")
    assert [(o["epoch"], o["from_batch"], o["to_batch"]) for o in m["oom_fallbacks"]] == [(2, 16, 8), (2, 8, 4)]
    # epoch 1 trained once, at 16; epoch 2 was tried at 16 and 8 and done at 4, from epoch 1's checkpoint
    assert [b for e, b in fake_cuda_oom.epochs_started if e == 0] == [16]
    assert [b for e, b in fake_cuda_oom.epochs_started if e == 1] == [16, 8, 4]
    assert csv_epochs(Path(m["save_dir"])) == [1, 2, 3]
    assert len(m["epoch_times_s"]) == 3
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(render.render_measured(rep))
    text = out.getvalue()
    for o in m["oom_fallbacks"]:  # each step down is a line of the rendered report
        assert f"out of memory at batch {o['from_batch']}, continued with {o['to_batch']} (epoch 2, {o['at']})" in text


def _csv_rows(stage_dir: Path) -> list[dict[str, str]]:
    with (stage_dir / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _train_cmd(root: Path, project: Path, epochs: int) -> list[str]:
    args = ["--dataset", str(root), "--img-size", "64", "--epochs", str(epochs), "--finetune", "no"]
    return [
        sys.executable,
        "-m",
        "speedtrain",
        "train",
        *args,
        "--prepare",
        "no",
        "--project",
        str(project),
        "plots=False",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "kill-9"])
def test_interrupted_training_resumes_where_it_stopped(make_dataset, tmp_path, sig):
    root, project, epochs = make_dataset(16, 4), tmp_path / "runs", 6
    proc = subprocess.Popen(
        _train_cmd(root, project, epochs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    checkpoint = project / "train" / "main" / "weights" / checkpoints.RESUME_NAME
    assert wait_for(lambda: checkpoint.exists() or proc.poll() is not None, timeout=180)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=180)
    doc = json.loads((project / "train" / "speed_report.json").read_text())
    main = doc["stages"][0]
    if sig in (signal.SIGINT, signal.SIGTERM):  # the epoch in progress was finished and saved, then the run stopped
        assert proc.returncode == (130 if sig == signal.SIGINT else 143), output[-3000:]  # 143: SLURM preemption
        assert "--resume" in output
        assert main["status"] == "interrupted"
        assert 1 <= main["measured"]["epochs_done"] < epochs
        assert doc["run"].get("stopped_by") == signal.Signals(sig).name
        assert ("by SIGTERM" in main["note"]) is (sig == signal.SIGTERM)
    else:  # killed: the report still says which stage was running
        assert proc.returncode == -signal.SIGKILL
        assert main["status"] == "running"
    done_before = checkpoints.checkpoint_epoch(checkpoint) + 1
    assert 1 <= done_before < epochs
    saved_rows = _csv_rows(project / "train" / "main")[:done_before]
    again = subprocess.run(
        [*_train_cmd(root, project, epochs)[:4], "--resume", str(project / "train")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    doc = json.loads((project / "train" / "speed_report.json").read_text())
    m = doc["stages"][0]["measured"]
    assert (doc["stages"][0]["status"], m["epochs_done"], doc["run"]["status"]) == ("completed", epochs, "finished")
    assert csv_epochs(project / "train" / "main") == list(range(1, epochs + 1))  # no epoch repeated or lost
    # the saved epochs were kept, not trained again (a killed run's report has no result for its stage)
    assert _csv_rows(project / "train" / "main")[:done_before] == saved_rows
    assert len(m["epoch_times_s"]) == epochs
    assert (project / "train" / "speed_report.png").is_file()
    import torch

    best = torch.load(m["weights"], map_location="cpu", weights_only=False)
    assert best["train_args"]["epochs"] == epochs
    assert not (project / "train2").exists()  # the same run folder went on


def test_resume_refuses_a_finished_run_and_a_missing_report(tmp_path):
    finished = json.loads((Path(__file__).parent / "data" / "speed_report_v1.json").read_text())
    assert finished["run"]["status"] == "finished"
    (tmp_path / "speed_report.json").write_text(json.dumps(finished))
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert "this run finished" in result.stderr
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "nope: no such run folder or report file" in result.stderr


def _with_download(root: Path, marker: Path, val: str) -> Path:
    data = yaml.safe_load((root / "data.yaml").read_text())
    data.update(val=val, download=f"open({str(marker)!r}, 'w').write('ran')")
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root


def test_download_script_is_refused_without_the_flag(make_dataset, tmp_path):
    marker = tmp_path / "MARKER"
    root = _with_download(make_dataset(2, 1), marker, "images/missing")
    result = CliRunner().invoke(app, ["plan", "--dataset", str(root)])
    assert result.exit_code == 3
    assert "download: script, which speedtrain does not run" in result.stderr
    assert "--allow-download" in result.stderr
    assert not marker.exists()
    allowed = CliRunner().invoke(app, ["plan", "--dataset", str(root), "--allow-download"])
    assert marker.exists()  # the user asked: Ultralytics ran it
    assert allowed.exit_code != 0  # and the script did not bring the missing split


@pytest.mark.slow
def test_download_script_of_a_complete_dataset_never_runs(make_dataset, tmp_path):
    marker = tmp_path / "MARKER"
    root = _with_download(make_dataset(4, 2), marker, "images/val")
    planned = workflow.make_plan(root, Overrides(epochs=1, **TINY), ["plots=False"])
    workflow.execute(planned, tmp_path / "runs")
    assert not marker.exists()


@pytest.mark.slow
def test_ram_cache_falls_back_to_disk_when_memory_dropped(make_dataset, tmp_path, monkeypatch):
    planned = workflow.make_plan(make_dataset(4, 2), Overrides(epochs=1, cache="ram", **TINY), ["plots=False"])
    assert planned.plan.stages[0].cache == "ram"
    real = workflow.psutil.virtual_memory
    monkeypatch.setattr(workflow.psutil, "virtual_memory", lambda: real()._replace(available=int(0.5 * 1024**3)))
    doc = workflow.execute(planned, tmp_path / "runs")[0].to_dict()
    assert doc["stages"][0]["cache"] == "disk"
    assert any("using the disk cache instead" in w for w in doc["warnings"])
    args = (Path(doc["stages"][0]["measured"]["save_dir"]) / "args.yaml").read_text()
    assert "cache: disk" in args  # what Ultralytics actually trained with


def test_recheck_cache_keeps_what_still_fits():
    stage = planner.Stage(
        "main", 416, 1, 16, (), 8, "ram", "Adam", 0.001, True, 1, True, 10, True, "0", ram_cache_need_gb=6.0
    )
    assert planner.recheck_cache(stage, 8.0) == (stage, "")
    moved, note = planner.recheck_cache(stage, 5.0)
    assert moved.cache == "disk"
    assert "5.0 GB" in note


def test_full_disk_stops_before_anything_is_written(make_dataset, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=200 * 1024**2))
    result = CliRunner().invoke(app, ["train", "--dataset", str(make_dataset(2, 1)), "--project", str(tmp_path / "r")])
    assert result.exit_code == 6
    assert "GB free, the run needs about" in result.stderr
    assert not (tmp_path / "r").exists()


def _odd_dataset(tmp_path: Path, make_dataset) -> tuple[Path, Path]:
    """Real COCO photos in a path with spaces and non-ASCII characters, reached through a symlink, with every
    odd file the issue lists: grayscale, RGBA and 16-bit PNGs, a truncated JPEG, an 8000x6000 photo, CRLF,
    empty and polygon labels, names as a list."""
    src = make_dataset(8, 2)
    root = tmp_path / "my data" / "jeu de données ü"
    root.parent.mkdir()
    shutil.move(src, root)
    images = sorted((root / "images" / "train").iterdir())
    labels = root / "labels" / "train"
    with Image.open(images[0]) as im:
        im.convert("L").save(images[0])  # grayscale JPEG
    with Image.open(images[1]) as im:
        im.convert("RGBA").save(images[1].with_suffix(".png"))
    images[1].unlink()
    with Image.open(images[2]) as im:
        im.convert("I").point(lambda v: v * 256).convert("I;16").save(images[2].with_suffix(".png"))
    images[2].unlink()
    data = images[3].read_bytes()
    images[3].write_bytes(data[: len(data) - 2000])  # truncated: no end-of-image marker
    with Image.open(images[4]) as im:
        im.resize((8000, 6000)).save(images[4], quality=40)
    (labels / f"{images[5].stem}.txt").write_bytes(b"0 0.5 0.5 0.2 0.2\r\n1 0.3 0.3 0.1 0.1\r\n")
    (labels / f"{images[6].stem}.txt").write_text("")
    (labels / f"{images[7].stem}.txt").write_text("2 0.1 0.1 0.4 0.1 0.4 0.5 0.1 0.5\n")
    names = list(yaml.safe_load((root / "data.yaml").read_text())["names"].values())
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": names}))
    link = tmp_path / "linked dataset"
    link.symlink_to(root, target_is_directory=True)
    return root, link


@pytest.mark.slow
def test_odd_inputs_train_and_the_dataset_stays_untouched(make_dataset, tmp_path):
    root, link = _odd_dataset(tmp_path, make_dataset)
    before = tree_hash(root)
    result = CliRunner().invoke(app, [*_train_cmd(link, tmp_path / "runs", 1)[3:]])
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((tmp_path / "runs" / "train" / "speed_report.json").read_text())
    assert doc["stages"][0]["status"] == "completed"
    assert doc["dataset"]["train_images"] == 8
    assert tree_hash(root) == before  # Ultralytics' "corrupt JPEG restored" rewrite hit the view, not the data


@pytest.mark.slow
def test_odd_inputs_prepare(make_dataset, tmp_path):
    root, link = _odd_dataset(tmp_path, make_dataset)
    before = tree_hash(root)
    out = CliRunner().invoke(app, ["prepare", "--dataset", str(link), "--size", "320", "--out", str(tmp_path / "p")])
    assert out.exit_code == 0, out.output[-2000:]
    assert tree_hash(root) == before
    sizes = {}
    for src in (root / "images" / "train").iterdir():
        with Image.open(src) as a:
            sizes[src.name] = max(a.size)
    big = next(name for name, side in sizes.items() if side == 8000)
    with Image.open(tmp_path / "p" / "images" / "train" / big) as im:
        assert max(im.size) == 320


def test_existing_run_folder_gets_a_new_suffix(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "keep.txt").write_text("earlier run")
    assert workflow.new_run_dir(tmp_path, "train").name == "train2"
    assert (tmp_path / "train" / "keep.txt").read_text() == "earlier run"


@pytest.mark.slow
def test_oom_during_validation_goes_on_from_the_checkpoint(make_dataset, tmp_path, monkeypatch):
    import torch
    from conftest import CUDA_OOM
    from ultralytics.models.yolo.detect import DetectionValidator

    original = DetectionValidator.preprocess
    batches_seen: dict[int, int] = {}

    def preprocess(self, batch):
        # A trainer's validator (one per training attempt) runs out of memory from its second validation on,
        # while the training batch is over 4: the first attempt in epoch 2, the resumed one in epoch 3.
        if self.training and self.args.batch > 4:
            batches_seen[id(self)] = batches_seen.get(id(self), 0) + 1
            if batches_seen[id(self)] > 1:
                raise torch.OutOfMemoryError(CUDA_OOM)
        return original(self, batch)

    monkeypatch.setattr(DetectionValidator, "preprocess", preprocess)
    planned = workflow.make_plan(make_dataset(8, 2), Overrides(epochs=3, batch=16, **TINY), ["plots=False"])
    doc = workflow.execute(planned, tmp_path / "runs")[0].to_dict()
    m = doc["stages"][0]["measured"]
    assert (m["batch"], m["epochs_done"]) == (4, 3)
    assert [(o["epoch"], o["from_batch"], o["to_batch"]) for o in m["oom_fallbacks"]] == [(2, 16, 8), (3, 8, 4)]
    assert csv_epochs(Path(m["save_dir"])) == [1, 2, 3]  # each saved epoch kept; none trained twice into the log


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.slow
def test_resume_with_every_checkpoint_damaged_stops_and_keeps_the_saved_epochs(make_dataset, tmp_path):
    """kill -9 after two saved epochs, then resume.pt and last.pt truncated (best.pt intact): --resume must not
    say "resuming" and train from epoch 1 over them; it stops with one line saying what is damaged and intact."""
    root, project, epochs = make_dataset(16, 4), tmp_path / "runs", 6
    proc = subprocess.Popen(_train_cmd(root, project, epochs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    weights = project / "train" / "main" / "weights"
    assert wait_for(
        lambda: (
            (weights / checkpoints.RESUME_NAME).exists()
            and checkpoints.checkpoint_epoch(weights / checkpoints.RESUME_NAME) >= 1
            or proc.poll() is not None
        ),
        timeout=240,
    )
    proc.kill()
    proc.wait(timeout=60)
    for name in (checkpoints.RESUME_NAME, "last.pt"):
        _truncate(weights / name)
    rows, best = _csv_rows(project / "train" / "main"), (weights / "best.pt").read_bytes()
    again = subprocess.run(
        [*_train_cmd(root, project, epochs)[:4], "--resume", str(project / "train")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 5, again.stdout[-2000:] + again.stderr[-2000:]
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "cannot be read" in lines[0]
    assert f"{weights / 'best.pt'} is intact" in lines[0]
    assert "Traceback" not in again.stdout + again.stderr
    assert _csv_rows(project / "train" / "main") == rows  # the saved epochs are as they were
    assert (weights / "best.pt").read_bytes() == best


@pytest.mark.slow
def test_a_run_stopped_after_its_last_epoch_resumes_to_finished_without_training_again(make_dataset, tmp_path):
    """Every epoch trained, then the process died before the report said so (a kill during the final validation
    or a SIGTERM after the last epoch), with resume.pt damaged: --resume finishes the run from its files and never
    retrains or overwrites best.pt."""
    root, project = make_dataset(8, 2), tmp_path / "runs"
    first = subprocess.run(_train_cmd(root, project, 2), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:]
    report = project / "train" / "speed_report.json"
    doc = json.loads(report.read_text())
    doc["run"]["status"] = "running"  # as a kill before the stage's end leaves it
    doc["stages"][0].update(status="running", measured=None, note="")
    report.write_text(json.dumps(doc))
    weights = project / "train" / "main" / "weights"
    _truncate(weights / checkpoints.RESUME_NAME)
    rows, best = _csv_rows(project / "train" / "main"), (weights / "best.pt").read_bytes()
    again = subprocess.run(
        [*_train_cmd(root, project, 2)[:4], "--resume", str(project / "train")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    doc = json.loads(report.read_text())
    assert (doc["run"]["status"], doc["stages"][0]["status"]) == ("finished", "completed")
    assert doc["stages"][0]["measured"]["epochs_done"] == 2
    assert "had trained all 2 epochs" in doc["stages"][0]["note"]
    assert _csv_rows(project / "train" / "main") == rows  # nothing trained again
    assert (weights / "best.pt").read_bytes() == best


@pytest.mark.slow
def test_a_time_fitted_run_stopped_after_its_fitted_epochs_resumes_to_finished(make_dataset, tmp_path):
    """--time without phases (rect): Ultralytics fits other epochs than the plan's 50 to the budget; a run that
    died after the last of them (during its final validation) is finished on --resume, never Ultralytics'
    "nothing to resume" traceback, and the report never advises a --resume that cannot work."""
    root, project = make_dataset(8, 2), tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "speedtrain",
        "train",
        "--dataset",
        str(root),
        "--img-size",
        "64",
        "--time",
        "1m",
        "--rect",
        "--finetune",
        "no",
        "--prepare",
        "no",
        "--project",
        str(project),
        "plots=False",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:]
    report = project / "train" / "speed_report.json"
    doc = json.loads(report.read_text())
    done = doc["stages"][0]["measured"]["epochs_done"]
    assert doc["stages"][0]["epochs"] != done  # Ultralytics fitted another number of epochs than planned
    doc["run"]["status"] = "running"  # as a kill during the final validation leaves it
    doc["stages"][0].update(status="running", measured=None, note="")
    report.write_text(json.dumps(doc))
    rows = _csv_rows(project / "train" / "main")
    again = subprocess.run([*cmd[:4], "--resume", str(project / "train")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "Traceback" not in again.stdout + again.stderr
    doc = json.loads(report.read_text())
    assert (doc["run"]["status"], doc["stages"][0]["status"]) == ("finished", "completed")
    assert f"had trained all {done} epochs" in doc["stages"][0]["note"]
    assert _csv_rows(project / "train" / "main") == rows  # nothing trained again


@pytest.mark.slow
def test_epochs_with_a_time_budget_are_a_limit_the_run_and_its_report_agree_on(make_dataset, tmp_path):
    """--epochs 2 --time 10m: Ultralytics' time= alone would refit the epochs to the budget after the first (dozens
    here); the run trains 2, every progress line says "/2", and the report says the limit ended it, not the budget."""
    root, project = make_dataset(8, 2), tmp_path / "runs"
    cmd = [sys.executable, "-m", "speedtrain", "train", "--dataset", str(root), "--img-size", "64", "--time", "10m"]
    cmd += ["--epochs", "2", "--finetune", "no", "--prepare", "no", "--project", str(project), "plots=False"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.findall(r"main: epoch (\d+)/(\d+)", run.stdout) == [("1", "2"), ("2", "2")], run.stdout
    doc = json.loads((project / "train" / "speed_report.json").read_text())
    stage = doc["stages"][0]
    assert (stage["status"], stage["measured"]["epochs_done"], stage["max_epochs"]) == ("completed", 2, 2)
    assert re.fullmatch(
        r"ended by its limit of 2 epochs before its 10m 00s budget \(about \d+ fit it .*\)", stage["note"]
    ), stage["note"]
    assert "main: ended by its limit of 2 epochs" in run.stdout
    assert len(_csv_rows(project / "train" / "main")) == 2


SIGTERM_WHILE_SCORING = """
import os, signal, sys
import speedtrain.ultra as ultra
measure = ultra.latency_ms
def latency_ms(*args, **kwargs):  # runs after the stage, outside its epoch loop: a scheduler's stop arrives here
    os.kill(os.getpid(), signal.SIGTERM)
    return measure(*args, **kwargs)
ultra.latency_ms = latency_ms
from speedtrain.cli import main
sys.argv = ["speedtrain", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_sigterm_between_stages_leaves_an_interrupted_report_that_resumes_untrained(make_dataset, tmp_path):
    """SIGTERM after the last epoch, while speedtrain measures the stage: exit 143, the report says interrupted
    (not "running", which `report` would call a crash), and --resume finishes without training again."""
    root, project = make_dataset(8, 2), tmp_path / "runs"
    cmd = [sys.executable, "-c", SIGTERM_WHILE_SCORING, *_train_cmd(root, project, 2)[3:]]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 143, first.stdout[-2000:] + first.stderr[-2000:]
    assert "Traceback" not in first.stderr
    assert "--resume" in first.stderr
    doc = json.loads((project / "train" / "speed_report.json").read_text())
    assert (doc["run"]["status"], doc["run"]["stopped_by"]) == ("interrupted", "SIGTERM")
    best_pt = project / "train" / "main" / "weights" / "best.pt"
    rows, best = _csv_rows(project / "train" / "main"), best_pt.read_bytes()
    assert len(rows) == 2
    again = subprocess.run(
        [*_train_cmd(root, project, 2)[:4], "--resume", str(project / "train")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    doc = json.loads((project / "train" / "speed_report.json").read_text())
    assert (doc["run"]["status"], doc["stages"][0]["status"]) == ("finished", "completed")
    assert _csv_rows(project / "train" / "main") == rows  # nothing trained again
    assert best_pt.read_bytes() == best


@pytest.mark.slow
def test_a_dataset_moved_away_mid_run_is_one_line_and_resumes_once_back(make_dataset, tmp_path):
    """The dataset's folder is moved while training reads it (no RAM cache, more images than Ultralytics keeps in
    its buffer of batch x 8): one line naming the user's file, the saved epoch kept, --resume goes on once back."""
    from conftest import wait_for

    root, project = make_dataset(40, 4), tmp_path / "runs"
    cmd = [*_train_cmd(root, project, 2), "--cache", "none", "--batch-size", "2", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (project / "train" / "main" / "results.csv").exists() or proc.poll() is not None, 240)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    away = root.rename(tmp_path / "away")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 3, out[-2000:] + err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert str(root / "images" / "train") in lines[0]  # the user's own file, not its link in the run's view
    assert "disappeared while training" in lines[0]
    assert "resume.pt" in lines[0]  # what was kept
    assert "Traceback" not in out + err
    away.rename(root)
    again = subprocess.run(
        [*_train_cmd(root, project, 2)[:4], "--resume", str(project / "train")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    doc = json.loads((project / "train" / "speed_report.json").read_text())
    assert (doc["run"]["status"], doc["stages"][0]["measured"]["epochs_done"]) == ("finished", 2)


@pytest.mark.slow
def test_a_budgeted_run_stopped_by_ctrl_c_goes_on_along_the_same_curve(make_dataset, tmp_path):
    """--time in phases, Ctrl-C after a saved epoch, then --resume: the run goes on from the checkpoint's time on
    the same learning-rate curve and phase (no epoch repeated or lost), ends at its deadline, and a second --resume
    finds it finished."""
    root, project = make_dataset(16, 4), tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "speedtrain",
        "train",
        "--dataset",
        str(root),
        "--time",
        "1m",
        "--phases",
        "auto",
        "--img-size",
        "64",
        "--finetune-img-size",
        "128",
        "--prepare",
        "no",
        "--project",
        str(project),
        "plots=False",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = project / "train" / "main" / checkpoints.PHASES_STATE
    assert wait_for(lambda: state.exists() or proc.poll() is not None, timeout=180)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, output[-3000:]
    before = json.loads(state.read_text())
    assert not before["stopped"]
    again = subprocess.run([*cmd[:4], "--resume", str(project / "train")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "going on at" in again.stdout
    doc = json.loads((project / "train" / "speed_report.json").read_text())
    stage = doc["stages"][0]
    log = stage["measured"]["phase_log"]
    assert stage["status"] == "completed"
    assert [e["epoch"] for e in log] == list(range(1, len(log) + 1))  # no epoch repeated or lost
    assert log[: len(before["log"])] == before["log"]  # the epochs before the stop kept as they were
    resumed = log[len(before["log"])]
    assert resumed["start_s"] >= before["elapsed"] - 0.01  # the clock went on from the checkpoint's time (to 0.01 s)
    curve = schedule.Deadline.from_state(before)  # on the same curve: where the saved one was at that second
    assert resumed["lr_start"] == pytest.approx(curve.lr(resumed["start_s"]), abs=0.01)  # a restart: 0 or 1
    assert [e["imgsz"] for e in log] == sorted(e["imgsz"] for e in log)
    assert log[-1]["lr_end"] < resumed["lr_start"]
    assert csv_epochs(project / "train" / "main") == list(range(1, len(log) + 1))
    third = subprocess.run([*cmd[:4], "--resume", str(project / "train")], capture_output=True, text=True, timeout=300)
    assert third.returncode != 0 or "finished" in (third.stdout + third.stderr)
    assert "Traceback" not in third.stdout + third.stderr


@pytest.mark.slow
def test_resume_after_the_dataset_changed_says_what_changed_instead_of_training_on_a_stale_copy(make_dataset, tmp_path):
    root, project = make_dataset(16, 4), tmp_path / "runs"
    proc = subprocess.Popen(_train_cmd(root, project, 6), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = project / "train" / "main" / "weights" / checkpoints.RESUME_NAME
    assert wait_for(lambda: checkpoint.exists() or proc.poll() is not None, timeout=180)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=180)
    for image in sorted((root / "images" / "train").iterdir())[:5]:
        image.unlink()
    again = subprocess.run(
        [*_train_cmd(root, project, 6)[:4], "--resume", str(project / "train")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 3, again.stdout[-2000:] + again.stderr[-2000:]
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "its dataset changed since the run started (training images 16 -> 11" in lines[0]
    assert "Traceback" not in again.stdout + again.stderr
    assert checkpoints.checkpoint_epoch(checkpoint) >= 0  # the saved epochs are kept for when the images are back


def _linked_dataset(root: Path, train: int, val: int = 4) -> None:
    """`train` + `val` real COCO photos and labels, linked under distinct names (a large dataset in seconds)."""
    from conftest import coco_images

    photos = coco_images()
    for split, n in (("train", train), ("val", val)):
        for kind in ("images", "labels"):
            (root / kind / split).mkdir(parents=True)
        for i in range(n):
            image, label = photos[i % len(photos)]
            os.symlink(image, root / "images" / split / f"{i:05d}_{image.name}")
            if label.exists():
                os.symlink(label, root / "labels" / split / f"{i:05d}_{label.name}")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "nc": 80}))


def _stopped_before_the_first_epoch(proc: subprocess.Popen, project: Path, root: Path, before: str) -> str:
    """Ctrl-C to a run still setting up: it stops at once, in one line, the report readable, the dataset untouched."""
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    output, _ = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 20, output[-2000:]  # at once: not after the setup and an epoch
    assert proc.returncode == 130, output[-3000:]
    assert output.count("Ctrl-C before the first epoch: stopping now") == 1, output[-3000:]
    assert "Traceback" not in output
    doc = json.loads((project / "train" / "speed_report.json").read_text())
    assert doc["run"]["status"] == "interrupted"
    assert tree_hash(root) == before
    return output


def _listing(root: Path) -> list[tuple[str, str]]:
    """Every entry under `root` with where its link points: equal before and after means nothing was added,
    removed or relinked (the bytes of 40,000 linked photos are not read again)."""
    return sorted((str(p.relative_to(root)), os.readlink(p) if p.is_symlink() else "") for p in root.rglob("*"))


@pytest.mark.slow
def test_ctrl_c_while_ultralytics_scans_the_labels_stops_at_once_with_one_line(tmp_path):
    """A label scan of 25,000 images takes a minute before training starts: Ctrl-C then stops the run now, before
    Ultralytics writes its label cache, in one line, with a readable report and the dataset untouched."""
    root, project = tmp_path / "ds", tmp_path / "runs"
    _linked_dataset(root, 40000)
    before = _listing(root)
    cmd = [sys.executable, "-m", "speedtrain", "train", "--dataset", str(root), "--epochs", "1", "--finetune", "no"]
    cmd += ["--prepare", "no", "--cache", "none", "--project", str(project), "plots=False"]
    env = {k: v for k, v in os.environ.items() if k != "YOLO_VERBOSE"}  # Ultralytics' progress lines, in its log
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = project / "train" / "ultralytics.log"

    def scanning() -> bool:
        return log.is_file() and "Scanning" in log.read_text(errors="replace")

    assert wait_for(lambda: scanning() or proc.poll() is not None, timeout=300)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    output, _ = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 20, output[-2000:]  # at once: not after the scan, the setup and an epoch
    assert proc.returncode == 130, output[-3000:]
    assert output.count("Ctrl-C before the first epoch: stopping now") == 1, output[-3000:]
    assert "Traceback" not in output
    assert not list((project / ".datasets").rglob("*.cache"))  # stopped in the scan: its cache is written at the end
    assert json.loads((project / "train" / "speed_report.json").read_text())["run"]["status"] == "interrupted"
    assert _listing(root) == before


@pytest.mark.slow
def test_ctrl_c_while_ultralytics_fills_the_image_cache_stops_at_once_with_one_line(tmp_path):
    """Minutes of cache filling at 25,000 images: the first Ctrl-C before the first epoch stops now (not after the
    fill and a whole epoch), in one line, with the dataset untouched, a readable report, and a run that starts again."""
    root, project = tmp_path / "ds", tmp_path / "runs"
    _linked_dataset(root, 400)
    before = tree_hash(root)
    cmd = [sys.executable, "-m", "speedtrain", "train", "--dataset", str(root), "--epochs", "3", "--finetune", "no"]
    cmd += ["--prepare", "no", "--cache", "disk", "--project", str(project), "plots=False"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    views = project / ".datasets"

    def filling() -> bool:
        return views.is_dir() and any(views.rglob("*.npy"))

    assert wait_for(lambda: filling() or proc.poll() is not None, timeout=180)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    _stopped_before_the_first_epoch(proc, project, root, before)
    assert len(list(views.rglob("*.npy"))) < 404  # it stopped during the fill
    again = subprocess.run(
        [*cmd[:-3], "--epochs", "1", "--project", str(project), "plots=False"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
