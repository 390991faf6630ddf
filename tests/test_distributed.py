"""Several ranks on a CPU with gloo (PyTorch's own way to test DDP without GPUs): speedtrain launching its own ranks,
and speedtrain as the ranks of an external `torchrun --nnodes 2` over 127.0.0.1. Real training on real photos at
64 px. Every test runs its processes under a hard timeout and kills the whole process tree when it passes, so a
hang fails the test instead of blocking CI."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import wait_for

from speedtrain import checkpoints, distributed, oom

HARD_TIMEOUT = 240  # seconds for any one launch: a healthy one takes 15-40 s on 2 cores


def _train(root: Path, project: Path, *extra: str, epochs: int = 3) -> list[str]:
    return [
        "train",
        "--dataset",
        str(root),
        "--device",
        "cpu",
        "--img-size",
        "64",
        "--epochs",
        str(epochs),
        "--batch-size",
        "8",
        "--finetune",
        "no",
        "--prepare",
        "no",
        "--project",
        str(project),
        "--model",
        "yolo26n.yaml",
        "plots=False",
        *extra,
    ]


def _speedtrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "speedtrain", *args]


class Tree:
    """A process started with its descendants (torch's launcher starts ranks in sessions of their own), all killed
    when the test ends."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
        self.ps = psutil.Process(self.proc.pid)

    def ranks(self) -> list[psutil.Process]:
        """The rank processes below this one (python -m speedtrain.rank), by rank."""
        try:
            found = [p for p in self.ps.children(recursive=True) if "speedtrain.rank" in " ".join(p.cmdline())]
        except psutil.Error:
            return []
        return sorted(found, key=lambda p: int(p.environ().get("RANK", "0")))

    def wait(self, timeout: float = HARD_TIMEOUT) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.proc.communicate()
            pytest.fail(f"hung for {timeout} s:\n{out[-3000:]}")
        return self.proc.returncode, out

    def kill(self) -> None:
        try:
            family = [*self.ps.children(recursive=True), self.ps]
        except psutil.Error:
            family = []
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()


@pytest.fixture
def trees():
    started: list[Tree] = []

    def start(cmd: list[str], env: dict[str, str] | None = None) -> Tree:
        started.append(Tree(cmd, env))
        return started[-1]

    yield start
    for tree in started:
        tree.kill()


def _csv_epochs(stage_dir: Path) -> list[int]:
    with (stage_dir / "results.csv").open(newline="") as f:
        return [int(float(row["epoch"])) for row in csv.DictReader(f)]


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "speed_report.json").read_text())


def _assert_trained_together(run_dir: Path, epochs: int, world: int = 2) -> dict:
    doc = _report(run_dir)
    stage = doc["stages"][0]
    m = stage["measured"]
    assert (stage["status"], m["epochs_done"], doc["run"]["status"]) == ("completed", epochs, "finished")
    assert _csv_epochs(run_dir / "main") == list(range(1, epochs + 1))  # each epoch once, by rank 0
    ranks = m["ranks"]
    assert [r["rank"] for r in ranks] == list(range(world))
    assert all(r["images_per_s"] and r["images_per_s"] > 0 for r in ranks)
    assert len({r["batches"] for r in ranks}) == 1  # equal batch counts, or a rank would wait forever
    assert sum(r["images"] for r in ranks) >= m["images_per_epoch"]  # the shards cover the training set
    assert m["images_per_s"]
    assert m["images_per_s"] > 0
    assert "mAP50-95" in m["best_metrics"]  # the final validation of best.pt, gathered from every rank
    return doc


@pytest.mark.slow
def test_speedtrain_launches_two_ranks_that_train_disjoint_shards(make_dataset, tmp_path, trees):
    root, project = make_dataset(17, 4), tmp_path / "runs"  # 17 images: no division by 2 ranks x 4 per batch
    code, out = trees(_speedtrain(*_train(root, project, "--nproc-per-node", "2"))).wait()
    assert code == 0, out[-4000:]
    doc = _assert_trained_together(project / "train", 3)
    assert doc["ranks"] == 2
    assert "rect=False: DDP training on 2 ranks" in doc["reasons"]["rect"]
    assert doc["stages"][0]["measured"]["ranks"][0]["images"] == 9  # ceil(17 / 2): padded like DistributedSampler
    assert "starting 2 ranks" in out
    assert "Traceback" not in out
    assert out.count("Measured on this machine") == 1  # rank 0 speaks for the run
    assert "main: 2 ranks, " in out  # each rank's own figures, gathered
    assert "main: epoch 3/3" in out  # rank 0's progress, a line per saved epoch


