"""The recovery ladder, signals and resume, run end to end through the workflow with Ultralytics scripted
(tests/scripted_ultra.py): each test asserts the whole sequence of training calls, the lines the user reads and
the report on disk. The slow set keeps real trainings for what only Ultralytics shows (test_reliability.py)."""

from __future__ import annotations

import errno
import json
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import CUDA_OOM, fake_stats, snapshot
from scripted_ultra import Killed

from speedtrain import checkpoints, oom, planner, recovery, runner, workflow
from speedtrain.errors import DatasetError, DiskSpaceError, PeerFailed, RankOutOfMemory, TrainingError
from speedtrain.knobs import Overrides
from speedtrain.records import Hooks

GPU = snapshot((24,))  # one 24 GB GPU: the plan's batch is 48, its chain 32, 16, 8
WORKER_MEMORY = "Caught MemoryError in DataLoader worker process 0."
BUS_ERROR = "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's workers are out of shared memory. Please try to raise your shared memory limit."  # noqa: E501


def _planned(make_dataset, epochs: int = 3, **overrides):
    ov = Overrides(epochs=epochs, finetune="no", prepare="no", **overrides)
    return workflow.make_plan(make_dataset(8, 2), ov, ["plots=False"], GPU)


def _train(planned, tmp_path: Path, lines: list[str]) -> dict:
    report, _ = workflow.execute(planned, tmp_path / "runs", hooks=Hooks(log=lines.append))
    return report.to_dict()


