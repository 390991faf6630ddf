"""benchmarks/gpu_check.sh, the one-call GPU acceptance, in its CPU smoke mode: every step runs and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--cpu", "--work", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["failed"] == {}, doc["failed"]
    recs = doc["records"]
    for row in ("defaults", "plan-settings", "plan", "fast", "autotune", "deterministic", "torchrun", "floor"):
        assert recs[row]["images_per_s"] > 0, row
    # under torchrun --nproc-per-node 1 the run is the same single process as plain `speedtrain train`
    assert (recs["torchrun"]["batch"], recs["torchrun"]["imgsz"]) == (recs["plan"]["batch"], recs["plan"]["imgsz"])
    assert recs["deterministic"]["deterministic"] is True
    assert recs["plan"]["deterministic"] is False
    assert recs["fast"]["pipeline"] == "fast"
    assert recs["autotune"]["tune_s"] > 0
    assert recs["probe"]["ok"] is True  # no GPU here, and nvidia-smi agrees there is none
    assert recs["oom"]["skipped"].startswith("needs CUDA")
    ctrlc = recs["ctrlc"]
    assert (ctrlc["first_exit"], ctrlc["resume_exit"], ctrlc["ok"]) == (130, 0, True)
    assert ctrlc["epochs_after_resume"] == [1, 2, 3, 4]  # every epoch exactly once
    cmp = recs["compare"]
    assert [a["name"] for a in cmp["arms"]] == ["defaults", "plan", "plan-phases"]
    assert all(a["epochs_done"] >= 1 for a in cmp["arms"])
    assert [t["arm"] for t in cmp["time_to_accuracy"]] == ["plan", "plan-phases"]
    phases = cmp["arms"][2]["phases"]  # rising sizes that end at the size the defaults train at
    assert phases
    assert phases == sorted(phases)
    assert phases[-1] == cmp["arms"][0]["imgsz"]
    md = (out / "gpu_check.md").read_text()
    assert "| speedtrain train --pipeline fast | 64 / 16 |" in md
    assert "Time to accuracy (`speedtrain compare --arms defaults,plan,plan-phases`, 10 s per arm" in md
    assert "| plan | 64 / 16 |" in md
    assert f"| plan-phases | {'-'.join(map(str, phases))} / " in md
    assert "| Ctrl-C mid-epoch, then --resume | OK |" in md
    assert md in done.stdout  # the table is printed at the end too


def test_gpu_check_report_names_a_failed_step_by_its_log(tmp_path):
    """A step that died leaves no record: its row says failed, with the last line of its log."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    (tmp_path / "steps").mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "fast.log").write_text("Traceback ...\nRuntimeError: CUDA error: an illegal memory access\n")
    (tmp_path / "logs" / "oom.log").write_text("starting\ntimed out after 90 s\n")
    gpu_check.step_report(tmp_path, tmp_path, None)
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["failed"]["fast"] == "RuntimeError: CUDA error: an illegal memory access (logs/fast.log)"
    assert doc["failed"]["oom"] == "timed out after 90 s (logs/oom.log)"
    assert doc["failed"]["ctrlc"] == "did not run"
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| speedtrain train --pipeline fast | failed: RuntimeError: CUDA error" in md
    assert "| OOM on an emulated small card | failed | timed out after 90 s (logs/oom.log) |" in md