@pytest.mark.slow
def test_two_ranks_follow_one_deadline_through_the_phases(make_dataset, tmp_path, trees):
    """--time in phases on two gloo ranks: rank 0's clock is every rank's, so they switch size, set the learning
    rate and stop at the deadline after the same batch (a rank that went on alone would hang in its next step)."""
    root, project = make_dataset(16, 4), tmp_path / "runs"
    cmd = _speedtrain(
        "train",
        "--dataset",
        str(root),
        "--device",
        "cpu",
        "--nproc-per-node",
        "2",
        "--time",
        "1m",
        "--phases",
        "auto",
        "--img-size",
        "64",
        "--finetune-img-size",
        "128",
        "--batch-size",
        "8",
        "--prepare",
        "no",
        "--project",
        str(project),
        "--model",
        "yolo26n.yaml",
        "plots=False",
    )
    code, out = trees(cmd).wait()
    assert code == 0, out[-4000:]
    doc = _report(project / "train")
    stage = doc["stages"][0]
    log = stage["measured"]["phase_log"]
    assert stage["status"] == "completed"
    assert [p["imgsz"] for p in stage["schedule"]["phases"]] == [64, 128]
    assert [e["epoch"] for e in log] == list(range(1, len(log) + 1))
    assert log[-1]["end_s"] >= 0.9 * 60 - (log[-1]["end_s"] - log[-1]["start_s"])  # it trained to the deadline
    assert _csv_epochs(project / "train" / "main") == list(range(1, len(log) + 1))
    assert "Traceback" not in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_under_torchrun_with_the_fast_pipeline(make_dataset, tmp_path, trees):
    """Two "nodes" of one rank each, as two torchrun processes would run on two machines, over 127.0.0.1."""
    root, project = make_dataset(13, 4), tmp_path / "runs"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{_free_port()}",
        "--rdzv-id",
        "t2",
        "-m",
        "speedtrain",
    ]
    nodes = [trees([*torchrun, *_train(root, project, "--pipeline", "fast", epochs=2)]) for _ in range(2)]
    results = [node.wait() for node in nodes]
    assert all(code == 0 for code, _ in results), "\n".join(out[-3000:] for _, out in results)
    doc = _assert_trained_together(project / "train", 2)
    assert doc["ranks"] == 2  # the plan is for the launcher's WORLD_SIZE
    assert doc["stages"][0]["pipeline"] == "fast"
    assert sum("Measured on this machine" in out for _, out in results) == 1  # rank 0's node prints the report
    assert not (project / "train2").exists()  # one run folder for the group


FAKE_OOM = textwrap.dedent(
    """
    # sitecustomize for the test: the rank named by SPEEDTRAIN_TEST_OOM_RANK runs out of memory like a CUDA
    # device (torch.OutOfMemoryError with CUDA's message) from epoch 2 on at any batch over 4
    import os
    if os.environ.get("RANK") and os.environ.get("RANK") == os.environ.get("SPEEDTRAIN_TEST_OOM_RANK"):
        import torch
        from ultralytics.models.yolo.detect import DetectionTrainer

        original = DetectionTrainer.preprocess_batch

        def step(self, batch):
            with open(os.environ["SPEEDTRAIN_TEST_OOM_LOG"], "a") as f:
                f.write(f"{self.epoch},{self.batch_size}\\n")
            if self.epoch >= 1 and self.batch_size > 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total "
                                             "capacity of 79.19 GiB of which 1.06 GiB is free.")
            return original(self, batch)

        DetectionTrainer.preprocess_batch = step
    """
)


