"""SpeedReport: the typed report and its JSON (format 1), read from reports written by earlier code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import fake_stats, snapshot

from speedtrain import planner
from speedtrain.errors import SpeedtrainError
from speedtrain.records import RunResult, StageResult
from speedtrain.speedreport import SpeedReport

DATA = Path(__file__).parent / "data"
V1_TODAY = DATA / "speed_report_v1.json"  # written by the code before the typed report (2026-11-27)
V1_EARLY = DATA / "speed_report.json"  # written before prepare, tune, run.status and data_yaml existed


def test_a_format_1_report_round_trips_exactly():
    doc = json.loads(V1_TODAY.read_text())
    rep = SpeedReport.from_json(V1_TODAY)
    again = rep.to_dict()
    for stage in again["stages"]:  # added since: empty for a report that did not have them
        assert (stage["measured"].pop("epoch_end_s"), stage["measured"].pop("latency_ms")) == ([], {})
        assert stage["measured"].pop("ranks") == []
        assert [stage["measured"].pop(k) for k in ("epoch_map50_95", "epoch_loss", "scores")] == [[], [], {}]
        added = (
            "epoch_validated",
            "val_every",
            "val_time_s",
            "val_saved_s",
            "estimated_epoch_s",
            "estimated_from_batches",
        )
        assert [stage["measured"].pop(k) for k in added] == [[], 1, 0.0, 0.0, None, 0]  # as before they existed
        assert stage["measured"].pop("phase_log") == []
        assert stage.pop("val_every") == 1
        assert stage.pop("schedule") is None
        assert stage.pop("max_epochs") is None
    assert again.pop("ranks") == 1  # one process
    assert again["hardware"].pop("versions") == {}  # not recorded before it existed
    assert again["hardware"].pop("libc") == ""
    assert again["dataset"].pop("fingerprint") == ""
    assert again["prepare"]["original_dataset"].pop("fingerprint") == ""
    assert again["prepare"].pop("ram_cache") is False
    assert again["prepare"]["summary"].pop("qualities") == {}  # not recorded before it existed
    assert again == doc
    assert SpeedReport.from_dict(json.loads(rep.to_json())) == rep


def test_an_early_report_reads_with_what_it_lacks_filled_in():
    rep = SpeedReport.from_json(V1_EARLY)
    assert rep.run is not None
    assert rep.run.status == "finished"  # from "interrupted": false, before "status" existed
    assert rep.prepare is None
    assert rep.tune is None
    assert rep.main.status == "completed"
    assert rep.images_per_s
    assert rep.images_per_s > 0
    again = rep.to_dict()
    old = json.loads(V1_EARLY.read_text())
    assert old["stages"][0]["measured"].items() <= again["stages"][0]["measured"].items()  # later fields added
    assert again["run"]["status"] == "finished"


def test_typed_fields_and_derived_figures():
    rep = SpeedReport.from_json(V1_TODAY)
    main = rep.main
    assert main.stage.name == "main"
    assert main.measured is not None
    assert main.measured.epochs_done == main.stage.epochs == 1
    assert rep.metric("mAP50-95") == main.measured.metric("mAP50-95")
    assert rep.hardware.cpu_cores_logical >= 1
    assert rep.dataset.train_images == main.measured.images_per_epoch


def test_a_plan_has_the_plan_json_layout():
    hw, stats = snapshot((24,)), fake_stats()
    plan = planner.plan(hw, stats)
    doc = SpeedReport.planned(hw, stats, plan).to_dict()
    assert set(doc) == {
        "device",
        "model",
        "stages",
        "reasons",
        "target_map",
        "estimates",
        "warnings",
        "cache_estimate_gb",
        "prepare_size",
        "baseline",
        "ranks",
        "hardware",
        "dataset",
    }
    assert "status" not in doc["stages"][0]
    assert doc["stages"][0]["batch"] == plan.stages[0].batch
    back = SpeedReport.from_dict(doc)
    assert back.plan == plan
    assert back.run is None


def _result(stage: planner.Stage, status: str, done: int) -> StageResult:
    """What runner.train_stage returns for `stage` after `done` epochs (the figures are arbitrary)."""
    return StageResult(
        stage.name, status, stage.imgsz, stage.batch, stage.epochs, done, (2.0,) * done, (1.5,) * done, 100, 7, 66.7
    )


def test_a_run_goes_from_pending_to_running_to_finished(tmp_path):
    hw, stats = snapshot((24,)), fake_stats()
    plan = planner.plan(hw, stats, planner.Overrides(finetune="yes"))
    rep = SpeedReport.planned(hw, stats, plan).started(tmp_path, tmp_path / "data.yaml")
    assert [s.status for s in rep.stages] == ["pending", "pending"]
    running = rep.with_results((), "main")
    assert [s.status for s in running.stages] == ["running", "pending"]
    main = _result(plan.stages[0], "completed", plan.stages[0].epochs)
    half = running.with_results((main,), "finetune")
    assert [s.status for s in half.stages] == ["completed", "running"]
    ft = _result(plan.stages[1], "interrupted", 2)
    done = half.finished(RunResult(str(tmp_path), "yolo26n.yaml", "note", (main, ft), "t0", 12.5, interrupted=True))
    assert done.run is not None
    assert (done.run.status, done.run.interrupted, done.run.wall_time_s) == ("interrupted", True, 12.5)
    path = tmp_path / "speed_report.json"
    done.to_json(path)
    back = SpeedReport.from_json(tmp_path)
    assert back == done
    resumed = back.resumed()
    assert [s.status for s in resumed.stages] == ["pending", "pending"]
    assert back.results() == (main, ft)  # what --resume keeps (main) and goes on from (finetune)


def test_a_stage_changed_before_training_is_recorded_with_its_warning():
    hw, stats = snapshot((24,)), fake_stats()
    plan = planner.plan(hw, stats)
    rep = SpeedReport.planned(hw, stats, plan)
    changed = rep.with_stage(planner.replace(plan.stages[0], cache="disk"), "RAM fell")
    assert changed.main.stage.cache == "disk"
    assert changed.plan.stages[0].cache == "disk"
    assert changed.plan.warnings[-1] == "RAM fell"
    assert changed.to_dict()["warnings"][-1] == "RAM fell"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("hardware"), "hardware missing or malformed"),
        (lambda d: d["stages"][0].update(status="exploded"), "status 'exploded'"),
        (lambda d: d["run"].update(version=2), "report format 2 is newer"),
        (lambda d: d["stages"][0]["measured"].update(oom_fallbacks=[{"x": 1}]), "not a complete speedtrain"),
    ],
)
def test_a_broken_report_is_one_line(tmp_path, mutate, message):
    doc = json.loads(V1_TODAY.read_text())
    mutate(doc)
    path = tmp_path / "speed_report.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SpeedtrainError, match=message) as err:
        SpeedReport.from_json(path)
    assert "\n" not in str(err.value)


def test_a_report_renders_itself_in_jupyter():
    rep = SpeedReport.from_json(V1_TODAY)
    bundle = rep._repr_mimebundle_(include=[], exclude=[])  # what IPython calls to display a value
    assert "Measured on this machine" in bundle["text/plain"]
    assert "<pre" in bundle["text/html"]
    assert f"{rep.images_per_s:.1f}" in bundle["text/plain"]
    plan_only = SpeedReport.planned(rep.hardware, rep.dataset, rep.plan)
    assert "Plan: yolo26n" in plan_only._repr_mimebundle_(include=[], exclude=[])["text/plain"]


def test_the_prepared_copys_jpeg_qualities_round_trip():
    doc = json.loads(V1_TODAY.read_text())
    doc["prepare"]["summary"]["qualities"] = {"85": 30, "95": 2}
    rep = SpeedReport.from_dict(doc)
    assert rep.prepare is not None
    assert rep.prepare.summary.qualities == ((85, 30), (95, 2))
    assert json.loads(rep.to_json())["prepare"]["summary"]["qualities"] == {"85": 30, "95": 2}
