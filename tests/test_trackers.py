"""Experiment trackers, as Ultralytics users switch them on (`yolo settings tensorboard=True mlflow=True`): a
speedtrain run logs through Ultralytics' own callbacks, every stage under its own name. Real packages (TensorBoard's
event files, MLflow's local file store), a real training in a subprocess with its own Ultralytics settings file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow


def _train(root: Path, tmp: Path, settings: dict[str, bool], *ranks: str) -> Path:
    """Train 2 epochs and a 1-epoch fine-tune with Ultralytics' integrations set as given (`ranks`: the flags for
    several ranks, the main stage alone); the run folder."""
    # not a test run to Ultralytics (its callbacks stay quiet under pytest): no PYTEST_* in the child's environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env |= {
        "YOLO_CONFIG_DIR": str(tmp / "yolo-config"),
        "MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }  # MLflow 3.x refuses a local file store unless told (docs/trackers.md)
    switch = f"from ultralytics.utils import SETTINGS; SETTINGS.update({json.dumps(settings)})"  # `yolo settings`
    subprocess.run(
        [sys.executable, "-c", switch.replace("true", "True").replace("false", "False")],
        env=env,
        check=True,
        timeout=120,
    )
    cmd = [
        sys.executable,
        "-m",
        "speedtrain",
        "train",
        "--dataset",
        str(root),
        "--img-size",
        "64",
        "--epochs",
        "2",
        "--finetune",
        "yes",
        "--finetune-img-size",
        "96",
        "--finetune-epochs",
        "1",
        "--prepare",
        "no",
        "--project",
        str(tmp / "runs"),
        "plots=False",
    ]
    if ranks:
        cmd = [*cmd[: cmd.index("--finetune")], "--finetune", "no", *cmd[cmd.index("--prepare") :], *ranks]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:  # ranks run in sessions of their own: none outlives the test
        for child in psutil.Process().children(recursive=True):
            child.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-2000:]
    return tmp / "runs" / "train"


def test_tensorboard_logs_every_stage_in_its_own_folder(make_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _train(make_dataset(8, 4), tmp_path, {"tensorboard": True, "mlflow": False})
    for stage, epochs in (("main", 2), ("finetune", 1)):
        events = list((run / stage).glob("events.out.tfevents.*"))
        assert events, f"no TensorBoard events in {run / stage}"
        acc = EventAccumulator(str(run / stage))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert "metrics/mAP50-95(B)" in tags
        steps = [e.step for e in acc.Scalars("metrics/mAP50-95(B)")]
        assert steps == list(range(1, epochs + 2))  # every epoch, then the final validation of best.pt at epochs+1


def test_mlflow_records_each_stage_as_a_run_with_its_metrics(make_dataset, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this test's own client reads the same local store

    run = _train(make_dataset(8, 4), tmp_path, {"tensorboard": False, "mlflow": True})
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(str(run))  # Ultralytics names it after the project: the run folder
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"main", "finetune"}
    for r in runs.values():
        assert r.info.status == "FINISHED"
        assert "metrics/mAP50-95B" in r.data.metrics or "metrics/mAP50-95(B)" in r.data.metrics


def test_two_ranks_log_once(make_dataset, tmp_path, monkeypatch):
    """Two gloo ranks with TensorBoard and MLflow on: rank 0 alone logs (Ultralytics' callbacks run on rank 0), one
    event file with each epoch once, one MLflow run."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = _train(
        make_dataset(8, 4), tmp_path, {"tensorboard": True, "mlflow": True}, "--device", "cpu", "--nproc-per-node", "2"
    )
    assert json.loads((run / "speed_report.json").read_text())["ranks"] == 2
    assert len(list((run / "main").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(run / "main"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("metrics/mAP50-95(B)")] == [1, 2, 3]  # 2 epochs, the final validation
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(str(run))
    assert experiment is not None
    assert [r.info.run_name for r in client.search_runs([experiment.experiment_id])] == ["main"]