@pytest.mark.slow
def test_an_oom_on_one_rank_steps_every_rank_down_together(make_dataset, tmp_path, trees):
    root, project = make_dataset(16, 4), tmp_path / "runs"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAKE_OOM)
    seen = tmp_path / "rank1-batches.txt"
    env = {
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "SPEEDTRAIN_TEST_OOM_RANK": "1",
        "SPEEDTRAIN_TEST_OOM_LOG": str(seen),
    }
    code, out = trees(_speedtrain(*_train(root, project, "--nproc-per-node", "2")), env).wait()
    assert code == 0, out[-4000:]
    doc = _assert_trained_together(project / "train", 3)
    m = doc["stages"][0]["measured"]
    assert m["batch"] == 4
    assert [(f["epoch"], f["from_batch"], f["to_batch"]) for f in m["oom_fallbacks"]] == [(2, 8, 4)]  # listed once
    assert m["oom_fallbacks"][0]["error"].startswith("rank 1: CUDA out of memory")
    assert "rank 1 ran out of memory in epoch 2 at batch 8; all 2 ranks go on with 4" in out
    batches = [tuple(map(int, line.split(","))) for line in seen.read_text().split()]
    assert {b for e, b in batches if e == 0} == {8}  # epoch 1 trained once at 8 (from its checkpoint after)
    assert {b for e, b in batches if e >= 1} >= {8, 4}  # epoch 2 tried at 8, then done at 4
    assert not list((project / "train" / "main").glob(oom.FAULT_GLOB))  # the records were consumed


@pytest.mark.slow
def test_under_torchrun_with_max_restarts_an_oom_restarts_the_same_run_one_batch_smaller(make_dataset, tmp_path, trees):
    """torchrun restarts every rank with the same command: speedtrain goes on with the run it started (not a new
    folder), and all ranks read rank 1's record and step down."""
    root, project = make_dataset(16, 4), tmp_path / "runs"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAKE_OOM)
    env = {
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "SPEEDTRAIN_TEST_OOM_RANK": "1",
        "SPEEDTRAIN_TEST_OOM_LOG": str(tmp_path / "seen.txt"),
    }
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{_free_port()}",
        "--rdzv-id",
        "oom1",
        "-m",
        "speedtrain",
    ]
    code, out = trees([*torchrun, *_train(root, project)], env).wait()
    assert code == 0, out[-4000:]
    doc = _assert_trained_together(project / "train", 3)
    m = doc["stages"][0]["measured"]
    assert (m["batch"], [(f["from_batch"], f["to_batch"]) for f in m["oom_fallbacks"]]) == (4, [(8, 4)])
    assert not (project / "train2").exists()  # the restart went on with the same run


