"""Rendering the speed report from a stored speed_report.json (recorded from a real CPU run)."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from speedtrain import render as render_mod
from speedtrain.errors import SpeedtrainError
from speedtrain.speedreport import SpeedReport

STORED = Path(__file__).parent / "data" / "speed_report.json"


def stored() -> dict:
    return copy.deepcopy(json.loads(STORED.read_text()))


def typed(doc: dict) -> SpeedReport:
    return SpeedReport.from_dict(doc, "test")


def render(renderable, width: int = 80) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(renderable)
    return out.getvalue()


def test_report_renders_what_was_measured_in_80_columns():
    doc = stored()
    text = render(render_mod.render_report(typed(doc)))
    assert max(len(line) for line in text.splitlines()) <= 80
    main = doc["stages"][0]["measured"]
    assert "Measured on this machine" in text
    assert "Estimated factors (not measured)" in text
    assert f"{main['images_per_s']:.1f}" in text
    assert "finetune" in text
    assert main["weights"] in text.replace("\n", "")
    assert doc["reasons"]["batch"].split(":")[0] in text


def test_report_shows_oom_fallbacks_and_gpu_figures():
    doc = stored()
    m = doc["stages"][0]["measured"]
    m["oom_fallbacks"] = [{"epoch": 0, "from_batch": 48, "to_batch": 32, "at": "t", "error": "CUDA out of memory"}]
    m["gpu_util_mean"], m["gpu_mem_peak_gb"] = 87.25, 11.5
    text = render(render_mod.render_measured(typed(doc)))
    assert "out of memory at batch 48, continued with 32 (epoch 0, t)" in text
    assert "87" in text
    assert "11.5" in text


def test_report_shows_the_validation_cadence_and_the_time_estimate(tmp_path):
    doc = stored()
    doc["stages"][0]["val_every"] = 0  # planned auto
    m = doc["stages"][0]["measured"]
    m.update(
        epochs_done=7,
        epoch_map50_95=[0.1, 0.2, 0.25, 0.3, 0.31],
        epoch_loss=[5.0, 4.0, 3.5, 3.0, 2.9],
        epoch_validated=[1, 3, 5, 6, 7],
        val_every=3,
        val_time_s=41.0,
        val_saved_s=16.4,
        estimated_epoch_s=10.0,
        estimated_from_batches=8,
        train_times_s=[11.0, 11.0, 12.0, 11.0, 11.0, 11.0, 11.0],
        epoch_times_s=[14.0, 11.1, 15.0, 11.1, 14.0, 14.0, 14.0],
    )
    rep = typed(doc)
    text = " ".join(render(render_mod.render_measured(rep)).split())
    assert "by epoch 1: 0.100, 3: 0.200, 5: 0.250, 6: 0.300, 7: 0.310" in text  # numbered by the validated epochs
    assert "validated 5 of 7 epochs (every 3, auto); validating took 41 s, skipping saved about 16 s (estimate)" in text
    assert "estimated 10.0 s from the first 8 batches; measured 11.1 s (mean of 7, +11%)" in text
    rep.save_png(tmp_path / "r.png")  # the curve is drawn at the validated epochs
    assert (tmp_path / "r.png").stat().st_size > 0


def _ranks(rates: list[float]) -> list[dict]:
    return [
        {
            "rank": i,
            "node": f"node{i // 2}",
            "device": f"cuda:{i % 2}",
            "images_per_s": r,
            "gpu_util_mean": 90.0,
            "gpu_mem_peak_gb": 9.5,
            "images": 64,
            "batches": 4,
        }
        for i, r in enumerate(rates)
    ]


def test_a_multi_rank_stage_shows_each_rank_and_names_the_slow_one(tmp_path):
    doc = stored()
    doc["stages"][0]["measured"]["ranks"] = _ranks([101.0, 99.5, 60.0, 100.2])
    rep = typed(doc)
    text = render(render_mod.render_measured(rep), width=200)
    assert "main: 4 ranks," in text
    assert "rank 2 60.0 (node1 cuda:0, GPU 90 %, 9.5 GB)" in text
    assert "rank 2 (node1 cuda:0) ran at 59% of the fastest rank: every step waits for it" in text
    even = stored()
    even["stages"][0]["measured"]["ranks"] = _ranks([100.0, 97.0])
    assert "of the fastest rank" not in render(render_mod.render_measured(typed(even)), width=200)
    many = stored()
    many["stages"][0]["measured"]["ranks"] = _ranks([100.0 + i for i in range(16)])
    assert "slowest 100.0, median 107.5, fastest 115.0" in render(render_mod.render_measured(typed(many)), width=200)
    assert render_mod.save_png(rep, tmp_path / "r.png").stat().st_size > 0  # the per-rank levels draw


def test_interrupted_stage_says_how_to_go_on():
    doc = stored()
    doc["stages"][0].update(status="interrupted", note="interrupted after epoch 1; resume with --resume")
    text = render(render_mod.render_measured(typed(doc)), 120)
    assert "main: interrupted after epoch 1; resume with --resume" in text


def test_skipped_stage_says_why():
    doc = stored()
    doc["stages"][1].update(status="skipped", measured=None, note="declined at the prompt")
    text = render(render_mod.render_measured(typed(doc)))
    assert "skipped" in text
    assert "finetune: declined at the prompt" in text


def test_load_report_from_folder_and_bad_files(tmp_path):
    (tmp_path / "speed_report.json").write_text(STORED.read_text())
    assert SpeedReport.from_json(tmp_path).stages
    with pytest.raises(SpeedtrainError, match="nope: no such run folder or report file"):
        SpeedReport.from_json(tmp_path / "nope")  # the missing folder is named, not its parent
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpeedtrainError, match="no speed_report.json in .*empty$"):
        SpeedReport.from_json(tmp_path / "empty")
    (tmp_path / "bad.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(SpeedtrainError, match="not a speedtrain speed report"):
        SpeedReport.from_json(tmp_path / "bad.json")
    (tmp_path / "newer.json").write_text(json.dumps({**stored(), "run": {"version": 2}}))
    with pytest.raises(SpeedtrainError, match="report format 2 is newer"):
        SpeedReport.from_json(tmp_path / "newer.json")


def test_stored_report_has_the_documented_shape():
    doc = typed(stored()).to_dict()
    measured = doc["stages"][0]["measured"]
    keys = {"epoch_times_s", "images_per_s", "iterations_per_epoch", "gpu_util_mean", "gpu_mem_peak_gb"}
    assert keys | {"oom_fallbacks", "best_metrics", "weights"} <= set(measured)
    assert {"device", "stages", "reasons", "hardware", "dataset", "run"} <= set(doc)


def test_png_from_the_stored_report(tmp_path):
    from PIL import Image

    path = typed(stored()).save_png(tmp_path / "speed_report.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (1600, 450)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # lines, text and a table were drawn, not a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["speed_report.png"]  # no temporary file left


def test_png_with_two_measured_stages_and_no_stage(tmp_path):
    doc = stored()
    assert typed(doc).save_png(tmp_path / "two.png").stat().st_size > 0
    m = doc["stages"][0]["measured"]  # resumed after kill -9: earlier epochs have whole-epoch times only
    m["epoch_times_s"], m["train_times_s"] = [3.0, 2.0, 2.0], [1.5, 1.4]
    assert typed(doc).save_png(tmp_path / "resumed.png").stat().st_size > 0
    for stage in doc["stages"]:
        stage["measured"] = None
    assert typed(doc).save_png(tmp_path / "none.png").stat().st_size > 0


def test_console_is_plain_ascii_when_not_a_terminal():
    from speedtrain.cli import _Console

    out = io.StringIO()
    _Console(file=out, width=80).print(typed(stored()))
    text = out.getvalue()
    assert "\x1b" not in text
    assert all(ord(ch) < 128 for ch in text)
    assert "| knob" in text  # tables drawn with ASCII characters


def test_a_val_split_without_boxes_reports_no_metrics_rather_than_a_measured_looking_zero():
    doc = stored()
    doc["dataset"]["problems"] = [
        {
            "severity": "warning",
            "kind": "val-no-boxes",
            "file": "/d/images/val",
            "detail": "none of the 4 val images has a usable box",
        }
    ]
    rep = typed(doc)
    assert rep.final_scores() == ()
    text = render(render_mod.render_report(rep), width=200)
    assert "no validation metrics: the val split has no boxes (/d/images/val)" in text
    assert "mAP50-95 0." not in text
    assert "mAP50-95 at" not in text  # no accuracy line either


def test_a_schedule_line_says_each_phase_and_where_the_deadline_fell():
    log = [
        {
            "epoch": e,
            "imgsz": s,
            "start_s": 10.0 * (e - 1),
            "end_s": 10.0 * e,
            "lr_start": round(1 - (e - 1) / 5, 2),
            "lr_end": round(1 - e / 5, 2),
            "validated": e == 5,
            "mosaic": e < 5,
        }
        for e, s in zip(range(1, 6), (320, 320, 416, 640, 640), strict=True)
    ]
    line = render_mod.schedule_line("main", log, 60.0)
    assert line.startswith("main: 320 px epochs 1-2 (lr 1.00->0.60), 416 px epoch 3 (lr 0.60->0.40), 640 px epochs")
    assert "mosaic off from epoch 5" in line
    assert "training ended at 0m 50s of its 1m 00s deadline" in line
