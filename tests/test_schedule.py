"""The budget planner: phases and their shares, one learning-rate curve continuous at every boundary and near zero
at the deadline, the deadline met within one epoch, odd budgets. Pure: a simulated clock, no training."""

from __future__ import annotations

import pytest

from speedtrain import planner, schedule
from speedtrain.schedule import (
    CLOSE_MOSAIC_SHARE,
    WARMUP_SHARE,
    Deadline,
    Phase,
    Schedule,
    lowest_size,
    plan_schedule,
    simulate,
)

# seconds per training image by size on the 2-vCPU VM (ppe-large, yolov8n, batch 16): pixels set the pace
CPU_PACE = {320: 0.05, 416: 0.085, 480: 0.11, 512: 0.13, 640: 0.2}


@pytest.mark.parametrize(
    ("final", "small_box_px", "first", "sizes"),
    [
        (640, None, None, (320, 416, 640)),  # no boxes known: half the final size
        (640, 19.0, None, (320, 416, 640)),  # ppe-large and Aquarium: 10th percentile ~19 px at 640, 9.5 at 320
        (640, 12.0, None, (448, 640)),  # 12 px at 640 would be 6 at 320: the lowest size keeps 8 px (427 -> 448)
        (640, 5.0, None, (640,)),  # tiny boxes: no lower phase keeps them; one phase at the final size
        (640, 40.0, None, (320, 416, 640)),  # large boxes: never below half the final size
        (1280, 30.0, None, (640, 1280)),  # a 1280 model: half of it, no 416 between
        (640, 19.0, 512, (512, 640)),  # --img-size: the first phase's size
        (640, 19.0, 640, (640,)),  # --img-size at the final size: one phase
        (416, 19.0, None, (224, 416)),  # --finetune no: the phases end at the main size
    ],
)
def test_the_phases_rise_to_the_final_size_from_the_lowest_the_boxes_allow(final, small_box_px, first, sizes):
    schedule, why = plan_schedule(1200, final, first, small_box_px, pretrained=True)
    assert tuple(p.imgsz for p in schedule.phases) == sizes
    assert sum(p.share for p in schedule.phases) == pytest.approx(1.0)
    assert all(a.imgsz < b.imgsz for a, b in zip(schedule.phases, schedule.phases[1:], strict=False))
    assert schedule.final_imgsz == final
    assert why.startswith(str(sizes[0]))


def test_the_lowest_size_says_what_the_small_boxes_become():
    size, why = lowest_size(640, 12.0)
    assert size == 448
    assert "12 px at 640" in why
    assert "6 px" in why  # what half size would have left of them


def test_the_warmup_is_short_from_pretrained_weights_and_longer_from_scratch():
    pretrained, _ = plan_schedule(1200, 640, None, 19.0, pretrained=True)
    scratch, _ = plan_schedule(1200, 640, None, 19.0, pretrained=False)
    assert pretrained.warmup == WARMUP_SHARE[True] < scratch.warmup == WARMUP_SHARE[False]


def test_the_planned_curve_warms_up_to_its_peak_then_falls_to_zero_at_the_deadline():
    schedule, _ = plan_schedule(1200, 640, None, 19.0, pretrained=True)
    assert schedule.lr(0.0) == 0.0
    assert schedule.lr(schedule.warmup) == pytest.approx(1.0)
    assert schedule.lr(1.0) == 0.0
    rows = schedule.rows()
    assert [r[0] for r in rows] == [320, 416, 640]
    for (_, _, _, end), (_, _, start, _) in zip(rows, rows[1:], strict=False):
        assert end == start  # the curve goes on across each phase boundary


def _ppe_run(budget: float = 1200, val_s: float = 20.0, pace: dict[int, float] | None = None) -> Deadline:
    schedule, _ = plan_schedule(budget, 640, None, 19.0, pretrained=True)
    return simulate(schedule, pace or CPU_PACE, images=1000, val_s=val_s, val_images=200)


def test_the_learning_rate_is_continuous_at_every_epoch_and_phase_boundary():
    run = _ppe_run()
    for before, after in zip(run.log, run.log[1:], strict=False):
        assert after["lr_start"] == pytest.approx(before["lr_end"], abs=1e-4)
    sizes = [e["imgsz"] for e in run.log]
    assert sizes == sorted(sizes)  # phases only rise
    assert set(sizes) == {320, 416, 640}


def test_the_run_ends_at_the_deadline_within_one_epoch_with_the_learning_rate_near_zero():
    run = _ppe_run()
    last = run.log[-1]
    assert run.stopped
    assert last["lr_end"] < 0.01  # "near zero": at the deadline the curve is at 0
    assert last["validated"]
    assert not any(e["validated"] for e in run.log[:-1])
    one_epoch_640 = 1000 * CPU_PACE[640]
    finish = last["end_s"] + 20.0  # the final validation, held in reserve
    assert 1200 - one_epoch_640 <= finish <= 1200 + 1e-6


def test_each_phase_gets_about_its_share_of_the_budget():
    run = _ppe_run(budget=3600)
    spent: dict[int, float] = {}
    for e in run.log:
        spent[e["imgsz"]] = spent.get(e["imgsz"], 0.0) + e["end_s"] - e["start_s"]
    total = sum(spent.values())
    for phase in run.schedule.phases:
        epoch = 1000 * CPU_PACE[phase.imgsz]
        assert abs(spent[phase.imgsz] - phase.share * total) <= epoch  # switched at the nearest epoch end