def _wait_for_epoch(run_dir: Path, tree: Tree, epoch: int) -> None:
    """Until `epoch` (1-based) is saved and the next one is under way."""
    checkpoint = run_dir / "main" / "weights" / checkpoints.RESUME_NAME

    def saved() -> bool:
        return checkpoint.exists() and checkpoints.checkpoint_epoch(checkpoint) + 1 >= epoch

    assert wait_for(lambda: saved() or tree.proc.poll() is not None, timeout=HARD_TIMEOUT)
    assert tree.proc.poll() is None, tree.proc.communicate()[0][-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_launcher_stops_every_rank_after_the_same_saved_epoch(make_dataset, tmp_path, trees, sig):
    root, project, epochs = make_dataset(16, 4), tmp_path / "runs", 5
    run_dir = project / "train"
    tree = trees(_speedtrain(*_train(root, project, "--nproc-per-node", "2", epochs=epochs)))
    _wait_for_epoch(run_dir, tree, 1)
    tree.proc.send_signal(sig)  # a terminal's Ctrl-C reaches the launcher only: the ranks run in their own sessions
    code, out = tree.wait()
    assert code == (130 if sig == signal.SIGINT else 143), out[-4000:]
    doc = _report(run_dir)
    stage = doc["stages"][0]
    assert stage["status"] == "interrupted", out[-3000:]
    done = stage["measured"]["epochs_done"]
    assert 1 <= done < epochs
    assert doc["run"]["stopped_by"] == signal.Signals(sig).name
    assert (
        checkpoints.checkpoint_epoch(run_dir / "main" / "weights" / checkpoints.RESUME_NAME) + 1 == done
    )  # saved, all of it
    assert f"--resume {run_dir}" in out
    code, out = trees(_speedtrain("train", "--resume", str(run_dir))).wait()
    assert code == 0, out[-4000:]
    _assert_trained_together(run_dir, epochs)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_them_all_after_the_same_epoch(make_dataset, tmp_path, trees):
    """A scheduler may signal one process of the group (or an operator one rank): every rank stops together."""
    root, project, epochs = make_dataset(16, 4), tmp_path / "runs", 5
    run_dir = project / "train"
    tree = trees(_speedtrain(*_train(root, project, "--nproc-per-node", "2", epochs=epochs)))
    _wait_for_epoch(run_dir, tree, 1)
    tree.ranks()[1].send_signal(signal.SIGTERM)
    code, out = tree.wait()
    assert code == 143, out[-4000:]
    doc = _report(run_dir)
    assert (doc["stages"][0]["status"], doc["run"]["stopped_by"]) == ("interrupted", "SIGTERM")
    done = doc["stages"][0]["measured"]["epochs_done"]
    assert checkpoints.checkpoint_epoch(run_dir / "main" / "weights" / checkpoints.RESUME_NAME) + 1 == done < epochs


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_in_bounded_time_and_resume_completes(make_dataset, tmp_path, trees):
    root, project, epochs = make_dataset(16, 4), tmp_path / "runs", 4
    run_dir = project / "train"
    tree = trees(_speedtrain(*_train(root, project, "--nproc-per-node", "2", epochs=epochs)))
    _wait_for_epoch(run_dir, tree, 1)
    victim = tree.ranks()[1]
    assert victim.environ()["RANK"] == "1"
    t0 = time.monotonic()
    victim.kill()
    code, out = tree.wait(timeout=90)
    ended = time.monotonic() - t0
    assert ended < 60, f"took {ended:.0f} s to end after a rank was killed"
    assert code == 5, out[-4000:]
    lines = [ln for ln in out.splitlines() if "rank 1 was killed (SIGKILL" in ln]
    assert len(lines) == 1, out[-3000:]
    assert f"speedtrain train --resume {run_dir}" in lines[0]
    assert not tree.ranks()  # no rank left behind
    code, out = trees(_speedtrain("train", "--resume", str(run_dir))).wait()
    assert code == 0, out[-4000:]
    _assert_trained_together(run_dir, epochs)


def test_the_torchrun_environment_is_read_as_torchrun_sets_it(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.world() is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1: a single process
    assert distributed.world() is None
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "9")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    w = distributed.world()
    assert w is not None
    assert (w.rank, w.local_rank, w.size, w.nodes, w.node_rank, w.leader) == (9, 1, 16, 2, 1, False)
    assert str(distributed.rank_device("cpu")) == "cpu"
    assert str(distributed.rank_device("2,3")) == "cuda:3"  # LOCAL_RANK picks its entry of --device
    assert str(distributed.rank_device("0")) == "cuda:1"  # a shorter list: GPU LOCAL_RANK, as torchrun means it


def test_the_launch_gives_ranks_an_hour_to_finish_their_epoch_where_torch_allows_it(monkeypatch):
    import dataclasses

    import torch.distributed.launcher.api as torch_launch

    from speedtrain import launch

    config = launch.launch_config(2, "speedtrain-run-0")
    assert (config.nproc_per_node, config.max_restarts, config.shutdown_timeout) == (2, 0, launch.SHUTDOWN_S)
    assert launch.grace_s() == launch.SHUTDOWN_S

    # torch before 2.12: the same LaunchConfig without the field (a fixed 30 s grace); passing it is a TypeError
    real = dataclasses.fields(torch_launch.LaunchConfig)
    fields = [(f.name, f.type, f) for f in real if f.name != "shutdown_timeout"]
    old = dataclasses.make_dataclass("LaunchConfig", fields)
    with pytest.raises(TypeError, match="shutdown_timeout"):
        old(min_nodes=1, max_nodes=1, nproc_per_node=2, shutdown_timeout=5)
    monkeypatch.setattr(torch_launch, "LaunchConfig", old)
    config = launch.launch_config(2, "speedtrain-run-0")
    assert (config.nproc_per_node, config.rdzv_endpoint) == (2, "127.0.0.1:0")
    assert launch.grace_s() == launch.OLD_TORCH_GRACE_S
