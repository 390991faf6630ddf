"""`speedtrain compare`: budgets, arms, time to accuracy from recorded curves, and a real two-arm run on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from conftest import fake_stats, snapshot, tree_hash
from typer.testing import CliRunner

import speedtrain
from speedtrain import comparison, planner, ultra
from speedtrain.cli import app
from speedtrain.comparison import ArmResult, Comparison, Point, Score, time_to_reach
from speedtrain.errors import UsageError
from speedtrain.records import DatasetSummary, StageResult
from speedtrain.util import spread


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("20m", 1200), ("1h30m", 5400), ("1h", 3600), ("300", 300), (45, 45)]
)
def test_budgets(text, seconds):
    assert comparison.parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5s", "-3m", "20 minutes", "8d", True])
def test_bad_budgets_are_one_line(text):
    with pytest.raises(UsageError, match="--budget") as err:
        comparison.parse_budget(text)
    assert "\n" not in str(err.value)


def test_arms_are_checked_and_deduplicated():
    assert comparison.parse_arms("plan, defaults,plan") == ("plan", "defaults")
    assert comparison.parse_arms(["defaults", "plan-640"]) == ("defaults", "plan-640")
    with pytest.raises(UsageError, match="unknown arm 'fast'; known: defaults, plan, plan-one-size, plan-phases"):
        comparison.parse_arms("defaults,fast")


def curve(*pairs: tuple[float, float]) -> tuple[Point, ...]:
    return tuple(Point(i + 1, t, 0.0, m) for i, (t, m) in enumerate(pairs))


def test_time_to_reach_is_the_first_epoch_at_or_over_the_target():
    c = curve((10, 0.05), (20, 0.12), (30, 0.10), (40, 0.20))
    assert time_to_reach(c, 0.12) == 20  # reached exactly
    assert time_to_reach(c, 0.11) == 20  # the dip at 30 s does not matter: the first crossing counts
    assert time_to_reach(c, 0.2) == 40
    assert time_to_reach(c, 0.21) is None  # never reached
    assert time_to_reach(tuple(reversed(c)), 0.11) == 20  # epoch order, not list order
    assert time_to_reach((), 0.1) is None


def arm(name: str, pts: tuple[Point, ...], final: float, size: int = 640) -> ArmResult:
    return ArmResult(
        name,
        size,
        16,
        len(pts),
        100.0,
        pts[-1].seconds if pts else 0.0,
        1.0,
        "completed",
        curve=pts,
        final=(Score(size, final * 1.5, final),),
    )


def comp(*arms: ArmResult) -> Comparison:
    stats = fake_stats()
    return Comparison(
        1200.0,
        640,
        (416, 640),
        0,
        "yolo26n",
        "0",
        "/tmp/x",
        "t0",
        "t1",
        0.0,
        snapshot((80,)),
        DatasetSummary.of(stats),
        arms,
    )


def test_time_to_accuracy_from_recorded_curves():
    base = arm("defaults", curve((300, 0.1), (700, 0.25), (1000, 0.30), (1190, 0.29)), final=0.30)
    fast = arm("plan", curve((100, 0.15), (250, 0.26), (380, 0.31), (600, 0.35)), final=0.35)
    slow = arm("plan-no-rect", curve((200, 0.1), (900, 0.2)), final=0.2)
    c = comp(base, fast, slow)
    tta = c.time_to_accuracy("plan")
    assert (tta.target, tta.seconds, tta.baseline_seconds, tta.ratio) == (0.30, 380, 1000, 0.38)
    assert "plan reached the baseline's mAP50-95 0.300 (at 640 px) in 38% of the time" in tta.line
    never = c.time_to_accuracy("plan-no-rect")
    assert never.seconds is None
    assert "did not reach the baseline's mAP50-95 0.300" in never.line
    assert "its best was 0.200" in never.line
    nothing = arm("defaults", curve((10, 0.0)), final=0.0)
    ahead = comp(nothing, fast).time_to_accuracy("plan")  # the baseline learned nothing, the plan did
    assert (ahead.target, ahead.seconds, ahead.ratio) == (0.0, None, None)
    assert "nothing measurable learned in this budget" in ahead.line
    assert "plan first measured above 0 at 100 s and its final weights score 0.350: plan is ahead" in ahead.line
    zero = comp(nothing, arm("plan", curve((10, 0.0)), final=0.0)).time_to_accuracy("plan")
    assert "no accuracy to compare" in zero.line
    tiny = comp(arm("defaults", curve((10, 0.0), (20, 0.00042)), final=0.00042), fast).time_to_accuracy("plan")
    assert "reached the baseline's mAP50-95 0.00042 (at 640 px) in 500% of the time" in tiny.line
    assert "needs the defaults arm" in comp(fast).time_to_accuracy("plan").line


def test_a_comparison_round_trips_and_draws(tmp_path):
    base = arm("defaults", curve((300, 0.1), (1000, 0.30)), final=0.30)
    c = dataclasses.replace(comp(base, arm("plan", curve((100, 0.15), (380, 0.31)), final=0.31)), run_dir=str(tmp_path))
    c.to_json(tmp_path / comparison.JSON_NAME)
    back = Comparison.from_json(tmp_path)
    assert back == c
    doc = json.loads((tmp_path / comparison.JSON_NAME).read_text())
    assert doc["time_to_accuracy"][0]["ratio"] == 0.38
    assert doc["arms"][0]["curve"][1] == {"epoch": 2, "seconds": 1000, "mAP50": 0.0, "mAP50-95": 0.30}
    png = c.save_png(tmp_path / "c.png")
    assert png.stat().st_size > 10_000


def test_arms_change_one_thing_each():
    hw, stats = snapshot((24,)), fake_stats()
    plan = planner.plan(hw, stats, planner.Overrides(finetune="yes"))
    timed = planner.plan(hw, stats, planner.Overrides(time="20m"))
    in_phases = planner.plan(hw, stats, planner.Overrides(finetune="yes", time="20m", phases="auto"))
    classic_plan = planner.plan(hw, stats, planner.Overrides(finetune="yes", recipe="classic"))
    d = ultra.defaults()
    arms = {a.name: a for a in comparison.arms_for(plan, comparison.ARMS, d, 640, timed, classic_plan, in_phases)}
    base = arms["defaults"].stages[0]
    assert (base.imgsz, base.batch, base.optimizer, base.rect, base.patience, base.cache, base.workers) == (
        d["imgsz"],
        d["batch"],
        d["optimizer"],
        d["rect"],
        d["patience"],
        False,
        d["workers"],
    )
    phased = arms["plan-phases"].stages[0]  # the plan for the arms' budget in phases
    assert phased.schedule is not None
    assert [p.imgsz for p in phased.schedule.phases] == [320, 416, 640]
    assert dataclasses.replace(phased, name="main") == in_phases.stages[0]
    # as `train --time` plans it: the main stage for 70 % of the budget, then the 640-px fine-tune
    budgeted, then = arms["plan"].stages
    assert dataclasses.replace(budgeted, name="main") == timed.stages[0]
    assert then == timed.stages[1]
    assert arms["plan"].shares == pytest.approx((0.7, 0.3))
    assert (budgeted.imgsz, budgeted.schedule, then.imgsz, then.when) == (416, None, 640, "always")
    assert dict(budgeted.extra)["time"] == pytest.approx(0.7 / 3, abs=1e-5)
    (one_size,) = arms["plan-one-size"].stages  # the same main stage, for the whole budget
    assert (one_size, arms["plan-one-size"].shares) == (budgeted, (1.0,))
    main = dataclasses.replace(plan.stages[0], name="train", when="always")  # the plan's main stage, one size
    assert dataclasses.replace(budgeted, extra=main.extra) == main
    assert arms["plan-no-rect"].stages[0] == main
    assert dataclasses.replace(arms["plan-rect"].stages[0], rect=False) == main
    classic = arms["plan-classic"].stages[0]
    assert (classic.optimizer, classic.lr0, classic.rect, classic.patience) == ("Adam", 0.001, True, 10)
    assert dataclasses.replace(classic, optimizer="auto", lr0=main.lr0, rect=False, patience=main.patience) == main
    assert arms["plan-640"].stages[0].imgsz == 640
    assert arms["plan-640"].stages[0].lr0 == main.lr0  # the main stage's recipe, at 640
    assert [s.imgsz for s in arms["plan+finetune"].stages] == [416, 640]
    assert sum(arms["plan+finetune"].shares) == pytest.approx(1.0)
    assert not arms["defaults"].prepared
    assert all(a.prepared for n, a in arms.items() if n != "defaults")


def test_the_defaults_arm_is_ultralytics_default_yaml_for_every_stage_field_ultralytics_has():
    plan = planner.plan(snapshot((24,)), fake_stats(), planner.Overrides(finetune="yes"))
    d = ultra.defaults()
    stage = comparison.defaults_stage(d, 640, plan.stages[0])
    for f in dataclasses.fields(stage):
        if f.name in d and f.name not in ("name", "device", "imgsz", "cache"):
            assert getattr(stage, f.name) == d[f.name], f.name
    assert (stage.cache, stage.threads, stage.pipeline, stage.schedule) == (False, None, "ultralytics", None)


def test_a_longer_baseline_sets_the_target_and_the_equal_time_line_sits_beside_it():
    base = arm("defaults", curve((300, 0.1), (1000, 0.30), (2000, 0.36), (3500, 0.40)), final=0.40)
    plan = arm("plan", curve((200, 0.2), (700, 0.33), (1150, 0.41)), final=0.41)
    c = dataclasses.replace(comp(base, plan), baseline_budget_s=3600.0)
    tta = c.time_to_accuracy("plan")
    assert (tta.target, tta.seconds, tta.baseline_seconds) == (0.40, 1150, 3500)
    equal = c.equal_budget("plan")
    assert equal is not None
    assert (equal.target, equal.seconds, equal.baseline_seconds) == (0.30, 700, 1000)  # their best in 1200 s
    assert "in their first 1200 s was 0.300" in equal.line
    assert "(70% of the time)" in equal.line
    assert comp(base, plan).equal_budget("plan") is None  # equal budgets: the headline is the equal-time figure


def test_cli_refuses_a_bad_budget_or_arm_in_one_line(tmp_path):
    for args, message in ((["--budget", "soon"], "--budget 'soon'"), (["--arms", "plan,best"], "unknown arm 'best'")):
        result = CliRunner().invoke(app, ["compare", "--project", str(tmp_path), *args])
        assert result.exit_code == 2
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.slow
def test_two_arms_on_real_images_for_twenty_seconds_each(make_dataset, tmp_path):
    import torch

    root = make_dataset(16, 4)
    before, env, threads = tree_hash(root), dict(os.environ), torch.get_num_threads()
    c = speedtrain.compare(
        root,
        budget="20s",
        baseline_budget="20s",
        arms="defaults,plan",
        imgsz=64,
        baseline_imgsz=64,
        finetune_imgsz=96,
        device="cpu",
        project=tmp_path / "runs",
        verbose=False,
        hooks=speedtrain.Hooks(log=lambda _: None),
    )
    assert [a.name for a in c.arms] == ["defaults", "plan"]
    for a in c.arms:
        assert a.epochs_done >= 1
        assert a.images_per_s
        assert a.images_per_s > 0
        assert len(a.curve) == min(a.epochs_done, comparison.MAX_CURVE_POINTS)
        seconds = [p.seconds for p in a.curve]
        assert seconds == sorted(seconds)
        assert 0 < seconds[-1] <= a.wall_s
        assert [s.imgsz for s in a.final] == [64]
        # the network as its arm ends: the defaults at 64, the plan after its fine-tune (the last 30 %) at 96
        assert dict(a.latency_ms).keys() == ({64, 640} if a.name == "defaults" else {96, 640})
        assert a.wall_s < 20 + 30  # the budget, plus setup and the last epoch's overrun
        assert not list((Path(c.run_dir) / a.name).glob("*/weights/epoch*.pt"))  # deleted once scored
    tta = c.time_to_accuracy("plan")
    base = c.arm("defaults")
    assert base is not None
    assert tta.target == base.final[0].map50_95
    if tta.target:  # from scratch at 64 px this is usually 0: then the line says there is nothing to compare
        assert tta.seconds == time_to_reach(c.arms[1].curve, tta.target)
    else:
        learned = c.arms[1].final[0].map50_95 > 0
        assert ("nothing measurable learned" if learned else "no accuracy to compare") in tta.line
    run_dir = Path(c.run_dir)
    assert Comparison.from_json(run_dir) == c
    assert (run_dir / comparison.PNG_NAME).stat().st_size > 10_000
    assert (run_dir / "ultralytics.log").stat().st_size > 0
    assert tree_hash(root) == before
    assert dict(os.environ) == env
    assert torch.get_num_threads() == threads  # Ultralytics' validator sets its own; the call puts them back


@pytest.mark.parametrize(("n", "k", "expected"), [(3, 30, [0, 1, 2]), (37, 30, 30), (100, 30, 30), (0, 30, [])])
def test_curve_points_are_spread_evenly_with_both_ends(n, k, expected):
    picked = comparison.spread(n, k)
    if isinstance(expected, list):
        assert picked == expected
    else:
        assert len(picked) == expected
        assert (picked[0], picked[-1]) == (0, n - 1)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stop_ends_the_comparison_after_the_epoch_promptly_and_keeps_what_finished(make_dataset, tmp_path, sig, code):
    """Ctrl-C, or SIGTERM as a scheduler sends it: the running epoch is saved, then the comparison ends at once (no
    minutes of validating the stopped arm), says what stopped it and keeps compare.json."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import wait_for

    root, project = make_dataset(16, 4), tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "speedtrain",
        "compare",
        "--dataset",
        str(root),
        "--budget",
        "120s",
        "--img-size",
        "64",
        "--baseline-img-size",
        "64",
        "--finetune-img-size",
        "96",
        "--device",
        "cpu",
        "--project",
        str(project),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    saved = project / "compare" / "defaults" / "train" / "weights" / "last.pt"
    assert wait_for(lambda: saved.exists() or proc.poll() is not None, timeout=180)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(getattr(signal, sig))
    t0 = time.monotonic()
    output, _ = proc.communicate(timeout=180)
    assert time.monotonic() - t0 < 60  # an epoch at 64 px, its checkpoint, and no validation of the stopped arm
    assert proc.returncode == code, output[-3000:]
    assert ("interrupted by SIGTERM" in output) is (sig == "SIGTERM")
    c = Comparison.from_json(project / "compare")
    assert c.requested == ("defaults", "plan")
    assert [a.name for a in c.arms] == ["defaults"]  # the plan arm never started
    assert c.arms[0].status == "interrupted"
    assert c.arms[0].epochs_done >= 1
    assert c.interrupted
    assert "keeps the arms that finished" in " ".join(output.split())  # a log wraps at 80 columns


