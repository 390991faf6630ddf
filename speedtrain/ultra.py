"""The one place speedtrain touches Ultralytics: every import of it, every argument it is called with, every
internal it reaches into.

Ultralytics is held to a tested range (`ultralytics>=8.4.172,<8.5` in pyproject.toml, checked at startup by
ultra_args.check_version) because of the reaches marked "internal" below: each names the file it was read from in
8.4.190, and `tests/test_ultra.py`, which CI runs at both ends of the range, fails with a clear message when an
upgrade moves one. Everything else here is Ultralytics' public API (YOLO(), model.train/val,
callbacks, DetectionTrainer's documented hooks).

Importing this module imports Ultralytics (and torch: about 2 s). Other modules import it inside the functions
that train, tune or validate, so that `speedtrain probe` and `speedtrain plan` start quickly.

What the callbacks of `runner._Recorder` read from the trainer Ultralytics passes them (public attributes in
8.4.190, also checked by the test): epoch, epochs, train_loader, last, metrics, stop, batch_size, and the
validator's training flag.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from ultralytics import YOLO
from ultralytics.cfg import get_cfg
from ultralytics.data import build_dataloader, build_yolo_dataset
from ultralytics.data.utils import check_det_dataset
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import (
    DEFAULT_CFG,
    DEFAULT_CFG_DICT,
    LOCAL_RANK,
    LOGGER,
    RANK,
    WEIGHTS_DIR,
    WORLD_SIZE,
    is_online,
)
from ultralytics.utils.downloads import GITHUB_ASSETS_STEMS

from speedtrain import allocator, distributed
from speedtrain.checkpoints import RESUME_NAME
from speedtrain.errors import TrainingError, UsageError
from speedtrain.knobs import said
from speedtrain.pipeline import Hyp, StoreLoader, augment, build_store, keep_resident, take, to_ultralytics
from speedtrain.records import Log, OnProgress, StageProgress
from speedtrain.render import first_epoch_estimate
from speedtrain.schedule import Cadence, Deadline
from speedtrain.util import ANSI, PlainStream, duration, first_line, write_atomic

Callbacks = dict[str, list[Callable[[Any], None]]]
ULTRALYTICS_OOM_RETRIES = 3  # internal (engine/trainer.py _do_train): at 3, its own first-epoch batch halving is off


def defaults() -> dict[str, Any]:
    """Ultralytics' train arguments and their defaults (cfg/default.yaml)."""
    return dict(DEFAULT_CFG_DICT)


# --- models -------------------------------------------------------------------------------------------------------


def resolve_model(requested: str, online: bool | None = None) -> tuple[str, str]:
    """Return (what to pass to YOLO(), one line saying where it came from); never downloads by itself."""
    path = Path(requested)
    if path.suffix.lower() in (".yaml", ".yml"):
        return requested, f"model {requested}: built from scratch (no pretrained weights)"
    stem = path.stem if path.suffix.lower() == ".pt" else path.name
    # internal: WEIGHTS_DIR (utils/__init__.py) is where Ultralytics keeps downloaded weights; GITHUB_ASSETS_STEMS
    # (utils/downloads.py) the names it can download
    for candidate in (path.with_suffix(".pt"), WEIGHTS_DIR / f"{stem}.pt"):
        if candidate.is_file():
            return str(candidate), f"model {stem}: pretrained weights {candidate}"
    if stem not in GITHUB_ASSETS_STEMS:
        raise UsageError(f"{said('model', requested)}: no such file, and not an Ultralytics model name")
    if online is None:
        online = is_online()
    if online:
        return f"{stem}.pt", f"model {stem}: pretrained weights, fetched by Ultralytics"
    return (
        f"{stem}.yaml",
        f"model {stem}: offline and {stem}.pt not on disk, so built from {stem}.yaml (no pretraining)",
    )


def check_args(args: dict[str, Any]) -> None:
    """Ultralytics' own argument checks (get_cfg runs check_cfg: types, ranges such as 0-1 for mosaic), run before a
    run folder exists, so that `mosaic=2` is one line instead of a traceback from inside the first stage."""
    try:
        get_cfg(DEFAULT_CFG, overrides=dict(args))
    except (TypeError, ValueError, SyntaxError) as exc:  # what check_cfg and check_dict_alignment raise
        raise UsageError(f"Ultralytics refuses the arguments: {first_line(exc)}") from None


def check_loads(source: str) -> None:
    """Build the model once before the first stage: a broken checkpoint or yaml is one line, not a traceback."""
    try:
        YOLO(source)
    except Exception as exc:  # whatever Ultralytics raises for a file it cannot use
        raise TrainingError(f"{said('model', source)}: Ultralytics cannot load it ({first_line(exc)})") from None


def fetch(source: str, note: str) -> tuple[str, str]:
    """Download pretrained weights now (Ultralytics does it) when resolve_model asked for it; else the yaml."""
    if not source.endswith(".pt") or Path(source).is_file():
        return source, note
    try:
        YOLO(source)
    except Exception as exc:  # no network after all, or the download broke off
        stem = Path(source).stem
        return f"{stem}.yaml", f"model {stem}: download failed ({first_line(exc)}), so built from {stem}.yaml"
    return source, note