def test_mosaic_closes_for_the_budgets_last_share():
    run = _ppe_run(budget=3600)
    closed = [e for e in run.log if not e["mosaic"]]
    assert closed
    assert closed[0]["start_s"] >= run.end - CLOSE_MOSAIC_SHARE * 3600 - 1000 * CPU_PACE[640] / 2
    assert all(not e["mosaic"] for e in run.log[run.log.index(closed[0]) :])


def test_a_budget_shorter_than_one_epoch_stops_inside_it_and_says_so():
    schedule, _ = plan_schedule(60, 640, None, 19.0, pretrained=True)
    run = simulate(schedule, CPU_PACE, images=1000)  # an epoch at 320 takes 50 s... of 1000 images: 50 s
    slow = Deadline(schedule, images=4000)
    slow.measured(320, 200.0, 4000)
    assert "shorter than one epoch at 320 px" in slow.fits()
    assert "later phases do not run" in slow.fits()
    assert len(run.log) >= 1
    assert run.log[-1]["end_s"] <= 60 + 1e-6


def test_a_budget_of_hours_trains_every_phase_and_ends_on_time():
    run = _ppe_run(budget=10 * 3600)
    assert len(run.log) > 300
    assert {e["imgsz"] for e in run.log} == {320, 416, 640}
    assert run.log[-1]["end_s"] <= 10 * 3600
    assert run.log[-1]["lr_end"] < 0.01


def test_a_pace_unlike_pixels_still_meets_the_deadline():
    """The 640 phase slower than pixels predict (a GPU whose loader sets the pace): measured, the end holds."""
    pace = {320: 0.05, 416: 0.07, 640: 0.3}
    run = _ppe_run(pace=pace)
    step = 1000 * 0.3 / 20  # the simulated clock stops between batches of 1/20 epoch, as training between batches
    assert 1200 - 1000 * 0.3 <= run.log[-1]["end_s"] + 20.0 <= 1200 + step


def test_moving_the_end_keeps_the_curve_continuous():
    schedule = Schedule(1000.0, (Phase(320, 0.5), Phase(640, 0.5)), 0.05, 0.1)
    dl = Deadline(schedule)
    before = dl.lr(400.0)
    dl.move_end(400.0, 900.0)
    assert dl.lr(400.0) == pytest.approx(before)
    assert dl.lr(900.0) == 0.0
    assert dl.lr(650.0) == pytest.approx(before / 2)


def test_the_state_goes_round_a_resume():
    run = _ppe_run()
    again = Deadline.from_state(run.state())
    assert again.schedule == run.schedule
    assert again.phase == run.phase
    assert again.closed == run.closed
    assert again.end == pytest.approx(run.end)
    assert again.lr(700.0) == pytest.approx(run.lr(700.0))
    assert again.log == run.log


@pytest.mark.parametrize(
    ("train_s", "val_s", "epochs", "expected"),
    [
        (100.0, 10.0, 50, 1),  # 9 % of an epoch: every epoch
        (98.0 - 28.0, 28.0, 50, 3),  # the 448/127-image split measured on the VM: 29 % -> 11.8 % at every 3rd
        (30.0, 760.0, 50, 10),  # validation 25x training (ultralytics #17523): capped at 10
        (30.0, 760.0, 8, 2),  # a short stage is still validated every quarter
        (0.0, 5.0, 50, 1),  # nothing measured: every epoch
    ],
)
def test_auto_cadence_keeps_validation_under_its_share(train_s, val_s, epochs, expected):
    k = schedule.val_every_for(train_s, val_s, epochs)
    assert k == expected
    if 1 < k < min(schedule.VAL_EVERY_MAX, epochs // 4):  # not capped: the smallest k that meets the share
        assert val_s / (k * train_s + val_s) <= schedule.VAL_SHARE < val_s / ((k - 1) * train_s + val_s)


def test_the_cadence_validates_every_kth_and_the_last_epochs_and_auto_the_first():
    cadence = schedule.Cadence(every=3)
    assert [e for e in range(1, 11) if cadence.validates(e, 10)] == [3, 6, 9, 10]
    auto = schedule.Cadence(every=planner.VAL_AUTO)
    assert all(auto.validates(e, 10) for e in range(1, 11))  # until it has measured
    auto.decided = 4
    assert [e for e in range(1, 11) if auto.validates(e, 10)] == [1, 4, 8, 9, 10]


def test_the_cadence_decides_auto_from_the_first_validation_and_counts_patience_in_validated_epochs():
    cadence = schedule.Cadence(every=planner.VAL_AUTO, patience=5)
    assert cadence.trained(1, 70.0, 50)  # auto validates the first epoch to measure it
    assert cadence.validated(1, 28.0, 50) == 5 * 3  # 28 s against 70 s: every 3rd; patience 5 validated = 15 epochs
    assert cadence.cadence == 3
    assert not cadence.trained(2, 70.0, 50)
    assert cadence.validated(2, None, 50) == 0  # not validated: skipped, patience left as it is
    assert cadence.counted(2)  # Ultralytics' final validation fires the event again: nothing recorded twice
    assert cadence.counted(3)  # not trained in this process (an earlier run's): nothing to record
    assert cadence.trained(3, 70.0, 50)
    assert not cadence.counted(3)
    assert cadence.skipped == [2]
    assert cadence.saved_s() == 28.0  # one skipped validation at the measured 28 s (estimate)
    every = schedule.Cadence(every=1, patience=5)
    assert every.trained(1, 70.0, 50)
    assert every.validated(1, 28.0, 50) == 0  # every epoch: Ultralytics' own patience is already in epochs
