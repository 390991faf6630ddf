"""The Ultralytics boundary: one module touches Ultralytics, and every internal it reaches still exists.

If one of these fails after an Ultralytics upgrade, the message names what moved; speedtrain.ultra was written
against 8.4.190 and works back to 8.4.172 (the range in pyproject.toml; CI runs these tests at both ends).
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from speedtrain import schedule, ultra
from speedtrain.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
WRITTEN_AGAINST = "8.4.190"


def moved(what: str) -> str:
    import ultralytics

    return (
        f"Ultralytics {ultralytics.__version__} moved {what}; speedtrain/ultra.py reads it as in {WRITTEN_AGAINST}: "
        "update ultra.py and the range in pyproject.toml together"
    )


def test_only_the_boundary_module_imports_ultralytics():
    pattern = re.compile(r"^\s*(import ultralytics|from ultralytics)", re.MULTILINE)
    touching = sorted(p.name for p in (REPO / "speedtrain").glob("*.py") if pattern.search(p.read_text()))
    assert touching == ["ultra.py"]


def test_importing_speedtrain_does_not_import_ultralytics_or_torch():
    code = "import sys, speedtrain; print('ultralytics' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


def test_the_declared_range_is_the_checked_one_and_holds_the_installed_version():
    import ultralytics

    from speedtrain import ultra_args

    declared = re.search(r'"ultralytics>=([\d.]+),<([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert declared, "pyproject.toml declares a range for ultralytics"
    assert declared.groups() == (ultra_args.LOWEST, ultra_args.BELOW)
    assert ultra_args.NEWEST_TESTED == WRITTEN_AGAINST
    assert ultra_args.check_version() == ultralytics.__version__


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("8.4.172", True),
        ("8.4.190", True),
        ("8.4.999", True),
        ("8.4.171", False),
        ("8.3.250", False),
        ("8.5.0", False),
        ("9.0.1", False),
        ("8.4.180.dev0", True),
    ],
)
def test_an_ultralytics_outside_the_range_is_one_line(version, ok):
    from speedtrain import ultra_args
    from speedtrain.errors import UsageError

    if ok:
        assert ultra_args.check_version(version) == version
        return
    with pytest.raises(UsageError) as err:
        ultra_args.check_version(version)
    assert str(err.value) == (
        f"Ultralytics {version} is installed; speedtrain works with ultralytics>=8.4.172,<8.5: "
        "pip install 'ultralytics>=8.4.172,<8.5'"
    )


def test_every_internal_reach_is_where_ultra_expects_it():
    from ultralytics.data import build_dataloader
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import DEFAULT_CFG_DICT, LOGGER, WEIGHTS_DIR, loss
    from ultralytics.utils.downloads import GITHUB_ASSETS_STEMS
    from ultralytics.utils.events import events

    assert "_oom_retries" in inspect.getsource(BaseTrainer._do_train), moved("the trainer's own OOM retry counter")
    refit = "self.epochs = self.args.epochs = math.ceil(self.args.time * 3600 / mean_epoch_time)"
    assert refit in inspect.getsource(BaseTrainer._do_train), moved("time= refitting the epochs")
    assert callable(BaseTrainer._setup_scheduler), moved("BaseTrainer._setup_scheduler")
    # a RAM cache fills while the datasets are built: between these two events (allocator.fill_start, fill_end)
    assert 'run_callbacks("on_pretrain_routine_start")' in inspect.getsource(BaseTrainer.__init__), moved("init")
    setup_train = inspect.getsource(BaseTrainer._setup_train)
    built, ended = setup_train.find("self._build_train_pipeline()"), setup_train.find("on_pretrain_routine_end")
    assert 0 <= built < ended, moved("the datasets built before on_pretrain_routine_end")
    assert "self.get_dataloader(" in inspect.getsource(BaseTrainer._build_train_pipeline), moved("the loaders")
    assert hasattr(events, "enabled"), moved("the analytics switch (utils/events.py events.enabled)")
    assert isinstance(WEIGHTS_DIR, Path), moved("WEIGHTS_DIR")
    assert "yolo26n" in GITHUB_ASSETS_STEMS, moved("GITHUB_ASSETS_STEMS")
    assert "autodownload" in inspect.signature(check_det_dataset).parameters, moved("check_det_dataset(autodownload)")
    assert {"dataset", "batch", "workers", "shuffle", "rank"} <= set(inspect.signature(build_dataloader).parameters)
    assert {"batch", "imgsz", "cache", "workers", "rect", "fraction"} <= set(DEFAULT_CFG_DICT), moved("default.yaml")
    assert list(inspect.signature(DetectionTrainer.get_dataloader).parameters)[1:] == [
        "dataset_path",
        "batch_size",
        "rank",
        "mode",
    ], moved("DetectionTrainer.get_dataloader's arguments")
    assert "preprocess_batch" in vars(DetectionTrainer), moved("DetectionTrainer.preprocess_batch")
    assert "model.args" in inspect.getsource(loss.v8DetectionLoss.__init__), moved("v8DetectionLoss reading model.args")
    assert any(type(h).__name__ == "StreamHandler" for h in LOGGER.handlers), moved("LOGGER's console handler")
    # RankTrainer: one rank of a torchrun group
    init = inspect.getsource(BaseTrainer.__init__)
    assert "self.ddp = world_size > 1 and LOCAL_RANK == -1" in init, moved("BaseTrainer's ddp and world_size")
    assert "self._setup_ddp()" in inspect.getsource(BaseTrainer._do_train), moved("_do_train calling _setup_ddp")
    setup = inspect.getsource(BaseTrainer._setup_train)
    assert "nn.parallel.DistributedDataParallel(" in setup, moved("_setup_train's DDP wrap through trainer.nn")
    assert "device_ids=[self.device.index]" in setup, moved("the DDP wrap's device_ids")
    assert "self.validator(model=model)" in inspect.getsource(BaseTrainer.final_eval), moved("final_eval")
    import ultralytics.engine.trainer as trainer_module

    assert trainer_module.nn is __import__("torch").nn, moved("engine/trainer.py importing torch's nn as nn")
    # Phases: a budgeted run's phases inside one Ultralytics run
    train = inspect.getsource(BaseTrainer._do_train)
    assert train.index('run_callbacks("on_train_batch_start")') < train.index("# Warmup"), moved("batch start")
    assert "ni <= nw" in train or "ni < nw" in train, moved("the warmup gated by its iterations")
    no_warmup = types.SimpleNamespace(args=types.SimpleNamespace(warmup_epochs=0.0), epochs=50)
    assert BaseTrainer._get_warmup_iterations(no_warmup, 100) <= 0, moved("warmup_epochs=0 skipping the warmup")
    assert "if self.stop:\n                    break" in train, moved("the stop between batches")
    assert "self.args.val or final_epoch" in train, moved("args.val deciding the epoch's validation")
    assert "final_epoch = epoch + 1 >= self.epochs" in train, moved("trainer.epochs deciding the final epoch")
    assert "not self.args.close_mosaic" in train, moved("close_mosaic=0 leaving mosaic alone")
    assert "close_mosaic(hyp=copy(self.args))" in inspect.getsource(BaseTrainer._close_dataloader_mosaic)
    from ultralytics.data.base import BaseDataset
    from ultralytics.data.dataset import YOLODataset

    load = inspect.getsource(BaseDataset.load_image)
    assert "self.imgsz" in load, moved("load_image resizing to dataset.imgsz")
    assert "self.buffer.append(i)" in load, moved("load_image's buffer of recent images")
    assert {"cache_images", "build_transforms"} <= set(vars(BaseDataset)), moved("BaseDataset's cache and transforms")
    assert "close_mosaic" in vars(YOLODataset), moved("YOLODataset.close_mosaic")
    assert "build_dataset" in vars(DetectionTrainer), moved("DetectionTrainer.build_dataset (the train size hook)")


def test_fast_trainer_is_a_plain_class_importable_by_name():
    from speedtrain import ultra

    cls = ultra.FastDetectionTrainer
    assert (cls.__module__, cls.__qualname__) == ("speedtrain.ultra", "FastDetectionTrainer")
    assert pickle.loads(pickle.dumps(cls)) is cls  # what Ultralytics' DDP relaunch needs


def test_session_restores_environment_and_analytics(monkeypatch):
    from ultralytics.utils.events import events

    from speedtrain import ultra

    monkeypatch.delenv("YOLO_OFFLINE", raising=False)
    monkeypatch.setattr(events, "enabled", True)
    with ultra.session():
        assert events.enabled is False
        ultra.go_offline()
        assert os.environ["YOLO_OFFLINE"] == "1"
    assert "YOLO_OFFLINE" not in os.environ
    assert events.enabled is True
    monkeypatch.setenv("YOLO_OFFLINE", "0")
    with ultra.session():
        ultra.go_offline()
    assert os.environ["YOLO_OFFLINE"] == "0"


def test_metrics_dict_reads_both_shapes():
    from speedtrain import ultra

    class Metrics:
        results_dict = {"metrics/mAP50-95(B)": 0.25}

    assert ultra.metrics_dict(Metrics()) == {"metrics/mAP50-95(B)": 0.25}
    assert ultra.metrics_dict({"metrics/mAP50-95(B)": 0.5}) == {"metrics/mAP50-95(B)": 0.5}  # DDP's plain dict
    assert ultra.metrics_dict(None) == {}


@pytest.mark.parametrize("name", ["yolo26n", "yolo26n.pt"])
def test_resolve_model_offline_builds_from_the_yaml(name):
    from speedtrain import ultra

    source, note = ultra.resolve_model(name, online=False)
    assert source == "yolo26n.yaml"
    assert "no pretraining" in note


def test_what_ultralytics_would_install_at_run_time_is_a_declared_dependency():
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from ultralytics.utils import dist

    wanted = re.search(r'check_requirements\("([^"]+)"\)', inspect.getsource(dist))
    assert wanted, moved("the DDP launch's run-time requirement (utils/dist.py)")
    req = Requirement(wanted.group(1))
    assert f'"{req}"' in (REPO / "pyproject.toml").read_text()  # declared, so pip installs it with speedtrain
    assert req.specifier.contains(version(req.name))  # and installed: Ultralytics finds it and never calls pip


@pytest.mark.parametrize(
    ("images", "epochs", "classes"),
    [(1000, 50, 4), (1000, 50, 80), (64_001, 10, 4)],  # AdamW at two class counts; over 10,000 iterations: MuSGD
)
def test_the_planners_auto_optimizer_is_what_ultralytics_builds(images, epochs, classes):
    """planner.auto_optimizer mirrors BaseTrainer.build_optimizer(name="auto") (engine/trainer.py, 8.4.190): the
    plan names auto's choice for the fine-tune and shows it in the plan, so the two must agree."""
    import math
    import types

    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.nn.tasks import DetectionModel

    from speedtrain import planner

    batch = 16
    iterations = math.ceil(images / max(batch, planner.NBS)) * epochs  # as BaseTrainer._setup_train computes it
    args = types.SimpleNamespace(lr0=0.01, optimizer="auto", warmup_bias_lr=0.1)
    trainer = types.SimpleNamespace(data={"nc": classes}, args=args)
    model = DetectionModel("yolov8n.yaml", nc=classes, verbose=False)
    built = BaseTrainer.build_optimizer(trainer, model, name="auto", iterations=iterations)
    name, lr = planner.auto_optimizer(images, batch, epochs, classes)
    assert (type(built).__name__, args.optimizer, args.lr0) == (name, name, lr), moved("optimizer=auto's rule")
    assert args.warmup_bias_lr == 0.0, moved("optimizer=auto's bias warmup")
    assert {g["lr"] for g in built.param_groups} <= {lr, lr * 3}  # MuSGD boosts the head's rate