def step_model(source: str, device: Any) -> Any:
    """The bare detection model on `device`, in training mode, with the arguments its loss reads (tune's probe)."""
    model: Any = YOLO(source).model  # an nn.Module once built (Ultralytics types it loosely)
    model = model.to(device)
    model.args = get_cfg(DEFAULT_CFG)  # internal: v8DetectionLoss reads model.args (utils/loss.py)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --- datasets -----------------------------------------------------------------------------------------------------


def run_download_script(yaml_path: Path | None) -> None:
    """Let Ultralytics run a dataset yaml's download: entry (only ever on the user's explicit request)."""
    if yaml_path is None:
        raise TrainingError("no dataset yaml to take a download: script from")
    try:
        check_det_dataset(str(yaml_path), autodownload=True)
    except Exception as exc:  # whatever the script did, the scan that follows says what is still missing
        raise TrainingError(f"{yaml_path}: the download: script failed ({first_line(exc)})") from None


def train_loader(data_yaml: str | Path, args: dict[str, Any], batch: int, workers: int, rect: bool) -> Any:
    """Ultralytics' own training DataLoader (augmentation included) for `args` (train arguments), as training
    builds it (models/yolo/detect/train.py build_dataset + get_dataloader)."""
    data = check_det_dataset(str(data_yaml))
    cfg: Any = get_cfg(DEFAULT_CFG, overrides={k: v for k, v in args.items() if k in DEFAULT_CFG_DICT})
    dataset = build_yolo_dataset(cfg, data["train"], batch, data, mode="train", rect=rect, stride=32)
    return build_dataloader(dataset, batch, workers, shuffle=not rect, rank=-1, device="cpu")


# --- training -----------------------------------------------------------------------------------------------------


def train(
    weights: str,
    data_yaml: str | Path,
    args: dict[str, Any],
    callbacks: Callbacks,
    *,
    resume: Path | None = None,
    fast: bool = False,
) -> tuple[Any, Any]:
    """One model.train() call, a fresh start from `weights` or a resume from the checkpoint `resume`; return
    (the trainer, what model.train() returned). `fast` trains with FastDetectionTrainer."""
    model = YOLO(str(resume) if resume else weights)
    for event, functions in callbacks.items():
        for fn in functions:
            model.add_callback(event, fn)
    model.add_callback("on_train_epoch_start", _own_oom_policy_off)
    trainer = {"trainer": FastDetectionTrainer if fast else RankTrainer}
    try:
        if resume:  # Ultralytics keeps the checkpoint's arguments; only these may change on resume
            allowed = ("batch", "device", "workers", "cache", "patience", "plots", "val")
            kept = {k: args[k] for k in allowed if k in args}
            metrics = model.train(data=str(data_yaml), resume=str(resume), **trainer, **kept)
        else:
            metrics = model.train(data=str(data_yaml), **trainer, **args)
        return model.trainer, metrics
    finally:
        del model


def _own_oom_policy_off(trainer: Any) -> None:
    # Ultralytics halves the batch itself on a first-epoch OOM (engine/trainer.py _do_train, 8.4.190); speedtrain
    # walks the plan's own chain instead, so the batch sizes tried are the ones the plan printed. Internal.
    trainer._oom_retries = ULTRALYTICS_OOM_RETRIES


