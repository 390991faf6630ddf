"""A stage's folder as Ultralytics leaves it: results.csv's curves and the epochs it validated."""

from __future__ import annotations

import dataclasses

from speedtrain import checkpoints


def test_epoch_curves_read_ultralytics_results_csv(tmp_path):
    # the header and number format of ultralytics/engine/trainer.py save_metrics (8.4.190)
    head = (
        "epoch,time,train/box_loss,train/cls_loss,train/dfl_loss,metrics/precision(B),metrics/recall(B),"
        "metrics/mAP50(B),metrics/mAP50-95(B),val/box_loss,val/cls_loss,val/dfl_loss,lr/pg0,lr/pg1,"
        "lr/pg2"
    )
    rows = [
        "1,61.2,1.5,3.0,1.4,0.5,0.4,0.3,0.131,1.4,2.0,1.3,0.001,0.001,0.001",
        "2,122.9,1.25,2.5,1.25,0.6,0.5,0.4,0.2,1.3,1.9,1.2,0.001,0.001,0.001",
        "3,180.0,nan,2.5,1.25,0.6,0.5,0.4,nan,1.3,1.9,1.2,0.001,0.001,0.001",
        "4,240.0,1.2,2.4,1.2,nan,nan,nan,nan,nan,nan,nan,0.001,0.001,0.001",  # not validated (--val-every)
        "5,300.0,1.1,2.3,1.1,0.6,0.5,0.45,0.25,1.3,1.9,1.2,0.001,0.001,0.001",
    ]
    (tmp_path / "results.csv").write_text("\n".join([head, *rows]) + "\n")
    assert checkpoints.epoch_curves(tmp_path / "results.csv") == ((0.131, 0.2, 0.25), (5.9, 5.0, 4.5), (1, 2, 5))
    assert checkpoints.epoch_curves(tmp_path / "missing.csv") == ((), (), ())
    assert checkpoints.validated_epochs((1, 2, 5)) == (1, 2, 5)
    assert checkpoints.validated_epochs((1, 2, 3)) == ()  # every epoch: nothing to number


def test_a_time_fitted_stage_that_trained_past_its_saved_fit_is_finished_with_the_epochs_it_trained(tmp_path):
    """Ultralytics' time= saves the checkpoint before it refits the epochs, so the last checkpoint of a run can hold
    fewer fitted epochs (here 2) than it trained (3): the stage is finished and its note counts what was trained."""
    import torch

    from speedtrain.knobs import Stage

    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save({"epoch": 2, "model": torch.nn.Linear(1, 1), "train_args": {"epochs": 2}}, weights / "last.pt")
    torch.save({"epoch": -1, "model": torch.nn.Linear(1, 1)}, weights / "best.pt")
    head = "epoch,time,train/box_loss,train/cls_loss,train/dfl_loss,metrics/mAP50-95(B)"
    rows = [f"{n},{n * 10.0},1.0,1.0,1.0,0.{n}" for n in (1, 2, 3)]
    (tmp_path / "results.csv").write_text("\n".join([head, *rows]) + "\n")
    stage = Stage(
        "main", 64, 50, 8, (), 0, False, "auto", 0.01, False, 0, True, 10, False, "cpu", extra=(("time", 0.01),)
    )
    done = checkpoints.finished_before(stage, tmp_path, weights / "last.pt", None)
    assert done is not None
    assert done.epochs_done == 3
    assert done.note.startswith("had trained all 3 epochs before it stopped")
    assert done.weights == str(weights / "best.pt")
    untimed = dataclasses.replace(stage, extra=())  # without time= the plan's 50 epochs are the target: not finished
    assert checkpoints.finished_before(untimed, tmp_path, weights / "last.pt", None) is None
