"""speedtrain tune: the decision over fake probe tables, and real probes on CPU through the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import fake_stats, snapshot
from typer.testing import CliRunner

from speedtrain import planner, tuner
from speedtrain.cli import app
from speedtrain.knobs import Overrides
from speedtrain.records import LoaderProbe, StepProbe

RAM = Overrides(cache="ram")  # the loader probes below are written for a RAM-cached plan
STAGE = planner.plan(snapshot((24,)), fake_stats(), RAM).stages[0]  # batch 48, 16 workers, RAM cache

STEPS = (
    StepProbe(16, 400.0, 3.0),
    StepProbe(32, 700.0, 5.5),
    StepProbe(48, 800.0, 8.0),
    StepProbe(64, None, None, True),
)


@pytest.mark.parametrize(
    ("loaders", "expected", "bound"),
    [
        # data-bound: 8 workers are within 5% of 16, so the fewer win; every batch ties on the loader's 340 img/s,
        # and the largest that fits (48) is kept: it amortises per-iteration costs the probe does not see
        (
            (LoaderProbe(4, False, 200.0, 2.0), LoaderProbe(8, False, 340.0, 3.0), LoaderProbe(16, False, 350.0, 5.0)),
            (48, 8, False),
            "data",
        ),
        # a RAM cache 3% faster than no cache is a tie: no cache holds less memory
        ((LoaderProbe(8, False, 1000.0, 3.0), LoaderProbe(8, "ram", 1030.0, 9.0)), (48, 8, False), "compute"),
        # a RAM cache that is clearly faster wins
        ((LoaderProbe(8, False, 500.0, 3.0), LoaderProbe(8, "ram", 900.0, 9.0)), (48, 8, "ram"), "compute"),
        # compute-bound: the largest batch that fits is fastest; the out-of-memory probe is never chosen
        ((LoaderProbe(2, "disk", 5000.0, 2.0),), (48, 2, "disk"), "compute"),
    ],
    ids=["data-bound-fewer-workers", "tie-less-memory", "ram-clearly-faster", "compute-bound"],
)
def test_decide(loaders, expected, bound):
    result = tuner.decide(STAGE, STEPS, loaders, fake_stats())
    assert (result.batch, result.workers, result.cache) == expected
    assert result.bound == bound
    assert result.predicted_images_per_s == pytest.approx(
        min(
            next(s.images_per_s for s in STEPS if s.batch == expected[0]),
            next(x.images_per_s for x in loaders if (x.workers, x.cache) == expected[1:]),
        )
    )


def test_zero_workers_load_and_step_in_turn():
    # 0 workers: one process loads, then steps: 1 / (1/400 + 1/400) = 200 img/s, not min(400, 400)
    cpu = replace(STAGE, device="cpu", batch=16)
    result = tuner.decide(cpu, (StepProbe(16, 400.0, None),), (LoaderProbe(0, False, 400.0, 1.0),), fake_stats())
    assert result.predicted_images_per_s == 200.0
    # a loader twice as fast is no longer a 5% tie: the RAM cache wins (1/(1/400+1/1600) = 320 vs 200)
    both = (LoaderProbe(0, False, 400.0, 1.0), LoaderProbe(0, "ram", 1600.0, 2.0))
    assert tuner.decide(cpu, (StepProbe(16, 400.0, None),), both, fake_stats()).cache == "ram"


def test_decide_explains_a_data_bound_run():
    loaders = (LoaderProbe(8, False, 200.0, 3.0),)
    result = tuner.decide(STAGE, STEPS, loaders, fake_stats(size=(1920, 1080)))
    assert result.bound == "data"
    assert result.bound_factor == 4.0  # the step at batch 48 runs 800 img/s, the loader 200
    assert result.diagnosis[0].startswith("data-bound: the model could train 4.0x faster")
    assert any("pre-resize" in d for d in result.diagnosis)  # 1920-px images, training at 416


def test_decide_multi_gpu_totals_and_nothing_measured():
    two = replace(STAGE, device="0,1", batch=96)
    result = tuner.decide(two, STEPS, (LoaderProbe(8, False, 5000.0, 3.0),), fake_stats())
    assert (result.batch, result.predicted_images_per_s) == (96, 1600.0)  # per-GPU 48 x 2 GPUs
    nothing = tuner.decide(STAGE, (StepProbe(8, None, None, True),), (), fake_stats())
    assert (nothing.batch, nothing.bound, nothing.predicted_images_per_s) == (48, "unknown", 0.0)


def test_fingerprint_changes_with_what_matters():
    hw, stats = snapshot((24,)), fake_stats()
    key = tuner.fingerprint(hw, stats, "yolo26n.yaml", 416, "0")
    assert key == tuner.fingerprint(hw, stats, "yolo26n.yaml", 416, "0")
    assert key != tuner.fingerprint(hw, stats, "yolo26s.yaml", 416, "0")
    assert key != tuner.fingerprint(hw, stats, "yolo26n.yaml", 640, "0")
    assert key != tuner.fingerprint(snapshot((80,)), stats, "yolo26n.yaml", 416, "0")
    assert key != tuner.fingerprint(hw, fake_stats(train=999), "yolo26n.yaml", 416, "0")


@pytest.mark.slow
def test_tune_on_cpu_measures_caches_and_retunes(make_dataset, tmp_path):
    root, project = make_dataset(16, 4), tmp_path / "runs"
    args = ["tune", "--dataset", str(root), "--img-size", "64", "--budget-s", "20", "--project", str(project), "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output[-2000:]
    result = json.loads(first.stdout)  # stdout is the JSON alone; Ultralytics' logs went to stderr
    assert result["plan_batch"] in [s["batch"] for s in result["steps"]]  # the plan's batch is always timed
    assert all(s["images_per_s"] > 0 for s in result["steps"])
    loaders = {(x["workers"], x["cache"]) for x in result["loaders"]}
    assert (result["plan_workers"], result["plan_cache"]) in loaders  # the plan's own, always measured first
    assert {w for w, _ in loaders} == {0}  # CPU training uses 0 workers
    assert all(x["images_per_s"] > 0 for x in result["loaders"])
    assert result["predicted_images_per_s"] > 0
    assert result["achieved_images_per_s"] > 0  # confirmed by a short real run
    # never worse than the plan: either the plan's own configuration, or one whose real run was at least as fast
    assert result["plan_achieved_images_per_s"] > 0
    assert result["kept_plan"] or result["achieved_images_per_s"] >= result["plan_achieved_images_per_s"]
    assert result["bound"] in ("data", "compute")
    assert result["elapsed_s"] < 20 + 30  # probes within the budget; the confirm run comes on top
    again = json.loads(CliRunner().invoke(app, args).stdout)
    assert again["cached"] is True
    assert again["fingerprint"] == result["fingerprint"]
    fresh = json.loads(CliRunner().invoke(app, [*args, "--retune"]).stdout)
    assert fresh["cached"] is False


@pytest.mark.slow
def test_train_autotune_uses_the_measured_configuration(make_dataset, tmp_path):
    root, project = make_dataset(8, 2), tmp_path / "runs"
    args = ["train", "--dataset", str(root), "--img-size", "64", "--epochs", "1", "--finetune", "no", "--prepare", "no"]
    result = CliRunner().invoke(
        app, [*args, "--autotune", "--budget-s", "15", "--project", str(project), "plots=False"]
    )
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((project / "train" / "speed_report.json").read_text())
    main, tuned = doc["stages"][0], doc["tune"]
    assert (main["batch"], main["workers"], main["cache"]) == (tuned["batch"], tuned["workers"], tuned["cache"])
    assert "measured by speedtrain tune" in doc["reasons"]["batch"]
    assert main["measured"]["batch"] == tuned["batch"]
    assert "Tune" in result.output


CPU_STAGE = planner.plan(snapshot((), ram=24, cores=2, physical=2), fake_stats(), RAM).stages[
    0
]  # batch 16, 0 workers, ram


@pytest.mark.parametrize(
    ("step8", "step16", "err", "expected_batch", "kept"),
    [
        # batch 8 looks 2% faster, but each step rate is only known to +-2%: the margin is 2 x sqrt(2) x 2% = 5.7%,
        # so the plan's batch 16 is kept
        (102.0, 100.0, 0.02, 16, True),
        # the same 2% with a steady machine (+-0.2%: margin 0.57%) is real: batch 8 wins
        (102.0, 100.0, 0.002, 8, False),
        # 20% faster beats a noisy +-2% measurement
        (120.0, 100.0, 0.02, 8, False),
        # the plan's batch measured fastest: kept, nothing to beat it
        (90.0, 100.0, 0.02, 16, True),
    ],
    ids=["2pct-within-noise", "2pct-beyond-noise", "20pct-beyond-noise", "plan-fastest"],
)
def test_the_plan_is_kept_unless_beaten_beyond_the_noise(step8, step16, err, expected_batch, kept):
    steps = (StepProbe(8, step8, None, rel_err=err), StepProbe(16, step16, None, rel_err=err))
    # a loader 100x faster than the step, known to +-0.1%: the step's noise decides
    loaders = (LoaderProbe(0, "ram", 10000.0, 1.0, rel_err=0.001),)
    result = tuner.decide(CPU_STAGE, steps, loaders, fake_stats())
    assert (result.batch, result.kept_plan) == (expected_batch, kept)
    assert (result.plan_batch, result.plan_workers, result.plan_cache) == (16, 0, "ram")
    assert result.diagnosis[0].startswith("kept the plan" if kept else "beats the plan")
    if (step8, err) == (102.0, 0.02):
        assert "within the measurement noise (+-6%)" in result.diagnosis[0]


def test_the_plan_is_always_measured_first(monkeypatch):
    """A budget that runs out after one probe still times the plan's own batch and loader configuration."""
    calls = []

    def fake_time_loader(stage, data_yaml, stats, workers, cache, on_gpu, deadline):
        calls.append((workers, cache))
        return LoaderProbe(workers, cache, 100.0, 1.0)

    monkeypatch.setattr(tuner, "_time_loader", fake_time_loader)
    hw = snapshot((24,), ram=64, cores=16)
    gpu_stage = planner.plan(hw, fake_stats(), RAM).stages[0]  # 16 workers, RAM cache
    tuner.probe_loaders(gpu_stage, "d.yaml", hw, fake_stats(), True, deadline=0.0, log=lambda _: None)
    assert calls == [(16, "ram")]