def latency_ms(weights: str | Path, imgsz: int, device: str, runs: int = 20, warmup: int = 3) -> float:
    """Inference latency of trained weights: the fused network's forward pass on one image of imgsz x imgsz, batch
    1, fp32 (Ultralytics' predict default), on `device`, after `warmup` passes; the median of `runs`, in ms.
    Pre- and post-processing (letterbox, NMS) are not included: they do not depend on how the model was trained."""

    dev = torch.device(f"cuda:{device.split(',')[0]}" if device[:1].isdigit() else device)
    model: Any = YOLO(str(weights)).model
    model = model.fuse(verbose=False).to(dev).eval()
    x = torch.zeros(1, 3, imgsz, imgsz, device=dev)
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            model(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    del model
    return round(statistics.median(times), 2)


def validate(weights: str | Path, data_yaml: str | Path, **args: Any) -> Any:
    """Ultralytics' validator on `weights` (model.val)."""
    return YOLO(str(weights)).val(data=str(data_yaml), **args)


def metrics_dict(metrics: Any) -> dict[str, float]:
    """The final validation's figures: a metrics object's results_dict, or (what model.train() returns after
    Ultralytics' multi-GPU run, engine/model.py 8.4.190) a plain dict."""
    raw = metrics if isinstance(metrics, dict) else getattr(metrics, "results_dict", None) or {}
    return {str(k): float(v) for k, v in raw.items()}


class RankTrainer(DetectionTrainer):
    """Ultralytics' DetectionTrainer, which also trains as one rank of a group that torchrun (or srun, Kubeflow, Ray)
    started: the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE) sets the world, not the --device list.

    As a single process (WORLD_SIZE unset or 1) it is DetectionTrainer unchanged. As a rank:
    - the world is WORLD_SIZE, across nodes (Ultralytics counts the devices in --device, this node's only, and would
      start its own DDP launcher when it finds more than one: internal, engine/trainer.py __init__ 8.4.190);
    - the process group is speedtrain's (distributed.join, already formed when training starts): NCCL on CUDA,
      gloo on CPU; the device is this rank's LOCAL_RANK-th entry of --device;
    - on a CPU the model is wrapped in DDP without device_ids, and best.pt's final validation runs through the
      distributed training-time validator (Ultralytics' own assumes a CUDA device on every DDP rank).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if WORLD_SIZE > 1:
            self.world_size = WORLD_SIZE  # internal: engine/trainer.py (8.4.190) reads world_size and ddp
            self.ddp = False  # this process is a rank already: never Ultralytics' own relaunch

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None) -> Any:
        """The training images at `train_imgsz` when a budgeted run's phase sets it (its first phase, or the phase a
        resumed run goes on in), so that they are loaded and cached at that size; validation stays at args.imgsz,
        the size the model is scored at. DetectionTrainer's documented hook."""
        size = getattr(self, "train_imgsz", None)
        if mode != "train" or not size:
            return super().build_dataset(img_path, mode, batch)
        args = self.args
        self.args = copy.copy(args)
        self.args.imgsz = size
        try:
            return super().build_dataset(img_path, mode, batch)
        finally:
            self.args = args

    def _setup_ddp(self) -> None:  # internal: engine/trainer.py _do_train calls it when world_size > 1
        self.device = distributed.rank_device(str(self.args.device))
        distributed.join(self.device)
        if self.device.type == "cuda":  # as Ultralytics' own _setup_ddp: the device backend of this rank's GPU
            from ultralytics.utils.torch_utils import get_torch_device_backend

            self.accelerator = get_torch_device_backend(self.device)

    def _setup_train(self) -> None:
        if self.device.type != "cpu" or self.world_size <= 1:
            return super()._setup_train()
        with _ddp_without_device_ids():
            return super()._setup_train()

    def final_eval(self) -> None:
        if self.device.type != "cpu" or self.world_size <= 1:
            return super().final_eval()
        # internal: engine/trainer.py final_eval (8.4.190) validates best.pt with validator(model=...), which on a
        # DDP rank builds the model on torch.device("cuda", current_device()) (engine/validator.py): on CPU ranks,
        # load best.pt's weights into the EMA and validate through the training-time path (sharded, gathered).
        from ultralytics.utils.torch_utils import strip_optimizer, torch_distributed_zero_first

        with torch_distributed_zero_first(LOCAL_RANK):
            if RANK == 0 and self.last.exists():
                ckpt = strip_optimizer(self.last)
                if self.best.exists():
                    strip_optimizer(self.best, updates={"train_results": ckpt.get("train_results")})
        if not self.best.exists():
            return
        weights = torch.load(self.best, map_location="cpu", weights_only=False)["model"].float().state_dict()
        ema: Any = self.ema  # built by _setup_train (Ultralytics types these attributes as None at first)
        validator: Any = self.validator
        ema.ema.load_state_dict(weights)
        metrics = validator(self)  # rank 0 gets the gathered figures, the other ranks None
        if metrics is not None:
            metrics.pop("fitness", None)
            self.metrics = metrics
        self.epoch += 1
        self.run_callbacks("on_fit_epoch_end")
        self.epoch -= 1


@contextlib.contextmanager
def _ddp_without_device_ids() -> Iterator[None]:
    """internal: engine/trainer.py _setup_train (8.4.190) wraps the model in DistributedDataParallel with
    device_ids=[device.index], which torch refuses for a CPU module; for the block, its `nn` drops them."""

    import ultralytics.engine.trainer as trainer_module

    real = trainer_module.nn

    def ddp(module: Any, device_ids: Any = None, **kwargs: Any) -> Any:
        return real.parallel.DistributedDataParallel(module, **kwargs)

    class _NN(types.ModuleType):
        parallel = types.SimpleNamespace(DistributedDataParallel=ddp)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    trainer_module.nn = _NN("nn")
    try:
        yield
    finally:
        trainer_module.nn = real


class FastDetectionTrainer(RankTrainer):
    """Ultralytics' DetectionTrainer with the training loader and batch augmentation of `--pipeline fast`.

    A plain top-level class, importable by name (`speedtrain.ultra.FastDetectionTrainer`).
    get_dataloader and preprocess_batch are DetectionTrainer's documented hooks.
    """

    def get_dataloader(self, dataset_path: Any, batch_size: int = 16, rank: int = 0, mode: str = "train") -> Any:
        if mode != "train":
            return super().get_dataloader(dataset_path, batch_size, rank, mode)  # validation stays Ultralytics'

        first = Path(dataset_path[0] if isinstance(dataset_path, list) else dataset_path)
        store = build_store(dataset_path, int(self.args.imgsz), first.parent.parent, self.args.workers or None)
        world = max(self.world_size, 1) if rank != -1 else 1
        resident = keep_resident(store, psutil.virtual_memory().available / 1024**3, world)
        LOGGER.info(
            f"speedtrain fast pipeline: {len(store)} images decoded at {store.imgsz} px in {store.folder} "
            f"({store.size_gb:.2f} GB, {'read into RAM' if resident else 'memory-mapped'}; reused while the "
            f"images and labels stay the same)"
        )
        self.fast_store, self.fast_hyp, self.fast_resident = store, Hyp.from_args(self.args), resident
        seed = int(self.args.seed) + max(RANK, 0)
        self.fast_dgen = torch.Generator(device=self.device).manual_seed(seed)  # augmentation, on the device
        return StoreLoader(
            store,
            batch_size,
            int(self.args.seed),
            self.fast_hyp,
            self.device,
            RANK if world > 1 else -1,
            world,
            resident,
        )

    def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "fast" not in batch:
            return super().preprocess_batch(batch)
        out = augment(take(batch), self.fast_hyp, self.fast_store.imgsz, self.fast_dgen)
        return to_ultralytics(out, [self.fast_store.files[i] for i in batch["chunk"]])