def test_the_argument_table_read_without_importing_ultralytics_is_its_own():
    """speedtrain.ultra_args reads cfg/default.yaml as a file (argument errors come before torch is imported):
    it must be the table Ultralytics itself loads."""
    from ultralytics.utils import DEFAULT_CFG_DICT

    from speedtrain import ultra_args

    assert ultra_args.defaults() == dict(DEFAULT_CFG_DICT), moved("cfg/default.yaml")


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _Dataset:
    """What Phases touches of Ultralytics' training set (data/base.py, data/dataset.py 8.4.190)."""

    def __init__(self, imgsz: int) -> None:
        self.imgsz, self.ni, self.cache, self.buffer = imgsz, 8, None, [1, 2]
        self.ims = self.im_hw0 = self.im_hw = [object()] * self.ni
        self.transforms, self.built, self.closed = None, [], False

    def build_transforms(self, hyp: object) -> str:
        self.built.append((self.imgsz, getattr(hyp, "mosaic", None)))
        return f"transforms at {self.imgsz}"

    def close_mosaic(self, hyp: object) -> None:
        self.closed = True
        self.transforms = self.build_transforms(types.SimpleNamespace(mosaic=0.0))

    def __len__(self) -> int:
        return self.ni


class _Loader:
    def __init__(self, dataset: _Dataset, batches: int) -> None:
        self.dataset, self.batches, self.resets = dataset, batches, 0

    def reset(self) -> None:
        self.resets += 1

    def __len__(self) -> int:
        return self.batches