def test_the_table_fits_80_columns_in_a_log_file():
    import io

    from speedtrain.cli import _Console

    c = comp(
        arm("defaults", curve((300, 0.1), (1000, 0.30)), final=0.30),
        arm("plan+finetune", curve((100, 0.15), (380, 0.31)), final=0.31),
    )
    out = io.StringIO()
    _Console(file=out, width=80).print(c)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert all(ord(ch) < 128 for ch in text)
    assert "plan+finetune" in text  # the arm's name is never cut
    assert "38% of the time" in " ".join(text.split())


@pytest.mark.slow
def test_the_640_and_finetune_arms_on_real_images(make_dataset, tmp_path):
    c = speedtrain.compare(
        make_dataset(16, 4),
        budget="12s",
        arms="plan-640,plan+finetune",
        imgsz=64,
        baseline_imgsz=64,
        finetune_imgsz=96,
        device="cpu",
        project=tmp_path / "runs",
        verbose=False,
        hooks=speedtrain.Hooks(log=lambda _: None),
    )
    at_640, two = c.arm("plan-640"), c.arm("plan+finetune")
    assert at_640 is not None
    assert two is not None
    assert at_640.imgsz == 96  # the fine-tune's size (--finetune-img-size), with the main stage's recipe
    assert [s.imgsz for s in at_640.final] == [64, 96]
    epochs = [p.epoch for p in two.curve]
    assert epochs == sorted(set(epochs))  # the fine-tune's epochs go on from the main stage's
    seconds = [p.seconds for p in two.curve]
    assert seconds == sorted(seconds)
    assert epochs[-1] == two.epochs_done
    assert (Path(c.run_dir) / "plan+finetune" / "finetune" / "weights" / "best.pt").is_file()
    assert "needs the defaults arm" in c.time_to_accuracy("plan+finetune").line