# --- validation cadence -------------------------------------------------------------------------------------------


@dataclass
class ValCadence:
    """schedule.Cadence applied to Ultralytics' trainer: Ultralytics validates after every epoch (or, with
    val=False, only the last); this validates the epochs the cadence picks and any Ultralytics validates on its
    own (one that could stop the run early: the stopper's possible_stop). Skipped epochs leave NaN metrics in
    results.csv and no fitness, so best.pt is chosen among validated epochs, and patience (counted in epochs by
    EarlyStopping) is the cadence's, counted in validated epochs.

    One process only: ranks would each decide (rank 0 alone knows possible_stop) and validation has collectives,
    so the planner keeps every epoch for several ranks.

    internal: engine/trainer.py _do_train (8.4.190) validates when `args.val or final_epoch or
    stopper.possible_stop or stop`, right after on_train_epoch_end; save_model writes best.pt when
    best_fitness == fitness; EarlyStopping ignores a None fitness (utils/torch_utils.py)."""

    policy: Cadence
    _start: float = 0.0
    _end: float = 0.0
    _val_t0: float = 0.0
    _val_took: float | None = None

    def callbacks(self) -> Callbacks:
        return {
            "on_train_epoch_start": [self._epoch_start],
            "on_train_epoch_end": [self._epoch_end],
            "on_fit_epoch_end": [self._fit_epoch_end],
            "on_val_start": [self._val_start],  # the trainer's callbacks are its validator's too
            "on_val_end": [self._val_end],
        }

    def _epoch_start(self, trainer: Any) -> None:
        self._start = time.perf_counter()
        self._val_took = None

    def _val_start(self, validator: Any) -> None:
        self._val_t0 = time.perf_counter()

    def _val_end(self, validator: Any) -> None:
        if validator.training:  # the epoch's validation, not final_eval's of best.pt
            self._val_took = time.perf_counter() - self._val_t0

    def _epoch_end(self, trainer: Any) -> None:
        self._end = time.perf_counter()
        validate = self.policy.trained(trainer.epoch + 1, self._end - self._start, trainer.epochs)
        trainer.args.val = validate
        if not validate:  # Ultralytics may still validate (possible_stop): then it overwrites both
            trainer.metrics = {k: float("nan") for k in (trainer.metrics or {})}
            trainer.fitness = None

    def _fit_epoch_end(self, trainer: Any) -> None:
        epoch = trainer.epoch + 1
        if self.policy.counted(epoch):
            return  # final_eval's own call, or an epoch already counted
        # the validation alone (checkpoints are written after every epoch, validated or not); the whole gap when
        # the validator's callbacks did not fire
        took = self._val_took if self._val_took is not None else time.perf_counter() - self._end
        patience = self.policy.validated(epoch, None if trainer.fitness is None else took, trainer.epochs)
        if patience:
            trainer.stopper.patience = patience


# --- a budgeted run's phases --------------------------------------------------------------------------------------