def _trainer(imgsz: int) -> types.SimpleNamespace:
    groups = [{"initial_lr": 0.01, "lr": 0.0}, {"initial_lr": 0.01, "lr": 0.0}]
    trainer = types.SimpleNamespace(
        epoch=0,
        epochs=50,
        stop=False,
        metrics={"metrics/mAP50-95(B)": 0.1},
        fitness=0.1,
        batch_size=4,
        world_size=1,
        args=types.SimpleNamespace(val=True, epochs=50, imgsz=640, mosaic=1.0),
        optimizer=types.SimpleNamespace(param_groups=groups),
        test_loader=_Loader(_Dataset(640), 2),
    )
    trainer.train_loader = _Loader(_Dataset(imgsz), 2)
    trainer._close_dataloader_mosaic = lambda: trainer.train_loader.dataset.close_mosaic(trainer.args)
    return trainer


def test_phases_follow_the_deadline_batch_by_batch_in_a_fake_trainer(monkeypatch, tmp_path):
    """ultra.Phases on a trainer that behaves like Ultralytics' (its callbacks in _do_train's order): the first
    phase's size reaches the dataset build, the learning rate is set before every batch from the curve, the size
    switches at the phase boundary (transforms rebuilt, loader restarted), mosaic closes in the tail, only the
    epoch at the deadline is validated, and the run stops between batches at the deadline."""
    from speedtrain import schedule, ultra

    clock = _Clock()
    monkeypatch.setattr(ultra.time, "perf_counter", clock)
    plan = schedule.Schedule(100.0, (schedule.Phase(320, 0.5), schedule.Phase(640, 0.5)), 0.05, 0.1)
    phases = ultra.Phases(schedule.Deadline(plan), tmp_path / "phases.json")
    trainer = _trainer(640)
    phases._before_setup(trainer)
    assert trainer.train_imgsz == 320  # RankTrainer.build_dataset reads it
    trainer.train_loader.dataset.imgsz = 320  # as build_dataset made it
    phases._train_start(trainer)
    seen, lrs = [], []
    for epoch in range(100):
        trainer.epoch = epoch
        phases._epoch_start(trainer)
        seen.append(trainer.train_loader.dataset.imgsz)
        for _ in range(len(trainer.train_loader)):
            phases._batch_start(trainer)
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
            clock.t += 5.0  # each batch: 5 s at 320, as at any size here
            phases._batch_end(trainer)
            if trainer.stop:
                break
        phases._epoch_end(trainer)
        phases._fit_epoch_end(trainer)
        phases._save(trainer)
        if trainer.stop:
            break
    assert trainer.stop
    assert seen == sorted(seen)
    assert set(seen) == {320, 640}
    assert trainer.train_loader.resets >= 2  # the size switch and the mosaic close each restart the loader
    assert trainer.train_loader.dataset.closed  # mosaic off in the budget's tail
    assert max(lrs) == pytest.approx(0.01, rel=0.1)  # the peak: initial_lr x 1
    assert lrs[-1] < 0.01 * 0.05  # annealed at the deadline
    assert trainer.args.val is True  # the deadline's epoch is validated ...
    log = json.loads((tmp_path / "phases.json").read_text())["log"]
    assert [e["validated"] for e in log].count(True) == 1  # ... and only it
    assert log[-1]["end_s"] <= 100.0 + 5.0  # within a batch of the deadline
    assert trainer.epochs == trainer.args.epochs == log[-1]["epoch"]  # Ultralytics sees it as the final epoch


