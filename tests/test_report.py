"""Rendering the speed report from a stored speed_report.json (recorded from a real CPU run)."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from speedtrain import report
from speedtrain.errors import SpeedtrainError

STORED = Path(__file__).parent / "data" / "speed_report.json"


def render(renderable, width: int = 80) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(renderable)
    return out.getvalue()


def test_report_renders_what_was_measured_in_80_columns():
    doc = report.load_report(STORED)
    text = render(report.render_report(doc))
    assert max(len(line) for line in text.splitlines()) <= 80
    main = doc["stages"][0]["measured"]
    assert "Measured on this machine" in text
    assert "Estimated factors (not measured)" in text
    assert f"{main['images_per_s']:.1f}" in text
    assert "finetune" in text
    assert main["weights"] in text.replace("\n", "")
    assert doc["reasons"]["batch"].split(":")[0] in text


def test_report_shows_oom_fallbacks_and_gpu_figures():
    doc = copy.deepcopy(report.load_report(STORED))
    m = doc["stages"][0]["measured"]
    m["oom_fallbacks"] = [{"epoch": 0, "from_batch": 48, "to_batch": 32, "at": "t", "error": "CUDA out of memory"}]
    m["gpu_util_mean"], m["gpu_mem_peak_gb"] = 87.25, 11.5
    text = render(report.render_measured(doc))
    assert "out of memory at batch 48, continued with 32 (epoch 0, t)" in text
    assert "87" in text
    assert "11.5" in text


def test_interrupted_stage_says_how_to_go_on():
    doc = copy.deepcopy(report.load_report(STORED))
    doc["stages"][0].update(status="interrupted", note="interrupted after epoch 1; resume with --resume")
    assert "main: interrupted after epoch 1; resume with --resume" in render(report.render_measured(doc), 120)


def test_skipped_stage_says_why():
    doc = copy.deepcopy(report.load_report(STORED))
    doc["stages"][1].update(status="skipped", measured=None, note="declined at the prompt")
    text = render(report.render_measured(doc))
    assert "skipped" in text
    assert "finetune: declined at the prompt" in text


def test_load_report_from_folder_and_bad_files(tmp_path):
    (tmp_path / "speed_report.json").write_text(STORED.read_text())
    assert report.load_report(tmp_path)["stages"]
    with pytest.raises(SpeedtrainError, match="no speed_report.json"):
        report.load_report(tmp_path / "nope")
    (tmp_path / "bad.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(SpeedtrainError, match="not a speedtrain speed report"):
        report.load_report(tmp_path / "bad.json")


def test_stored_report_has_the_documented_shape():
    doc = report.load_report(STORED)
    measured = doc["stages"][0]["measured"]
    keys = {"epoch_times_s", "images_per_s", "iterations_per_epoch", "gpu_util_mean", "gpu_mem_peak_gb"}
    assert keys | {"oom_fallbacks", "best_metrics", "weights"} <= set(measured)
    assert {"device", "stages", "reasons", "hardware", "dataset", "run"} <= set(doc)


def test_png_from_the_stored_report(tmp_path):
    from PIL import Image

    doc = report.load_report(STORED)
    path = report.save_png(doc, tmp_path / "speed_report.png")
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (1200, 450)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # lines, text and a table were drawn, not a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["speed_report.png"]  # no temporary file left


def test_png_with_two_measured_stages_and_no_stage(tmp_path):
    doc = copy.deepcopy(report.load_report(STORED))
    assert report.save_png(doc, tmp_path / "two.png").stat().st_size > 0
    m = doc["stages"][0]["measured"]  # resumed after kill -9: earlier epochs have whole-epoch times only
    m["epoch_times_s"], m["train_times_s"] = [3.0, 2.0, 2.0], [1.5, 1.4]
    assert report.save_png(doc, tmp_path / "resumed.png").stat().st_size > 0
    for stage in doc["stages"]:
        stage["measured"] = None
    assert report.save_png(doc, tmp_path / "none.png").stat().st_size > 0


def test_console_is_plain_ascii_when_not_a_terminal():
    from speedtrain.cli import _Console

    out = io.StringIO()
    _Console(file=out, width=80).print(report.render_report(report.load_report(STORED)))
    text = out.getvalue()
    assert "\x1b" not in text
    assert all(ord(ch) < 128 for ch in text)
    assert "| knob" in text  # tables drawn with ASCII characters
