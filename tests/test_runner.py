"""The stage loop with real Ultralytics: two stages end to end, the fine-tune decision, signals and the stop they
ask for, the time estimate, the setup heartbeat and the benchmark smoke runs. Recovery paths: test_recovery.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_benchmark, table_rows, tree_hash, wait_for

from speedtrain import measured, runner, ultra, workflow
from speedtrain.knobs import Overrides


@pytest.mark.slow
def test_two_stage_training_end_to_end(make_dataset, tmp_path):
    root = make_dataset(8, 4)
    before = tree_hash(root)
    ov = Overrides(imgsz=64, epochs=1, finetune="yes", finetune_epochs=1, finetune_imgsz=96, prepare="no")
    planned = workflow.make_plan(root, ov, ["plots=False"])
    rep, path = workflow.execute(planned, tmp_path / "runs", "e2e")
    doc = rep.to_dict()
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
        assert len(m["epoch_map50_95"]) == len(m["epoch_loss"]) == 1  # from results.csv, for the report's curve
        assert 0 <= m["epoch_map50_95"][0] <= 1
        assert m["epoch_loss"][0] > 0
        assert m["scores"][str(stage["imgsz"])] == m["best_metrics"]["mAP50-95"]
    # the main stage's weights were validated at 640 and at the fine-tune's size; the fine-tune's at 640
    assert set(doc["stages"][0]["measured"]["scores"]) == {"64", "96", "640"}
    assert set(doc["stages"][1]["measured"]["scores"]) == {"96", "640"}
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
    doc = workflow.execute(planned, tmp_path / "runs")[0].to_dict()
    ft = doc["stages"][1]
    assert ft["status"] == "skipped"
    assert ft["measured"] is None
    assert "at or above --target-map 0.0" in ft["note"]


@pytest.mark.slow
def test_compare_ultralytics_benchmark_smoke(tmp_path):
    """The benchmark script runs end to end (tiny: 8 images, 64 px, 1 epoch) and writes its table."""
    rows = table_rows(run_benchmark("compare_ultralytics.py", tmp_path), "(")
    assert [r[0] for r in rows] == [
        "(a) Ultralytics defaults",
        "(b) Ultralytics batch=-1",
        "(c0) plan, Ultralytics' torch threads",
        "(c) speedtrain plan",
        "(d) speedtrain autotune",
    ]
    assert all(float(r[3]) > 0 for r in rows)  # steady img/s was measured for every row
    # the threads column is read inside each training: Ultralytics' min(8, cores - 1), and the plan's own
    from speedtrain import hardware

    threads = {r[0][:4]: int(r[2]) for r in rows}
    assert threads["(c0)"] == min(8, max(1, os.cpu_count() - 1))
    assert threads["(c) "] == hardware.probe().cpu_cores_physical


def test_metrics_from_a_metrics_object_and_from_the_dict_ddp_returns():
    """model.train() returns Ultralytics' metrics object on one GPU and a plain dict after its DDP run (8.4.190)."""
    raw = {"metrics/precision(B)": 0.5, "metrics/mAP50-95(B)": 0.4, "fitness": 0.41}

    class Metrics:
        results_dict = raw

    expected = (("precision", 0.5), ("mAP50-95", 0.4), ("fitness", 0.41))
    assert measured._metrics(Metrics()) == expected
    assert measured._metrics(raw) == expected
    assert measured._metrics(None) == ()


@pytest.mark.slow
def test_val_cadence_benchmark_smoke(tmp_path):
    """benchmarks/val_cadence.py end to end (tiny: the embedded sample, 4 epochs at 64 px): every 3rd epoch
    validates 3 and 4 (the last two) and says what it saved; every epoch validates all 4."""
    rows = table_rows(run_benchmark("val_cadence.py", tmp_path, "--arms", "1,3"), "1 ", "3 ")
    assert [r[:3] for r in rows] == [["1", "1", "4 of 4"], ["3", "3", "2 of 4"]]
    assert rows[0][5] == "-"  # nothing skipped, nothing saved
    assert float(rows[1][4]) > 0  # validation was timed
    assert float(rows[1][5]) > 0  # the skipped epoch's validation, estimated


def test_the_time_estimate_rests_on_the_steady_batches_of_the_first_epoch(monkeypatch):
    """First batch 3 s (the loader starting, warm-up), then 0.5 s a batch: an epoch of 20 batches is 3 + 19 x 0.5 =
    12.5 s, said once after 8 batches, for the 5 epochs left."""
    from types import SimpleNamespace

    clock = [100.0]
    monkeypatch.setattr(ultra.time, "perf_counter", lambda: clock[0])
    said: list[str] = []
    rec = ultra.Recorder(
        stage="main",
        log=said.append,
        baseline_factor=(640 / 416) ** 2,
        later=(("finetune", 25, (640 / 416) ** 2, True),),
    )
    trainer = SimpleNamespace(epoch=0, epochs=5, train_loader=[None] * 20, args=SimpleNamespace(time=None))
    assert "on_train_batch_end" in rec.callbacks()
    rec.on_train_epoch_start(trainer)
    for n in range(1, 12):
        clock[0] += 3.0 if n == 1 else 0.5
        rec.on_train_batch_end(trainer)
    assert (rec.estimated_epoch_s, rec.estimated_from) == (12.5, 8)
    assert said == [
        "main: about 1m 02s for 5 epochs' training passes (12.5 s each; estimate from the first 8 "
        "batches, validation not included); at Ultralytics' 640 px about 2m 28s (estimate: time ~ "
        "pixels); then finetune (if it runs) about 12m 20s for 25 epochs (estimate: time ~ "
        "pixels)"
    ]
    timed = ultra.Recorder(stage="main", log=said.append)  # --time: how many epochs fit the stage's share
    trainer.args.time = 0.05  # 3 minutes
    timed.on_train_epoch_start(trainer)
    for n in range(1, 9):
        clock[0] += 3.0 if n == 1 else 0.5
        timed.on_train_batch_end(trainer)
    assert said[-1].startswith("main: about 14 epochs' training passes fit its 3m 00s (12.5 s each")