@dataclass
class Phases:
    """--time: follows a schedule.Deadline inside one Ultralytics run. Before every batch the learning rate of each
    parameter group is set from the deadline's curve (its `initial_lr` times the curve's factor); a batch that ends at
    the deadline stops the run there (Ultralytics validates and saves that epoch, then validates best.pt); after each
    epoch the deadline says whether to validate it (a phase's end, the last), the next epoch's image size and whether
    mosaic closes. A size change rebuilds the training set's transforms at the new size (and refills a RAM cache) and
    restarts the loader, as Ultralytics' own close_mosaic does. The state is written beside each checkpoint, so a
    resumed run goes on along the same curve.

    The clock is the training time since the first epoch began (rank 0's, broadcast after every batch when ranks
    train together), validation pauses included; a resumed run goes on from the time its checkpoint was saved at.

    internal (engine/trainer.py _do_train, 8.4.190): the warmup and the scheduler's step are left with nothing to do
    (warmup_epochs=0; the learning rate is set after them, before every batch), close_mosaic=0 leaves mosaic to the
    deadline, `trainer.stop` set in on_train_batch_end ends the epoch, `args.val` decides the validation,
    `trainer.epochs` (kept a step ahead) decides the final epoch; data/base.py: `imgsz`, `ims`, `buffer`, `cache`,
    `cache_images()`, `build_transforms(hyp)` and data/dataset.py `close_mosaic(hyp)` of the training set."""

    deadline: Deadline
    state_file: Path | None = None
    elapsed0: float = 0.0  # training time before this process (a resumed run's)
    collective: bool = False
    log: Log | None = None
    _t0: float = 0.0
    _epoch_t0: float = 0.0
    _batches: int = 0
    _cut: bool = False
    _closed: bool = False  # mosaic closed in this process's dataset
    _val_t0: float = 0.0
    _val_took: float | None = None
    _told: bool = False
    _last_t: float = 0.0
    _lr_start: float = 0.0
    _closed_at_start: bool = False

    def callbacks(self) -> Callbacks:
        return {
            "on_pretrain_routine_start": [self._before_setup],
            "on_train_start": [self._train_start],
            "on_train_epoch_start": [self._epoch_start],
            "on_train_batch_start": [self._batch_start],
            "on_train_batch_end": [self._batch_end],
            "on_train_epoch_end": [self._epoch_end],
            "on_val_start": [self._val_start],
            "on_val_end": [self._val_end],
            "on_fit_epoch_end": [self._fit_epoch_end],
            "on_model_save": [self._save],  # the Recorder runs it before its resume.pt copy
        }

    def now(self) -> float:
        t = self.elapsed0 + time.perf_counter() - self._t0
        return distributed.broadcast_float(t) if self.collective else t

    def _before_setup(self, trainer: Any) -> None:
        trainer.train_imgsz = self.deadline.imgsz  # RankTrainer.build_dataset loads the training images at it

    def _train_start(self, trainer: Any) -> None:
        self._t0 = time.perf_counter()
        self.deadline.images = len(trainer.train_loader.dataset)
        test = getattr(trainer, "test_loader", None)
        self.deadline.val_images = len(test.dataset) if test is not None else 0

    def _epoch_start(self, trainer: Any) -> None:
        dataset, changed = trainer.train_loader.dataset, False
        t = self.now()  # every rank, before any branch: on ranks, the clock is a collective each one must join
        if dataset.imgsz != self.deadline.imgsz:
            if self.log:
                phases, lr = len(self.deadline.schedule.phases), self.deadline.lr(t)
                self.log(
                    f"phase {self.deadline.phase + 1} of {phases}: {self.deadline.imgsz} px from epoch "
                    f"{trainer.epoch + 1} (learning rate x{lr:.2f} of its peak)"
                )
            _resize_training_set(trainer, self.deadline.imgsz, self._closed)
            changed = True
        if self.deadline.closed and not self._closed:
            trainer._close_dataloader_mosaic()  # internal: engine/trainer.py, the same call close_mosaic makes
            self._closed = changed = True
        if changed:
            trainer.train_loader.reset()
        self._epoch_t0, self._batches, self._cut = t, 0, False
        self._lr_start, self._closed_at_start = self.deadline.lr(self._epoch_t0), self._closed

    def _batch_start(self, trainer: Any) -> None:
        factor = self.deadline.lr(self.now())
        for group in trainer.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def _batch_end(self, trainer: Any) -> None:
        self._batches += 1
        t = self._last_t = self.now()
        if self.deadline.should_stop(t):
            trainer.stop = self._cut = True
        nb = len(trainer.train_loader)
        if not self._told and self.log and self._batches >= min(nb, max(ETA_BATCHES, nb // 10)):
            self._told = True
            images = self._batches * trainer.batch_size  # every rank's batches: the epoch counts them all
            self.deadline.measured(self.deadline.imgsz, t - self._epoch_t0, max(1, images))
            line = self.deadline.fits()
            if line:
                self.log(f"{line} (from the first {self._batches} batches)")

    def _epoch_end(self, trainer: Any) -> None:
        t, size = self.now(), self.deadline.imgsz
        images = len(trainer.train_loader.dataset)
        if self._cut:
            images = max(1, round(images * self._batches / max(1, len(trainer.train_loader))))
        self.deadline.measured(size, t - self._epoch_t0, images)
        lr_end = self.deadline.lr(t)
        step = self.deadline.epoch_end(t, trainer.epoch, self._cut)
        span, lrs = (self._epoch_t0, t), (self._lr_start, lr_end)
        self.deadline.record(trainer.epoch, size, span, lrs, step.validate, not self._closed_at_start)
        trainer.args.val = step.validate
        if not step.validate:  # as ValCadence: best.pt is chosen among validated epochs
            trainer.metrics = {k: float("nan") for k in (trainer.metrics or {})}
            trainer.fitness = None
        if step.stop:
            trainer.stop = True
            if self.log:
                budget = duration(self.deadline.schedule.budget_s)
                self.log(
                    f"deadline: training ends after epoch {trainer.epoch + 1} at {duration(t)} of {budget}; "
                    f"validating it at {trainer.args.imgsz} px"
                )
        trainer.epochs = trainer.args.epochs = step.epochs
        self._val_took = None

    def _val_start(self, validator: Any) -> None:
        self._val_t0 = time.perf_counter()

    def _val_end(self, validator: Any) -> None:
        if validator.training:
            self._val_took = time.perf_counter() - self._val_t0

    def _fit_epoch_end(self, trainer: Any) -> None:
        if self._val_took is not None and not self.deadline.stopped and not self.collective:
            # one process only: on ranks, rank 0 alone validates, and a clock it read alone would be a collective
            # the others never join (their deadline keeps the estimated reserve, the same on every rank)
            self.deadline.validated(self.now(), self._val_took)  # the final validation's time, kept in reserve
            self._val_took = None

    def _save(self, trainer: Any) -> None:
        if self.state_file is not None:
            state = self.deadline.state() | {"elapsed": round(self.now() if not self.collective else self._last_t, 3)}
            write_atomic(self.state_file, json.dumps(state, indent=1).encode())


def _cache_fill_start(trainer: Any) -> None:
    # The datasets (and a RAM cache) are built between on_pretrain_routine_start and _end (engine/trainer.py
    # _setup_train, 8.4.190): the allocator holds the cache once, not the cache and its packing copy.
    if trainer.args.cache in ("ram", True):
        allocator.fill_start()


def _cache_fill_end(trainer: Any) -> None:
    if trainer.args.cache in ("ram", True):
        allocator.fill_end()


def _resize_training_set(trainer: Any, imgsz: int, mosaic_closed: bool) -> None:
    """The training set at another image size: images loaded (and a RAM cache refilled) and transforms built at it.
    internal: data/base.py BaseDataset (8.4.190) resizes on load to `imgsz` and keeps recent images in `ims`."""
    dataset = trainer.train_loader.dataset
    dataset.imgsz = imgsz
    dataset.buffer.clear()
    dataset.ims, dataset.im_hw0, dataset.im_hw = [None] * dataset.ni, [None] * dataset.ni, [None] * dataset.ni
    if dataset.cache == "ram":
        allocator.fill_start()
        try:
            dataset.cache_images()
        finally:
            allocator.fill_end()
    hyp = copy.copy(trainer.args)
    if mosaic_closed:
        dataset.close_mosaic(hyp)  # zeroes mosaic, mixup, copy_paste and cutmix, then builds the transforms
    else:
        dataset.transforms = dataset.build_transforms(hyp=hyp)


def read_phase_state(path: Path) -> tuple[Deadline, float] | None:
    """A budgeted stage's saved state (the deadline and the training time at its last checkpoint), or None."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return Deadline.from_state(doc), float(doc.get("elapsed", 0.0))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- process state: set for a call, restored after it -------------------------------------------------------------


@contextlib.contextmanager
def session() -> Iterator[None]:
    """What a training call needs from Ultralytics' process state, undone when the block ends (a notebook keeps
    its own): no usage analytics, and no network once the model is resolved (YOLO_OFFLINE, read by is_online();
    a DDP child inherits it)."""
    events = _events()
    enabled = getattr(events, "enabled", None)
    offline = os.environ.get("YOLO_OFFLINE")
    if events is not None:
        events.enabled = False
    try:
        yield
    finally:
        if events is not None:
            events.enabled = enabled
        if offline is None:
            os.environ.pop("YOLO_OFFLINE", None)
        else:
            os.environ["YOLO_OFFLINE"] = offline


def go_offline() -> None:
    """From here to the end of the session() block nothing needs the network: no hub calls, no AMP-check download."""
    os.environ["YOLO_OFFLINE"] = "1"


def _events() -> Any:
    """Ultralytics' analytics singleton (internal: utils/events.py `events`), or None where a version lacks it."""
    try:
        from ultralytics.utils.events import events

        return events
    except ImportError:
        return None


class _PlainRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = ANSI.sub("", record.getMessage()), ()
        return True


@contextlib.contextmanager
def plain_text_when_piped() -> Iterator[None]:
    """Ultralytics colours its log lines and progress bars unconditionally (colorstr, 8.4.190); where the output
    is a file or a pipe (CI logs, `> train.log`, SLURM), strip the escape codes for the block, then restore."""
    if sys.stdout.isatty():
        yield
        return
    plain = _PlainRecords()
    handlers = list(LOGGER.handlers)
    out, err = sys.stdout, sys.stderr
    for handler in handlers:
        handler.addFilter(plain)
    sys.stdout, sys.stderr = PlainStream(out), PlainStream(err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        for handler in handlers:
            handler.removeFilter(plain)


@contextlib.contextmanager
def output_to(log_file: Path | None) -> Iterator[PlainStream | None]:
    """Send Ultralytics' console output (LOGGER's stream handlers, its progress bars on sys.stdout/stderr) to
    `log_file` for the block, without colour codes; yield that stream (its `latest` line), or None: `log_file` None
    leaves the output on the console."""
    if log_file is None:
        yield None
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a", encoding="utf-8", buffering=1) as f:
        plain = PlainStream(f)
        handlers = [h for h in LOGGER.handlers if type(h) is logging.StreamHandler]
        streams = [_swap_stream(h, plain) for h in handlers]
        out, err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = plain  # type: ignore[assignment]
        try:
            yield plain
        finally:
            sys.stdout, sys.stderr = out, err
            for handler, stream in zip(handlers, streams, strict=True):
                _swap_stream(handler, stream)


def _swap_stream(handler: logging.StreamHandler, stream: Any) -> Any:
    """Point a handler at another stream and return the old one. Not StreamHandler.setStream: it flushes the old
    stream first, and Ultralytics' handler may hold one that is closed by now (a test runner's captured output)."""
    with handler.lock or contextlib.nullcontext():
        old, handler.stream = handler.stream, stream
    return old


# --- the callback adapter: what a stage records from Ultralytics' events ---------------------------------------


class StopRequested(Exception):  # noqa: N818 -- a request, not an error
    """Raised from a callback after the epoch's checkpoint is safe, to stop before Ultralytics strips it."""


ETA_BATCHES = 8  # the time estimate waits for this many batches of the first epoch (or a tenth of it, if more)


@dataclass(slots=True)
class Recorder:
    """The callback adapter: Ultralytics' events become a stage's figures (each epoch timed, the first batches'
    estimate), progress events, a resumable checkpoint after every saved epoch and a stop after a requested one."""

    starts: dict[int, float] = field(default_factory=dict)
    epoch_times: dict[int, float] = field(default_factory=dict)
    train_times: dict[int, float] = field(default_factory=dict)
    images: int = 0
    iterations: int = 0
    stop_requested: bool = False
    stop_signal: str | None = None  # "SIGINT" or "SIGTERM": what asked for the stop
    collective: bool = False  # one rank of several: every rank stops after the same epoch
    in_final_eval: bool = False  # Ultralytics' validation of best.pt after the last epoch has begun
    threads: int | None = None  # the plan's torch threads; None leaves Ultralytics' setting
    threads_used: int | None = None
    fast_store: str | None = None
    stage: str = ""
    on_update: OnProgress | None = None
    batches: int = 0
    last_rate: float | None = None
    last_map: float | None = None
    t0: float = field(default_factory=time.perf_counter)  # the stage's start: setup and retries count
    ends: dict[int, float] = field(default_factory=dict)  # epoch -> seconds since t0 when it was saved
    cadence: ValCadence | None = None  # when the stage does not validate every epoch (--val-every)
    phases: Phases | None = None  # --time: a budgeted stage's phases and learning-rate curve
    log: Log | None = None  # where the time estimates go
    estimated_epoch_s: float | None = None
    estimated_from: int = 0
    baseline_factor: float = 0.0  # (640 / imgsz)^2 for a stage trained below Ultralytics' 640: the baseline's estimate
    later: tuple[tuple[str, int, float, bool], ...] = ()  # stages after this one: name, epochs, pixels ratio, maybe
    max_epochs: int | None = None  # --time with --epochs: time= never fits more epochs than these
    limit_note: str = ""  # set when that limit, not the budget, ends the stage
    _first_batch_end: float = 0.0

    def callbacks(self) -> dict[str, list[Callable[[Any], None]]]:
        """Ultralytics callback events and what runs on each."""
        # Ultralytics' select_device() sets torch's threads for CPU training (min(8, cores - 1)) in the trainer's
        # __init__ and again when final_eval validates best.pt; the thread callbacks run right after each.
        events: dict[str, list[Callable[[Any], None]]] = {
            "on_pretrain_routine_start": [self.apply_threads, _cache_fill_start],
            "on_pretrain_routine_end": [_cache_fill_end],
            "on_val_start": [self.apply_threads, self.on_val_start],
            "on_train_epoch_start": [self.on_train_epoch_start],
            "on_train_epoch_end": [self.on_train_epoch_end],
            "on_model_save": [self.on_model_save],
            "on_fit_epoch_end": [self.on_fit_epoch_end],
        }
        if self.on_update or self.log:
            events["on_train_batch_end"] = [self.on_train_batch_end]
        for part in (self.cadence, self.phases):
            if part is not None:
                for event, functions in part.callbacks().items():
                    events.setdefault(event, []).extend(functions)
        if self.phases is not None:  # the phases' state first: a resume.pt never goes on from an older state
            events["on_model_save"] = [self.phases._save, self.on_model_save]
        return events

    def on_train_epoch_start(self, trainer: Any) -> None:
        self.starts[trainer.epoch] = time.perf_counter()
        self.batches = 0

    def on_train_batch_end(self, trainer: Any) -> None:
        self.batches += 1
        self._update(trainer, min(1.0, self.batches / max(1, len(trainer.train_loader))))
        if self.log and self.estimated_epoch_s is None:
            self._estimate(trainer)

    def _estimate(self, trainer: Any) -> None:
        """After the first batches of the stage's first epoch in this process: the training passes' time, from the
        steady time a batch (the first batch, which starts the loader and warms up, counted once per epoch)."""
        log, now, total = self.log, time.perf_counter(), len(trainer.train_loader)
        if log is None:
            return
        if self.batches == 1:
            self._first_batch_end = now
            return
        if self.batches < min(total, max(ETA_BATCHES, total // 10)):
            return
        first = self._first_batch_end - self.starts[trainer.epoch]
        per_batch = (now - self._first_batch_end) / (self.batches - 1)
        epoch_s = first + per_batch * (total - 1)
        epochs = max(1, trainer.epochs - trainer.epoch)
        self.estimated_epoch_s, self.estimated_from = round(epoch_s, 2), self.batches
        if self.phases is not None:  # a budgeted stage: its phases say what fits (Phases' own line)
            return
        budget = float(getattr(trainer.args, "time", None) or 0) * 3600  # --time: Ultralytics fits the epochs
        factor, later, limit = self.baseline_factor, self.later, self.max_epochs
        log(first_epoch_estimate(self.stage, epoch_s, self.batches, epochs, budget, factor, later, limit))

    def _update(self, trainer: Any, fraction: float, done: bool = False) -> None:
        if self.on_update:
            self.on_update(
                StageProgress(
                    self.stage,
                    trainer.epoch,
                    max(trainer.epochs, trainer.epoch + 1),
                    fraction,
                    self.last_rate,
                    self.last_map,
                    done,
                    self.batches,
                    len(trainer.train_loader) if getattr(trainer, "train_loader", None) is not None else 0,
                )
            )

    def on_val_start(self, validator: Any) -> None:
        # The per-epoch validation runs with the trainer (validator.training); final_eval() validates best.pt alone.
        self.in_final_eval = not validator.training

    def apply_threads(self, _trainer_or_validator: Any) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    def on_train_epoch_end(self, trainer: Any) -> None:
        import torch

        self.threads_used = torch.get_num_threads()
        resident = getattr(trainer, "fast_resident", None)
        self.fast_store = None if resident is None else "ram" if resident else "memmap"
        self.train_times[trainer.epoch] = time.perf_counter() - self.starts[trainer.epoch]
        self.images = len(trainer.train_loader.dataset)
        self.iterations = len(trainer.train_loader)
        seconds = self.train_times[trainer.epoch]
        self.last_rate = round(self.images / seconds, 1) if seconds > 0 else None

    def on_model_save(self, trainer: Any) -> None:
        # last.pt is written in place (a kill mid-write corrupts it) and stripped of its optimizer by final_eval();
        # resume.pt is an atomic copy that always holds the last complete, resumable epoch.
        last = Path(trainer.last)
        tmp = last.with_name(f".{RESUME_NAME}.tmp")
        shutil.copyfile(last, tmp)
        os.replace(tmp, last.with_name(RESUME_NAME))

    def on_fit_epoch_end(self, trainer: Any) -> None:
        # Also fired once more by final_eval() for the last epoch; keep the first (the epoch's own).
        if trainer.epoch in self.starts and trainer.epoch not in self.epoch_times:
            self._limit_fitted_epochs(trainer)
            self.epoch_times[trainer.epoch] = time.perf_counter() - self.starts[trainer.epoch]
            self.ends[trainer.epoch] = time.perf_counter() - self.t0
            score = (getattr(trainer, "metrics", None) or {}).get("metrics/mAP50-95(B)")
            if score is not None and math.isfinite(score):  # NaN: an epoch --val-every did not validate
                self.last_map = round(float(score), 4)
            self._update(trainer, 1.0, done=True)
            # Ranks agree (one all-reduce per epoch) so that all stop after the same saved epoch, whichever got
            # the signal: a rank that went on alone would wait forever in the next epoch's first collective.
            # Rank 0 alone knows whether Ultralytics stops here anyway (last epoch, early stopping): it tells the
            # others after this callback, so its word is gathered too.
            finishing = bool(trainer.stop)
            if self.collective:
                states = distributed.gather((self.stop_signal if self.stop_requested else None, finishing))
                signals = [sig for sig, _ in states if sig]
                if signals and not self.stop_requested:  # the signal reached other ranks only
                    self.stop_requested, self.stop_signal = True, signals[0]
                finishing = states[0][1]
            if self.stop_requested and not finishing:
                raise StopRequested(f"stopped after epoch {trainer.epoch + 1}")

    def _limit_fitted_epochs(self, trainer: Any) -> None:
        """--epochs with --time: Ultralytics' time= has just refit the epochs to the budget from the mean epoch time
        and rebuilt the learning-rate schedule for them (engine/trainer.py _do_train, 8.4.190); more than the limit
        become the limit, with the schedule rebuilt the same way, so that it still ends at its final rate."""
        limit = self.max_epochs
        if not limit or not getattr(trainer.args, "time", None) or trainer.epochs <= limit:
            return
        fitted, budget = trainer.epochs, float(trainer.args.time) * 3600
        epochs = f"{limit} epoch{'s' if limit > 1 else ''}"
        self.limit_note = (
            f"ended by its limit of {epochs} before its {duration(budget)} budget (about {fitted} fit it at the "
            "measured epoch time, validation included)"
        )
        trainer.epochs = trainer.args.epochs = limit
        trainer._setup_scheduler()
        trainer.scheduler.last_epoch = trainer.epoch
        trainer.stop = bool(trainer.stop) or trainer.epoch + 1 >= limit


def join_group(device: Any) -> None:
    """Join the ranks' process group on `device`, Ultralytics imported first: its import runs a barrier when a group
    exists (utils/__init__.py SettingsManager, 8.4.190), so a rank importing it after joining would wait there for
    the others, which import it elsewhere. Importing this module imported it."""
    distributed.join(device)