def test_the_time_to_accuracy_table_merges_runs(tmp_path):
    """benchmarks/time_to_accuracy.py: two compare runs (the second without a defaults arm) read as one table."""
    import subprocess
    import sys

    base = arm("defaults", curve((300, 0.1), (1000, 0.30)), final=0.30)
    first = dataclasses.replace(comp(base, arm("plan", curve((100, 0.15), (380, 0.31)), final=0.31)), seed=0)
    second = dataclasses.replace(comp(arm("plan", curve((150, 0.12), (500, 0.33)), final=0.33)), seed=1)
    for name, c in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        c.to_json(tmp_path / name / comparison.JSON_NAME)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_accuracy.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "a"), str(tmp_path / "b" / "compare.json")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| arm", "| defaults", "| plan", "| plan (x, seed 1)"]
    assert "380 s (0.38x the defaults' 1000 s)" in rows[2]  # reached 0.30 at 380 s; the defaults at 1000 s
    assert "500 s (0.50x the defaults' 1000 s)" in rows[3]  # the second run's arm against the first's target
    assert "0.330" in rows[3]
    assert "Target: the defaults' final mAP50-95 at 640 px (0.300)" in out


@pytest.mark.parametrize(
    ("wall", "maps", "says"),
    [
        (1150.0, (0.1, 0.2), "ended by the time budget"),
        (700.0, (0.3,) + (0.2,) * 10, "no improvement for 10 epochs (patience)"),  # best at epoch 1, then 10 more
        (700.0, (0.1, 0.2), "Ultralytics' time= fitted 2 epochs"),  # a slow first epoch: not patience
    ],
)
def test_why_an_arm_ended_before_its_planned_epochs(wall, maps, says):
    stage = dataclasses.replace(planner.plan(snapshot(()), fake_stats()).stage("main"), patience=10)
    result = StageResult("train", "early-stopped", 416, 16, 50, len(maps), wall_time_s=wall, epoch_map50_95=maps)
    assert says in comparison._why_it_ended([result], stage, 1200.0)


@pytest.mark.parametrize(
    ("epochs", "limits"),
    [
        ([20], [20]),
        ([51], [30]),
        ([36, 15], [21, 9]),  # an arm's main stage and fine-tune share the arm's 30 points
        ([20, 10], [20, 10]),
        ([100, 1], [29, 1]),  # every stage keeps its last epoch
        ([200, 3], [29, 1]),
        ([10, 10, 10, 10], [8, 8, 7, 7]),
    ],
)
def test_an_arms_curve_validates_at_most_30_epochs_shared_by_its_stages(epochs, limits):
    got = comparison.curve_limits(epochs, comparison.MAX_CURVE_POINTS)
    assert got == limits
    assert sum(got) == min(sum(epochs), comparison.MAX_CURVE_POINTS)
    for n, k in zip(epochs, got, strict=True):  # the epochs picked: k of n, evenly spaced, the last always
        picked = spread(n, k)
        assert len(picked) == k
        assert picked[-1] == n - 1