def test_model_offline_falls_back_to_yaml_and_says_so():
    source, note = ultra.resolve_model("yolo26n", online=False)
    assert source == "yolo26n.yaml"
    assert "offline" in note
    assert "yolo26n.yaml" in note


def test_model_online_lets_ultralytics_fetch():
    source, note = ultra.resolve_model("yolo26n", online=True)
    assert source == "yolo26n.pt"
    assert "fetched by Ultralytics" in note


def test_local_pt_is_preferred(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "yolo26n.pt").write_bytes(b"weights")
    source, note = ultra.resolve_model("yolo26n", online=False)
    assert source == "yolo26n.pt"
    assert "pretrained weights" in note


def test_model_yaml_and_unknown_models():
    assert ultra.resolve_model("yolo26s.yaml")[0] == "yolo26s.yaml"
    with pytest.raises(UsageError, match="no such file"):
        ultra.resolve_model("weights/missing.pt")


def test_an_epoch_the_cadence_skips_has_no_metrics_and_no_fitness_so_best_pt_keeps_the_validated_one():
    """internal: Ultralytics (8.4.190) writes best.pt when best_fitness == fitness; an epoch it does not validate
    keeps the previous fitness, so with val=False best.pt would follow the latest weights. The cadence clears it."""
    from types import SimpleNamespace

    cadence = ultra.ValCadence(schedule.Cadence(every=3))
    metrics = {"metrics/mAP50-95(B)": 0.4, "val/box_loss": 1.2}
    trainer = SimpleNamespace(epoch=3, epochs=10, args=SimpleNamespace(val=True), metrics=dict(metrics), fitness=0.4)
    cadence._epoch_start(trainer)
    cadence._epoch_end(trainer)  # epoch 4: not validated
    assert trainer.args.val is False
    assert trainer.fitness is None
    assert all(v != v for v in trainer.metrics.values())  # NaN in results.csv
    cadence._fit_epoch_end(trainer)
    assert cadence.policy.skipped == [4]
    trainer.epoch, trainer.metrics, trainer.fitness = 5, dict(metrics), 0.5  # epoch 6: validated
    cadence._epoch_start(trainer)
    cadence._epoch_end(trainer)
    assert trainer.args.val is True
    assert trainer.fitness == 0.5  # left for Ultralytics' validation to set
