"""Runner: OOM predicate and policy, model resolution, and real CPU training with a faked CUDA OOM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CUDA_OOM, run_benchmark, table_rows, tree_hash

from speedtrain import runner, workflow
from speedtrain.errors import TrainingError, UsageError
from speedtrain.planner import Overrides


def _chained() -> RuntimeError:
    try:
        try:
            raise torch.OutOfMemoryError(CUDA_OOM)
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("validation failed") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (torch.OutOfMemoryError(CUDA_OOM), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"), True),
        (RuntimeError("GET was unable to find an engine to execute this computation"), True),
        (MemoryError(), True),
        (_chained(), True),  # an OOM wrapped by whatever caught it first
        (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"), False),
        (ValueError("out of memory"), False),  # not a runtime error: a bug, not memory
        (RuntimeError("shape mismatch"), False),
    ],
)
def test_is_oom(exc, expected):
    assert runner.is_oom(exc) is expected


@pytest.mark.parametrize(
    ("chain", "current", "expected"),
    [((32, 16, 8), 48, 32), ((32, 16, 8), 32, 16), ((32, 16, 8), 8, None), ((), 16, None), ((16, 8), 24, 16)],
)
def test_next_batch(chain, current, expected):
    assert runner.next_batch(chain, current) == expected


def test_model_offline_falls_back_to_yaml_and_says_so():
    source, note = runner.resolve_model("yolo26n", online=False)
    assert source == "yolo26n.yaml"
    assert "offline" in note
    assert "yolo26n.yaml" in note


def test_model_online_lets_ultralytics_fetch():
    source, note = runner.resolve_model("yolo26n", online=True)
    assert source == "yolo26n.pt"
    assert "fetched by Ultralytics" in note


def test_local_pt_is_preferred(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "yolo26n.pt").write_bytes(b"weights")
    source, note = runner.resolve_model("yolo26n", online=False)
    assert source == "yolo26n.pt"
    assert "pretrained weights" in note


def test_model_yaml_and_unknown_models():
    assert runner.resolve_model("yolo26s.yaml")[0] == "yolo26s.yaml"
    with pytest.raises(UsageError, match="no such file"):
        runner.resolve_model("weights/missing.pt")


def _cpu_plan(root: Path, **kw):
    ov = Overrides(imgsz=64, epochs=1, finetune="no", prepare="no", **kw)
    return workflow.make_plan(root, ov, ["plots=False", "val=False"])


@pytest.mark.slow
def test_oom_walks_the_plans_batch_chain(make_dataset, tmp_path, fake_cuda_oom):
    tried = fake_cuda_oom.tried
    planned = _cpu_plan(make_dataset(8, 2), batch=16)
    assert planned.plan.stage("main").batch_fallbacks == (8, 4)
    doc, path = workflow.execute(planned, tmp_path / "runs")
    assert tried == [16, 8, 4]
    main = doc["stages"][0]["measured"]
    assert [(o["from_batch"], o["to_batch"]) for o in main["oom_fallbacks"]] == [(16, 8), (8, 4)]
    assert "CUDA out of memory" in main["oom_fallbacks"][0]["error"]
    assert main["batch"] == 4
    assert Path(main["weights"]).is_file()


@pytest.mark.slow
def test_oom_below_the_last_batch_stops_with_remedies(make_dataset, tmp_path, fake_cuda_oom):
    tried = fake_cuda_oom.tried
    fake_cuda_oom.max_batch = 0
    planned = _cpu_plan(make_dataset(4, 1), batch=8)
    with pytest.raises(TrainingError) as err:
        workflow.execute(planned, tmp_path / "runs")
    assert tried == [8, 4]
    assert "out of memory at batch 4, the smallest in the plan" in str(err.value)
    assert "--img-size" in str(err.value)


@pytest.mark.slow
def test_two_stage_training_end_to_end(make_dataset, tmp_path):
    root = make_dataset(8, 4)
    before = tree_hash(root)
    ov = Overrides(imgsz=64, epochs=1, finetune="yes", finetune_epochs=1, finetune_imgsz=96, prepare="no")
    planned = workflow.make_plan(root, ov, ["plots=False"])
    doc, path = workflow.execute(planned, tmp_path / "runs", "e2e")
    assert path == tmp_path / "runs" / "e2e" / "speed_report.json"
    assert json.loads(path.read_text()) == doc
    assert (path.parent / "speed_report.png").is_file()
    assert [s["name"] for s in doc["stages"]] == ["main", "finetune"]
    for stage in doc["stages"]:
        m = stage["measured"]
        assert stage["status"] == "completed"
        assert m["epochs_done"] == 1
        assert len(m["epoch_times_s"]) == 1
        assert m["epoch_times_s"][0] > 0
        assert m["train_times_s"][0] <= m["epoch_times_s"][0]
        assert m["images_per_epoch"] == 8
        assert m["iterations_per_epoch"] == 1
        assert m["images_per_s"] == pytest.approx(8 / m["train_times_s"][0], rel=0.01)
        assert m["images_per_s_steady"] is None  # one epoch has no steady state to report
        assert "mAP50-95" in m["best_metrics"]
        assert 0 <= m["best_metrics"]["mAP50-95"] <= 1
        assert Path(m["weights"]).is_file()
        assert m["oom_fallbacks"] == []
        assert m["gpu_util_mean"] is None  # no GPU here: not measured, never made up
    # the fine-tune starts from the main stage's best weights, at its own size
    ft_args = (Path(doc["stages"][1]["measured"]["save_dir"]) / "args.yaml").read_text()
    assert doc["stages"][0]["measured"]["weights"] in ft_args
    assert "imgsz: 96" in ft_args
    ckpt = torch.load(doc["stages"][1]["measured"]["weights"], map_location="cpu", weights_only=False)
    assert ckpt["train_args"]["imgsz"] == 96
    assert doc["run"]["model_source"] == "yolo26n.yaml"
    assert "offline" in doc["run"]["model_note"]
    assert tree_hash(root) == before  # training never writes into the dataset


@pytest.mark.slow
def test_finetune_auto_is_skipped_when_the_target_is_met(make_dataset, tmp_path):
    ov = Overrides(imgsz=64, epochs=1, finetune="auto", target_map=0.0, finetune_imgsz=96, prepare="no")
    planned = workflow.make_plan(make_dataset(4, 2), ov, ["plots=False"])
    doc, _ = workflow.execute(planned, tmp_path / "runs")
    ft = doc["stages"][1]
    assert ft["status"] == "skipped"
    assert ft["measured"] is None
    assert "reached the target 0.0" in ft["note"]


def test_run_folders_are_never_reused(tmp_path):
    first = workflow.new_run_dir(tmp_path, "train")
    second = workflow.new_run_dir(tmp_path, "train")
    assert (first.name, second.name) == ("train", "train2")


@pytest.mark.slow
def test_compare_ultralytics_benchmark_smoke(tmp_path):
    """The benchmark script runs end to end (tiny: 8 images, 64 px, 1 epoch) and writes its table."""
    rows = table_rows(run_benchmark("compare_ultralytics.py", tmp_path), "(")
    assert [r[0] for r in rows] == [
        "(a) Ultralytics defaults",
        "(b) Ultralytics batch=-1",
        "(c) speedtrain plan",
        "(d) speedtrain autotune",
    ]
    assert all(float(r[2]) > 0 for r in rows)  # steady img/s was measured for every row
