"""Which memory ran out (oom.py's predicate, from torch's own messages), the plan's batch chain, and real CPU
trainings with a CUDA out-of-memory raised inside Ultralytics: what only Ultralytics shows (its own halving turned
off, the final validation told from an epoch's). Every recovery path in milliseconds: test_recovery.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CUDA_OOM

from speedtrain import oom, workflow
from speedtrain.knobs import Overrides


def _cpu_plan(root: Path, **kw):
    ov = Overrides(imgsz=64, epochs=1, finetune="no", prepare="no", **kw)
    return workflow.make_plan(root, ov, ["plots=False", "val=False"])


def _chained() -> RuntimeError:
    try:
        try:
            raise torch.OutOfMemoryError(CUDA_OOM)
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("validation failed") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (torch.OutOfMemoryError(CUDA_OOM), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"), True),
        (RuntimeError("GET was unable to find an engine to execute this computation"), True),
        # cuDNN's catch-all when its workspace cannot be allocated (Ultralytics' own retry counts it as memory)
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), True),
        (MemoryError(), True),
        (_chained(), True),  # an OOM wrapped by whatever caught it first
        (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"), False),
        (ValueError("out of memory"), False),  # not a runtime error: a bug, not memory
        (RuntimeError("shape mismatch"), False),
    ],
)
def test_is_oom(exc, expected):
    assert oom.is_oom(exc) is expected


# torch's own messages (torch/utils/data/dataloader.py, _utils/signal_handling.py and ExceptionWrapper, 2.x)
BUS_ERROR = (
    "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's workers are out "
    "of shared memory. Please try to raise your shared memory limit."
)


OOM_KILLED = "DataLoader worker (pid 4243) is killed by signal: Killed. "


WORKER_MEMORY = "Caught MemoryError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"


@pytest.mark.parametrize(
    ("exc", "on_gpu", "kind"),
    [
        (torch.OutOfMemoryError(CUDA_OOM), True, "device"),
        (RuntimeError(BUS_ERROR), True, "shm"),
        (RuntimeError(OOM_KILLED), True, "host"),  # the kernel's OOM killer took a worker: host RAM
        (MemoryError(WORKER_MEMORY), True, "host"),
        (MemoryError(WORKER_MEMORY), False, "host"),
        # in the GPU run's own process a MemoryError is host RAM too; on CPU the batch itself lives there
        (MemoryError(), True, "host"),
        (MemoryError(), False, "device"),
        (RuntimeError("shape mismatch"), True, None),
    ],
)
def test_which_memory_ran_out(exc, on_gpu, kind):
    assert oom.memory_kind(exc, on_gpu) == kind


@pytest.mark.parametrize(
    ("chain", "current", "expected"),
    [((32, 16, 8), 48, 32), ((32, 16, 8), 32, 16), ((32, 16, 8), 8, None), ((), 16, None), ((16, 8), 24, 16)],
)
def test_next_batch(chain, current, expected):
    assert oom.next_batch(chain, current) == expected


@pytest.mark.slow
def test_oom_walks_the_plans_batch_chain(make_dataset, tmp_path, fake_cuda_oom):
    tried = fake_cuda_oom.tried
    planned = _cpu_plan(make_dataset(8, 2), batch=16)
    assert planned.plan.stage("main").batch_fallbacks == (8, 4)
    rep, path = workflow.execute(planned, tmp_path / "runs")
    doc = rep.to_dict()
    assert tried == [16, 8, 4]
    main = doc["stages"][0]["measured"]
    assert [(o["from_batch"], o["to_batch"]) for o in main["oom_fallbacks"]] == [(16, 8), (8, 4)]
    assert "CUDA out of memory" in main["oom_fallbacks"][0]["error"]
    assert main["batch"] == 4
    assert Path(main["weights"]).is_file()


@pytest.mark.slow
def test_oom_in_the_final_validation_keeps_the_run(make_dataset, tmp_path, monkeypatch):
    """Ultralytics validates best.pt once more after the last epoch, at twice the batch: an OOM there must not
    lose a finished training. speedtrain validates the saved weights again with smaller batches."""
    from conftest import CUDA_OOM
    from ultralytics.models.yolo.detect import DetectionValidator

    original = DetectionValidator.preprocess
    sizes = []

    def preprocess(self, batch):
        if not self.training:  # the final validation (and speedtrain's own re-validation)
            sizes.append(self.args.batch)
            if self.args.batch > 4:
                raise torch.OutOfMemoryError(CUDA_OOM)
        return original(self, batch)

    monkeypatch.setattr(DetectionValidator, "preprocess", preprocess)
    planned = _cpu_plan(make_dataset(8, 2), batch=8)
    doc = workflow.execute(planned, tmp_path / "runs")[0].to_dict()
    main = doc["stages"][0]
    assert main["status"] == "completed"
    # Ultralytics' final validation, then speedtrain's at 8 and 4; then best.pt's score at 640 at the stage's batch
    # (out of memory here too: said in the log, not fatal, and the report has no 640-px figure)
    assert sizes == [8, 8, 4, 8]
    assert "640" not in main["measured"]["scores"]
    assert main["measured"]["oom_fallbacks"] == []  # training itself never stepped down
    assert "mAP50-95" in main["measured"]["best_metrics"]
    assert Path(main["measured"]["weights"]).is_file()
    assert "validated again at batch 4" in main["note"]