def test_a_slower_confirming_run_keeps_the_plan():
    steps = (StepProbe(8, 150.0, None, rel_err=0.001), StepProbe(16, 100.0, None, rel_err=0.001))
    loaders = (LoaderProbe(0, "ram", 10000.0, 1.0, rel_err=0.001),)
    predicted = tuner.decide(CPU_STAGE, steps, loaders, fake_stats())
    assert (predicted.batch, predicted.kept_plan) == (8, False)
    # the short real runs disagree with the prediction: batch 8 trains slower than the plan's 16
    rates = {8: 9.0, 16: 10.0}
    tried = []

    def fake_confirm(stage, batch, workers, cache):
        tried.append((batch, workers, cache))
        return rates[batch]

    result = tuner.confirm_against_plan(CPU_STAGE, predicted, fake_confirm, lambda _: None)
    assert tried == [(8, 0, "ram"), (16, 0, "ram")]
    assert (result.batch, result.workers, result.cache, result.kept_plan) == (16, 0, "ram", True)
    assert (result.achieved_images_per_s, result.plan_achieved_images_per_s) == (10.0, 10.0)
    assert result.diagnosis[0] == (
        "kept the plan: in a short real run the tuned configuration trained at 9.0 img/s, the plan's at 10.0 img/s"
    )
    # and when the real run agrees, the tuned configuration stays
    rates[8] = 12.0
    tried.clear()
    agreed = tuner.confirm_against_plan(CPU_STAGE, predicted, fake_confirm, lambda _: None)
    assert (agreed.batch, agreed.kept_plan, agreed.plan_achieved_images_per_s) == (8, False, 10.0)