@pytest.mark.slow
def test_a_time_budget_ends_with_the_learning_rate_schedule_complete(make_dataset, tmp_path):
    """--time 1m on a tiny dataset: Ultralytics' time= fits the epochs to the minute, the stage counts as completed
    (not stopped early), and the cosine schedule reached its final rate in the last epoch."""
    import csv

    import speedtrain

    rep = speedtrain.train(
        make_dataset(8, 2),
        imgsz=64,
        time="1m",
        epochs=300,
        finetune="no",
        prepare="no",
        device="cpu",
        project=tmp_path / "runs",
        verbose=False,
        hooks=speedtrain.Hooks(log=print),
        plots=False,
    )
    m = rep.main.measured
    assert m is not None
    assert m.status == "completed", m.note
    assert 3 <= m.epochs_done < 300  # fitted to the budget, not the planned 300
    # the hard stop held: time= checks the clock after each epoch, so training ends within one epoch of the minute
    # (a bound on the epochs, not the wall time, which setup and the final validation stretch on a loaded machine)
    assert sum(m.epoch_times_s) < 60 + max(m.epoch_times_s) + 5
    with (Path(m.save_dir or "") / "results.csv").open(newline="") as f:
        rates = [float(r["lr/pg0"]) for r in csv.DictReader(f)]
    assert len(rates) == m.epochs_done
    assert rates[-1] < 0.1 * max(rates)  # annealed: lr0 x lrf at the end of a cosine schedule, not cut halfway


@pytest.mark.slow
def test_a_time_budget_gives_its_last_30_percent_to_the_fine_tune_by_default(make_dataset, tmp_path):
    """--time 1m with --finetune left at auto: the main stage trains its 70 % at its size, then the fine-tune its
    30 % at the larger size from the main stage's best weights; each ends within one epoch of its share."""
    import speedtrain

    rep = speedtrain.train(
        make_dataset(8, 2),
        imgsz=64,
        finetune_imgsz=96,
        time="1m",
        prepare="no",
        device="cpu",
        project=tmp_path / "runs",
        verbose=False,
        hooks=speedtrain.Hooks(log=print),
        plots=False,
    )
    assert [(s.stage.name, s.stage.imgsz, s.status) for s in rep.stages] == [
        ("main", 64, "completed"),
        ("finetune", 96, "completed"),
    ]
    main, finetune = (s.measured for s in rep.stages)
    assert main is not None
    assert finetune is not None
    for stage, share in ((main, 0.7), (finetune, 0.3)):
        assert stage.epochs_done >= 1
        assert sum(stage.epoch_times_s) < 60 * share + max(stage.epoch_times_s) + 5
    assert rep.stages[1].stage.train_args()["time"] == pytest.approx(0.3 / 60, abs=1e-5)
    args = yaml.safe_load((Path(finetune.save_dir or "") / "args.yaml").read_text())  # Ultralytics' own record
    assert (args["model"], args["imgsz"]) == (main.weights, 96)  # from the main stage's best weights
    assert rep.metric("mAP50-95") is not None


def test_a_stage_setting_up_with_ultralytics_output_hidden_says_what_it_does_every_few_seconds():
    """Ultralytics' label scan and image-cache fill (minutes at 25,000 images) go to its log file: until the first
    batch a line names the time so far and Ultralytics' latest line, with its count and rate."""
    import io

    from speedtrain.util import PlainStream

    recorder, lines, hidden = ultra.Recorder(), [], PlainStream(io.StringIO())
    with runner._heard_while_setting_up(recorder, hidden, lines.append, "main", every=0.05):
        hidden.write("\r\x1b[Ktrain: Caching images (0.1GB RAM): 10% 2500/25000 1.2kit/s 2s<18s")
        hidden.write("\r\x1b[Ktrain: Caching images (0.4GB RAM): 45% 11250/25000 1.2kit/s 9s<11s")
        assert wait_for(lambda: len(lines) >= 2, 5)
        recorder.batches = 1  # the first batch: the stage speaks for itself from here
        time.sleep(0.2)
        heard = len(lines)
        time.sleep(0.2)
    assert len(lines) == heard  # no line after the first batch
    assert lines[-1].startswith("main: setting up, 0 s: train: Caching images (0.4GB RAM): 45% 11250/25000")
    with runner._heard_while_setting_up(ultra.Recorder(), None, lines.append, "main", every=0.01):
        time.sleep(0.1)  # Ultralytics' output on the console (--verbose): it speaks for itself
    assert len(lines) == heard


@pytest.mark.slow
def test_the_scale_benchmark_times_every_phase_to_the_first_batch(tmp_path):
    """benchmarks/scale.py --tiny: speedtrain's first and second run and plain Ultralytics, each to its first batch."""
    rows = table_rows(run_benchmark("scale.py", tmp_path), "40 ")
    assert [r[1] for r in rows] == ["speedtrain, first run", "speedtrain, second run", "plain Ultralytics"]
    for row in rows:
        first_batch = float(row[6])
        assert first_batch > 0
        assert row[7].endswith("x")
        assert row[9].endswith("GB")
    assert all(float(rows[0][i]) <= float(rows[0][6]) for i in (2, 3, 4, 5))  # the phases end in order