def _on_disk(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs" / "train" / "speed_report.json").read_text())


def _csv_epochs(stage_dir: str | Path) -> list[int]:
    return [int(row["epoch"]) for row in checkpoints.csv_rows(Path(stage_dir) / "results.csv")]


def _calls(script) -> list[tuple[int, int, str | None]]:
    """(batch, first 1-based epoch, the checkpoint it went on from) of every training call."""
    return [(a.batch, a.start_epoch + 1, a.resume and Path(a.resume).name) for a in script.attempts]


def test_gpu_oom_in_the_first_epoch_walks_the_plans_chain_from_the_start(make_dataset, tmp_path, scripted):
    scripted.oom_above = 16
    lines: list[str] = []
    resets: list[tuple[int, ...]] = []
    planned = _planned(make_dataset)
    assert planned.plan.stage("main").batch_fallbacks == (32, 16, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "_reset_peak_memory", resets.append)
        main = _train(planned, tmp_path, lines)["stages"][0]
    assert _calls(scripted) == [(48, 1, None), (32, 1, None), (16, 1, None)]
    assert len(resets) == 3  # the report's peak memory is the batch that ran, not a failed one
    measured = main["measured"]
    assert main["status"] == "completed"
    assert measured["batch"] == 16
    assert [(f["epoch"], f["from_batch"], f["to_batch"], f["kind"]) for f in measured["oom_fallbacks"]] == [
        (1, 48, 32, "device"),
        (1, 32, 16, "device"),
    ]
    assert measured["oom_fallbacks"][0]["error"] == CUDA_OOM
    assert "main: out of memory in epoch 1 at batch 48; going on with 32 from the start" in lines
    assert _csv_epochs(measured["save_dir"]) == [1, 2, 3]


def test_gpu_oom_mid_stage_goes_on_from_the_last_saved_epoch(make_dataset, tmp_path, scripted):
    scripted.oom_above, scripted.oom_from_epoch = 24, 2  # epoch 3 needs more memory (close_mosaic, a larger image)
    lines: list[str] = []
    main = _train(_planned(make_dataset, epochs=4), tmp_path, lines)["stages"][0]
    assert _calls(scripted) == [(48, 1, None), (32, 3, "resume.pt"), (16, 3, "resume.pt")]
    assert [a.epochs_run for a in scripted.attempts] == [[0, 1], [], [2, 3]]
    assert "main: out of memory in epoch 3 at batch 48; going on with 32 from the checkpoint after epoch 2" in lines
    measured = main["measured"]
    assert [(f["epoch"], f["from_batch"], f["to_batch"]) for f in measured["oom_fallbacks"]] == [
        (3, 48, 32),
        (3, 32, 16),
    ]
    assert _csv_epochs(measured["save_dir"]) == [1, 2, 3, 4]  # every epoch once: nothing trained twice or lost
    assert measured["epochs_done"] == 4
    assert len(measured["epoch_times_s"]) == 4
    assert measured["epoch_map50_95"] == [0.1, 0.15, 0.2, 0.25]


def test_gpu_oom_in_an_epochs_validation_loses_only_that_epoch(make_dataset, tmp_path, scripted):
    scripted.val_faults = {1: torch.OutOfMemoryError(CUDA_OOM)}  # validation runs at twice the training batch
    main = _train(_planned(make_dataset, epochs=3), tmp_path, [])["stages"][0]
    assert _calls(scripted) == [(48, 1, None), (32, 2, "resume.pt")]
    assert [(f["epoch"], f["from_batch"], f["to_batch"]) for f in main["measured"]["oom_fallbacks"]] == [(2, 48, 32)]
    assert _csv_epochs(main["measured"]["save_dir"]) == [1, 2, 3]


def test_gpu_oom_at_the_smallest_batch_is_one_line_with_remedies(make_dataset, tmp_path, scripted):
    scripted.oom_above = 4
    with pytest.raises(TrainingError) as err:
        _train(_planned(make_dataset), tmp_path, [])
    assert [a.batch for a in scripted.attempts] == [48, 32, 16, 8]
    assert str(err.value) == (
        "main: out of memory at batch 8, the smallest in the plan; try a smaller --img-size or model (for example "
        "--model yolo26n.yaml)"
    )


def test_host_ram_gives_up_the_ram_cache_then_workers_never_the_batch(make_dataset, tmp_path, scripted):
    scripted.faults = {1: MemoryError(WORKER_MEMORY), 2: MemoryError(WORKER_MEMORY)}
    lines: list[str] = []
    main = _train(_planned(make_dataset, epochs=4, cache="ram"), tmp_path, lines)["stages"][0]
    assert _calls(scripted) == [(48, 1, None), (48, 2, "resume.pt"), (48, 3, "resume.pt")]
    assert [(a.args["cache"], a.args["workers"]) for a in scripted.attempts] == [("ram", 16), ("disk", 16), ("disk", 8)]
    assert [(f["kind"], f["change"], f["from_batch"], f["to_batch"]) for f in main["measured"]["oom_fallbacks"]] == [
        ("host", "cache ram -> disk", 48, 48),
        ("host", "workers 16 -> 8", 48, 48),
    ]
    assert (
        f"main: host RAM ran out in epoch 2 ({WORKER_MEMORY}); going on with cache ram -> disk from the checkpoint "
        "after epoch 1"
    ) in lines
    assert _csv_epochs(main["measured"]["save_dir"]) == [1, 2, 3, 4]


def test_a_full_dev_shm_is_one_line_about_docker_and_workers(make_dataset, tmp_path, scripted):
    scripted.faults = {0: RuntimeError(BUS_ERROR)}
    with pytest.raises(TrainingError) as err:
        _train(_planned(make_dataset), tmp_path, [])
    message = str(err.value)
    assert "main: a dataloader worker ran out of shared memory in /dev/shm" in message
    assert "--shm-size=8g" in message
    assert "--workers 8" in message
    assert "\n" not in message
    assert len(scripted.attempts) == 1  # a smaller batch would not help: nothing is retried


def test_a_full_disk_is_one_line_and_resume_goes_on_from_the_last_complete_epoch(make_dataset, tmp_path, scripted):
    scripted.faults = {2: OSError(errno.ENOSPC, "No space left on device", "runs/train/main/weights/last.pt")}
    with pytest.raises(DiskSpaceError) as err:
        _train(_planned(make_dataset, epochs=4), tmp_path, [])
    stage_dir = tmp_path / "runs" / "train" / "main"
    assert str(err.value) == (
        "main: the disk filled up while training (runs/train/main/weights/last.pt); free some space and go on with "
        f"--resume (the last complete checkpoint is {stage_dir / 'weights' / 'resume.pt'})"
    )
    assert _on_disk(tmp_path)["run"]["status"] == "running"  # a failed run is resumed like a killed one
    report, _ = workflow.resume(tmp_path / "runs" / "train")
    assert _calls(scripted) == [(48, 1, None), (48, 3, "resume.pt")]
    main = report.to_dict()["stages"][0]
    assert main["status"] == "completed"
    assert _csv_epochs(stage_dir) == [1, 2, 3, 4]
    assert main["measured"]["epochs_done"] == 4


def test_the_cli_says_a_failure_in_one_line_with_its_exit_code(make_dataset, tmp_path, scripted):
    from typer.testing import CliRunner

    from speedtrain.cli import app

    scripted.faults = {1: OSError(errno.ENOSPC, "No space left on device", "last.pt")}
    root = make_dataset(4, 1)
    args = ["train", "--dataset", str(root), "--epochs", "3", "--finetune", "no", "--prepare", "no"]
    result = CliRunner().invoke(app, [*args, "--project", str(tmp_path / "runs"), "plots=False"])
    assert result.exit_code == 6
    assert result.stderr.strip().splitlines()[-1].startswith("error: main: the disk filled up while training (last.pt)")
    assert "Traceback" not in result.output
    assert [a.epochs_run for a in scripted.attempts] == [[0]]


def test_an_image_gone_mid_run_names_the_users_file_not_the_link(make_dataset, tmp_path, scripted):
    root = make_dataset(8, 2)
    planned = workflow.make_plan(root, Overrides(epochs=3, finetune="no", prepare="no"), ["plots=False"], GPU)
    image = sorted((root / "images" / "train").glob("*.jpg"))[3]
    link = tmp_path / "view" / image.name  # the loader reads the dataset through speedtrain's linked view
    link.parent.mkdir()
    link.symlink_to(image)
    scripted.faults = {1: FileNotFoundError(f"Image Not Found {link}")}
    with pytest.raises(DatasetError) as err:
        workflow.execute(planned, tmp_path / "runs")
    assert str(err.value).startswith(f"main: {image} disappeared while training (the dataset was moved or deleted?)")
    assert "the epochs saved so far are kept" in str(err.value)
    assert "put it back and go on with --resume" in str(err.value)


def test_oom_in_the_final_validation_validates_the_saved_weights_again_smaller(make_dataset, tmp_path, scripted):
    scripted.val_oom_above = 8
    lines: list[str] = []
    main = _train(_planned(make_dataset, epochs=2), tmp_path, lines)["stages"][0]
    # Ultralytics' final validation at the training batch, then speedtrain's at 48, 24, 12, 6; then the score at 640
    # at the stage's batch runs out of memory too: said, left out, never fatal
    assert [v["batch"] for v in scripted.validations] == [48, 48, 24, 12, 6, 48]
    assert len(scripted.attempts) == 1  # nothing trained again
    assert main["status"] == "completed"
    assert main["note"].startswith("the final validation ran out of memory (")
    assert main["note"].endswith("validated again at batch 6")
    assert main["measured"]["best_metrics"]["mAP50-95"] == 0.15
    assert main["measured"]["oom_fallbacks"] == []
    assert set(main["measured"]["scores"]) == {"416"}
    assert any(line.startswith("main: could not validate at 640 px (CUDA out of memory") for line in lines)


def test_an_oom_in_a_rank_restarts_every_rank_one_batch_smaller(make_dataset, tmp_path, scripted, monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    stage = _planned(make_dataset, epochs=4).plan.stage("main")
    data = tmp_path / "data.yaml"
    scripted.oom_above, scripted.oom_from_epoch = 32, 2
    lines: list[str] = []
    with pytest.raises(RankOutOfMemory) as err:
        runner.train_stage(stage, "yolo26n.yaml", runner.StageContext(data, tmp_path, Hooks(log=lines.append)))
    assert str(err.value) == (
        "main: rank 0 ran out of memory at batch 48 in epoch 3; the ranks restart from the last saved epoch with "
        "batch 32"
    )
    assert [f.name for f in (tmp_path / "main").glob(".oom-rank*.json")] == [".oom-rank0.json"]
    # the launcher starts the ranks again: each reads the record and goes on one batch smaller from epoch 3
    result = runner.train_stage(
        stage, "yolo26n.yaml", runner.StageContext(data, tmp_path, Hooks(log=lines.append), resuming=True)
    )
    assert _calls(scripted) == [(48, 1, None), (32, 3, "resume.pt")]
    assert "main: rank 0 ran out of memory in epoch 3 at batch 48; all 2 ranks go on with 32 from the checkpoint " in (
        "\n".join(lines)
    )
    assert result.status == "completed"
    assert [(f.from_batch, f.to_batch) for f in result.oom_fallbacks] == [(48, 32)]
    assert not list((tmp_path / "main").glob(".oom-rank*.json"))  # rank 0 cleared the records once read
    assert [(r.rank, r.images, r.batches) for r in result.ranks] == [(0, 8, 1)]  # half of 16 images each


def test_a_rank_stopped_by_its_peers_oom_says_whose_it_was(make_dataset, tmp_path, scripted, monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    stage = _planned(make_dataset).plan.stage("main")
    oom.record_fault(tmp_path / "main", 0, 48, 1, CUDA_OOM)
    scripted.faults = {0: RuntimeError("Connection closed by peer [127.0.0.1]:29500")}  # the collective broke
    monkeypatch.setattr("speedtrain.recovery.after_rank_oom", lambda s, d, w, log: (s, []))  # the restart's reading
    with pytest.raises(PeerFailed) as err:
        runner.train_stage(stage, "yolo26n.yaml", runner.StageContext(tmp_path / "data.yaml", tmp_path))
    assert str(err.value) == "main: rank 1 stopped: rank 0 ran out of memory"


def test_sigterm_mid_stage_saves_the_epoch_and_resume_goes_on_from_it(make_dataset, tmp_path, scripted):
    scripted.signals = {1: signal.SIGTERM}
    before = signal.getsignal(signal.SIGTERM)
    lines: list[str] = []
    main = _train(_planned(make_dataset, epochs=4), tmp_path, lines)["stages"][0]
    assert "SIGTERM (preempted?): stopping after this epoch is saved; go on with --resume" in lines
    assert main["status"] == "interrupted"
    assert main["note"] == "interrupted by SIGTERM after epoch 2; resume with --resume"
    disk = _on_disk(tmp_path)
    assert (disk["run"]["status"], disk["run"]["stopped_by"]) == ("interrupted", "SIGTERM")
    assert scripted.attempts[0].epochs_run == [0, 1]
    report, _ = workflow.resume(tmp_path / "runs" / "train")
    assert _calls(scripted) == [(48, 1, None), (48, 3, "resume.pt")]
    done = report.to_dict()["stages"][0]
    assert done["status"] == "completed"
    assert done["measured"]["epochs_done"] == 4
    assert len(done["measured"]["epoch_times_s"]) == 4
    assert _csv_epochs(done["measured"]["save_dir"]) == [1, 2, 3, 4]
    assert signal.getsignal(signal.SIGTERM) is before  # the stage's handler is gone with the stage


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(make_dataset, tmp_path, scripted):
    scripted.faults = {2: Killed()}
    with pytest.raises(Killed):
        _train(_planned(make_dataset, epochs=4), tmp_path, [])
    assert _on_disk(tmp_path)["run"]["status"] == "running"
    report, _ = workflow.resume(tmp_path / "runs" / "train")
    assert _calls(scripted) == [(48, 1, None), (48, 3, "resume.pt")]
    main = report.to_dict()["stages"][0]
    assert main["status"] == "completed"
    assert _csv_epochs(main["measured"]["save_dir"]) == [1, 2, 3, 4]


def test_a_run_killed_after_its_last_epoch_resumes_to_finished_without_training_again(
    make_dataset, tmp_path, scripted, monkeypatch
):
    def killed(*args, **kwargs):  # after the stage's epochs and its final validation, before the report
        raise Killed

    monkeypatch.setattr("speedtrain.ultra.latency_ms", killed)
    with pytest.raises(Killed):
        _train(_planned(make_dataset), tmp_path, [])
    best = tmp_path / "runs" / "train" / "main" / "weights" / "best.pt"
    before = best.stat().st_mtime_ns
    monkeypatch.setattr("speedtrain.ultra.latency_ms", scripted.latency_ms)
    lines: list[str] = []
    report, _ = workflow.resume(tmp_path / "runs" / "train", hooks=Hooks(log=lines.append))
    assert len(scripted.attempts) == 1  # nothing trained again
    assert best.stat().st_mtime_ns == before
    main = report.to_dict()["stages"][0]
    assert main["status"] == "completed"
    assert main["note"] == "had trained all 3 epochs before it stopped; kept as it was (best.pt, results.csv)"
    assert main["measured"]["best_metrics"]["mAP50-95"] == 0.2


def test_the_finetune_starts_from_the_main_stages_best_weights_when_they_lose_at_its_size(
    make_dataset, tmp_path, scripted
):
    ov = Overrides(epochs=2, finetune="auto", finetune_epochs=2, prepare="no")
    planned = workflow.make_plan(make_dataset(8, 2), ov, ["plots=False"], GPU)
    doc = _train(planned, tmp_path, [])
    main, finetune = doc["stages"]
    # the scripted weights lose accuracy at a larger size (sqrt of the size ratio): 0.15 at 416, 0.121 at 640
    assert main["measured"]["scores"] == {"416": 0.15, "640": 0.12093}
    assert finetune["status"] == "completed"
    assert scripted.attempts[1].args["model"] == main["measured"]["weights"]
    assert (scripted.attempts[1].args["imgsz"], scripted.attempts[1].start_epoch) == (640, 0)
    assert sorted({size for size, _ in scripted.latencies}) == [416, 640]


def test_host_memory_policy_gives_up_cache_then_workers_never_the_batch(tmp_path):
    stage = planner.plan(snapshot((24,), ram=64), fake_stats(), Overrides(cache="ram")).stage("main")
    assert (stage.batch, stage.workers, stage.cache) == (48, 16, "ram")
    steps = []
    for _ in range(5):
        stage, fallback = recovery.relieve_host_memory(stage, None, MemoryError(WORKER_MEMORY), lambda _: None)
        steps.append((fallback.change, fallback.kind, stage.batch))
        if stage.workers == 1:
            break
    assert steps == [
        ("cache ram -> disk", "host", 48),
        ("workers 16 -> 8", "host", 48),
        ("workers 8 -> 4", "host", 48),
        ("workers 4 -> 2", "host", 48),
        ("workers 2 -> 1", "host", 48),
    ]
    last = replace(stage, workers=0)
    with pytest.raises(TrainingError) as err:
        recovery.relieve_host_memory(last, None, MemoryError(WORKER_MEMORY), lambda _: None)
    assert "host RAM ran out with no RAM cache and no dataloader workers" in str(err.value)