def test_relative_error_of_repeated_timings():
    assert tuner.relative_error([1.0, 1.0, 1.0]) == 0.0
    assert tuner.relative_error([1.0]) == 0.0  # one sample has no spread to measure
    # stdev 0.1 of mean 1.0 over 4 samples: 0.1 / 1.0 / 2 = 5%
    assert tuner.relative_error([0.9, 1.1, 0.9, 1.1]) == pytest.approx(0.0577, abs=1e-3)


@pytest.mark.parametrize(("fast_rate", "chosen"), [(900.0, "fast"), (500.0, "ultralytics")], ids=["faster", "slower"])
def test_the_fast_pipeline_is_chosen_only_when_measured_faster(fast_rate, chosen):
    """A data-bound GPU run: tune times the fast pipeline in the same short run, and the plan switches to it only
    when it trained faster there (the rates are what the fake confirming runs report)."""
    hw = snapshot((80,), ram=64, cores=16)
    plan = planner.plan(hw, fake_stats())
    stage = plan.stages[0]
    steps = (StepProbe(48, 2000.0, 8.0, rel_err=0.01),)
    loaders = (LoaderProbe(16, "ram", 700.0, 9.0, rel_err=0.01),)  # the loader is the bottleneck: data-bound
    result = tuner.decide(stage, steps, loaders, fake_stats())
    assert result.bound == "data"
    result = replace(result, achieved_images_per_s=680.0)
    tried = []

    def fake_confirm(st, batch, workers, cache):
        tried.append(st.pipeline)
        return fast_rate

    result = tuner.confirm_fast_pipeline(stage, result, fake_confirm, lambda _: None)
    assert tried == ["fast"]
    assert result.fast_achieved_images_per_s == fast_rate
    faster = tuner.fast_pipeline_faster(result)
    tuned = planner.apply_tuned(
        plan, result.batch, result.workers, result.cache, "why", fast_measured_faster=faster, pipeline_auto=True
    )
    assert tuned.stages[0].pipeline == chosen
    assert ("chosen" if chosen == "fast" else "not chosen") in result.diagnosis[-1]
    if chosen == "fast":
        assert tuned.stages[0].rect is False
        assert "measured it faster" in tuned.reason("pipeline")
