"""workflow.py: the steps between the API and the runner (plan, prepare, run folders, resume checks), on real
images; the training itself is tested in test_runner.py, test_recovery.py (scripted) and test_reliability.py (real)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import snapshot, tree_hash
from PIL import Image

from speedtrain import workflow
from speedtrain.errors import DatasetError, DiskSpaceError, UsageError
from speedtrain.knobs import Overrides
from speedtrain.speedreport import REPORT_NAME, SpeedReport

DATA = Path(__file__).parent / "data"


def test_make_plan_takes_a_snapshot_a_file_or_the_real_machine(make_dataset, tmp_path):
    root = make_dataset(8, 4)
    from speedtrain import hardware

    box = snapshot((24,))
    hardware.save(box, tmp_path / "box.json")
    by_value = workflow.make_plan(root, Overrides(), (), box)
    by_file = workflow.make_plan(root, Overrides(), (), tmp_path / "box.json")
    assert by_value.plan.stages[0].batch == by_file.plan.stages[0].batch
    assert by_value.plan.device == "0"
    here = workflow.make_plan(root, Overrides(device="cpu"))
    assert here.plan.device == "cpu"
    assert here.stats.train_images == 8


def test_the_plan_report_is_the_plan_json(make_dataset):
    planned = workflow.make_plan(make_dataset(8, 4), Overrides(epochs=3), ("mosaic=0.5",), snapshot((24,)))
    rep = SpeedReport.of(planned)
    doc = rep.to_dict()
    assert doc["stages"][0]["epochs"] == 3
    assert doc["stages"][0]["extra"] == {"mosaic": 0.5}
    assert doc["dataset"]["train_images"] == 8
    assert SpeedReport.from_dict(json.loads(json.dumps(doc))).plan == planned.plan


def test_prepare_dataset_resizes_into_the_project_and_replans(make_dataset, tmp_path):
    root = make_dataset(6, 2)
    for image in (root / "images").rglob("*.jpg"):  # most images well above 1.5 x 640 px: worth resizing
        with Image.open(image) as im:
            im.resize((1600, 1200)).save(image, quality=85)
    before = tree_hash(root)
    planned = workflow.make_plan(root, Overrides(device="cpu"))
    assert planned.plan.prepare_size == 640  # the largest stage: the 640-px fine-tune
    prepared = workflow.prepare_dataset(planned, tmp_path / "runs")
    assert prepared.prepared is not None
    assert prepared.prepared.summary.resized == 8
    assert prepared.prepared.original_dataset.max_long_side == 1600
    assert prepared.stats.image_sizes.max_long_side() == 640
    assert Path(prepared.stats.root).is_relative_to(tmp_path / "runs")
    assert prepared.plan.reason("prepare") == planned.plan.reason("prepare")  # the decision, not "not needed"
    assert tree_hash(root) == before


def test_run_folders_are_checked_and_never_reused(tmp_path):
    with pytest.raises(UsageError, match="without / or"):
        workflow.check_run_folder(tmp_path, "a/b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        workflow.check_run_folder(tmp_path / "file" / "runs", "train")
    assert not (tmp_path / "new").exists()
    workflow.check_run_folder(tmp_path / "new", "train")
    assert not (tmp_path / "new").exists()  # checking creates nothing
    names = [workflow.new_run_dir(tmp_path / "new", "train").name for _ in range(3)]
    assert names == ["train", "train2", "train3"]


def test_a_run_that_cannot_fit_on_the_disk_is_refused_before_anything_is_written(make_dataset, tmp_path, monkeypatch):
    planned = workflow.make_plan(make_dataset(4, 2), Overrides(device="cpu", cache="disk"))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100 * 1024**2))
    with pytest.raises(DiskSpaceError, match="disk image cache"):
        workflow.execute(planned, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def _report_in(tmp_path: Path, **run: object) -> Path:
    doc = json.loads((DATA / "speed_report_v1.json").read_text())
    doc["run"].update(run)
    (tmp_path / REPORT_NAME).write_text(json.dumps(doc))
    return tmp_path


def test_resume_refuses_what_it_cannot_go_on_with(tmp_path):
    with pytest.raises(UsageError, match="this run finished"):
        workflow.resume(_report_in(tmp_path, status="finished"))
    with pytest.raises(DatasetError, match="the dataset view .* is gone"):
        workflow.resume(_report_in(tmp_path, status="interrupted", data_yaml=str(tmp_path / "gone.yaml")))
    doc = json.loads((DATA / "speed_report_v1.json").read_text())
    del doc["run"]
    (tmp_path / REPORT_NAME).write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="a plan, not a run's report"):
        workflow.resume(tmp_path)


def test_is_sample_knows_the_embedded_sample_by_any_name(tmp_path):
    assert workflow.is_sample(None)
    assert workflow.is_sample(workflow.SAMPLE_DIR / "data.yaml")
    assert workflow.is_sample(os.path.relpath(workflow.SAMPLE_DIR))
    assert not workflow.is_sample(tmp_path)


def test_run_folders_are_never_reused(tmp_path):
    first = workflow.new_run_dir(tmp_path, "train")
    second = workflow.new_run_dir(tmp_path, "train")
    assert (first.name, second.name) == ("train", "train2")
