"""Turn (HardwareSnapshot, DatasetStats, Overrides) into a TrainPlan. Pure: no I/O, no torch, no ultralytics."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, cast

import yaml  # values are parsed as the yolo CLI does: numbers, booleans, null, lists

from speedtrain.dataset import DatasetStats
from speedtrain.errors import UsageError
from speedtrain.hardware import Gpu, HardwareSnapshot
from speedtrain.knobs import (  # noqa: F401 -- the plan's records, re-exported for the planner's users
    BASELINE,
    BY_NAME,
    DEFAULT_TARGET_MAP,
    FROM_ULTRALYTICS,
    PLANNED,
    Cache,
    Overrides,
    PipelineKind,
    Stage,
    TrainPlan,
    When,
    said,
)
from speedtrain.records import StageResult
from speedtrain.schedule import MAX_PHASES, VAL_EVERY_MAX, VAL_LAST, VAL_SHARE, Schedule, plan_schedule
from speedtrain.util import closest, duration, parse_duration

# the plan's one-value defaults, declared with their knobs (speedtrain/knobs.py), whose help texts say them
DEFAULT_MODEL: str = PLANNED["model"]
FINETUNE_WHEN: dict[str, When] = {"yes": "always", "auto": "auto", "ask": "ask"}
MAIN_IMGSZ: int = PLANNED["imgsz"]
FINETUNE_IMGSZ: int = PLANNED["finetune_imgsz"]
MAIN_EPOCHS: int = PLANNED["epochs"]
FINETUNE_EPOCHS: int = PLANNED["finetune_epochs"]
SAMPLE_EPOCHS = (3, 2)  # main, fine-tune epochs on the embedded sample: a demo that ends in minutes on a CPU
FINETUNE_LR_FACTOR = 0.1
PATIENCE: int = PLANNED["patience"]  # Ultralytics' default (cfg/default.yaml): never cuts a 50-epoch cosine short
CLOSE_MOSAIC: int = PLANNED["close_mosaic"]  # Ultralytics' default
# --finetune auto: the fine-tune runs when the main stage's best weights score this much lower (relative mAP50-95)
# at the fine-tune's size than at their own; below it they already carry over to the larger size
FINETUNE_LAG = 0.05
# Ultralytics' optimizer=auto (engine/trainer.py build_optimizer, 8.4.190): AdamW at 0.002 * 5 / (4 + nc) with
# momentum 0.9 and no bias warmup for runs of at most 10,000 iterations (of nominal batch 64), else MuSGD at 0.01
NBS = 64
AUTO_ITERATIONS = 10_000
LR0_DEFAULT = 0.01  # Ultralytics' lr0, for an optimizer the user names without a learning rate
ADAPTIVE = ("Adam", "Adamax", "AdamW", "NAdam", "RAdam")
STRIDE = 32  # Ultralytics rounds imgsz up to a multiple of the model's largest stride
THREADS_PER_CORE = 4  # --threads above this many per logical core only oversubscribes (and fails inside libgomp)

BATCH_CHAIN = (48, 32, 16, 8)  # per GPU; the OOM fallback walks it left to right
CPU_BATCH_CHAIN = (16, 8, 4)
CPU_BATCH_BY_RAM_GB = ((16.0, 16), (8.0, 8), (0.0, 4))  # (available RAM at least, batch)
WORKERS_BY_RAM_GB = ((16.0, 16), (8.0, 12), (4.0, 8), (0.0, 4))  # (available RAM at least, workers)

# VRAM model (estimate, to be replaced by measurement in `speedtrain tune`): a nano YOLO model at 416 px with
# AMP takes about 0.09 GB per image of activations and gradients; larger scales take more. A CUDA context and
# cuDNN workspaces take about 1 GB, and only 70% of the rest is counted so that allocator fragmentation and
# the validation pass fit. A wrong guess costs one OOM retry down the fallback chain, not the run.
GB_PER_IMAGE_NANO_416 = 0.09
MODEL_SCALE_MEMORY = {"n": 1.0, "s": 2.0, "m": 3.5, "l": 5.0, "x": 7.5}
CUDA_CONTEXT_GB = 1.0
VRAM_USABLE_FRACTION = 0.7

# RAM cache margin. Measured peaks (4,000 ppe-large photos at 416, a 1.33 GB cache, Linux): the process grew by
# 1.02x the cache while it filled with speedtrain.allocator setting glibc's allocator, by 1.98x without (Ultralytics
# packs the cached images into one tensor and glibc keeps the freed copies). 1.5x where the allocator is set (also
# Ultralytics' own check, BaseDataset.check_cache_ram), 2.1x elsewhere (the packing copy, unmeasured there); on top,
# each forked dataloader worker holds its own private memory (torch runtime, augmentation and prefetch buffers;
# an estimate of 0.3 GB each, the cached images themselves are shared copy-on-write), and 2 GB stay free for
# the OS and the training process.
RAM_CACHE_FACTOR = 1.5
# Ultralytics' disk cache instead of its RAM cache where the .npy files hold images at about the training size (at
# most this many times their decoded size there: a fine-tune's 640-px copy under a 416-px main stage is 2.4x)
NPY_MAX_RATIO = 2.5
CACHE_EVIDENCE = (
    "measured on 25,000 ppe-large photos pre-resized to 416 (2-vCPU CPU): the second run's first batch came after "
    "12 s with the disk cache against 42 s with the RAM cache (filled again on every run) and 15-16 s for plain "
    "Ultralytics, and the process held 2.5 GB against 10.9 GB; on 300 of them a training pass took 16.3 s against "
    "16.0 s after the first epoch (2 runs each, within this machine's run-to-run noise; the first epoch, while the "
    "new files were written out, 18.0 s against 16.5 s), the same mAP"
)
RAM_CACHE_FACTOR_UNTUNED = 2.1
WORKER_RAM_GB = 0.3
RAM_RESERVE_GB = 2.0
DISK_RESERVE_GB = 1.0
SHM_PREFETCH = 4  # batches each training DataLoader worker holds in /dev/shm (Ultralytics' prefetch_factor)

# --prepare auto resizes when more than half the images are over 1.5x the largest training size: below that,
# Ultralytics' own per-epoch resize costs little.
PREPARE_FACTOR = 1.5
PREPARE_SHARE = 0.5

FINETUNE_TIME_SHARE = 0.3  # --time with a fine-tune: its share of the budget
VAL_AUTO = 0  # Stage.val_every for auto: decided from the first validated epoch's measured times


# What the accuracy-sensitive defaults rest on: `speedtrain compare` from COCO-pretrained yolov8n on ppe-large (1,000
# train / 200 held-out val construction-site photos), 20 minutes per arm on a 2-vCPU CPU, 2026-12-06; the docs'
# "Time to accuracy" page has every figure. Each reason cites its own.
MEASURED_ON = "measured from COCO weights on held-out photos (ppe-large, 2-vCPU CPU, 20 min per arm)"
EVIDENCE = {
    "imgsz": f"(640/416)^2 = 2.4x fewer pixels per image than 640; {MEASURED_ON}: trained at 416 the model scored "
    "0.474 mAP50-95 at 640, the same recipe at 640 0.455, Ultralytics' defaults 0.386",
    "optimizer": "measured: it learned as much per epoch as Ultralytics' defaults (0.273 vs 0.291 mAP50-95 at 640 "
    "after one epoch), the classic Adam at 0.001 with rect 0.111",
    "rect": f"{MEASURED_ON}: rect trained 1.46x more images/s but ended lower in the same time (0.465 mAP50-95 at "
    "640 against 0.474) after learning less per epoch (0.184 against 0.273 after one); --rect for its speed",
    "rect-cost": "measured in the same time from COCO weights: 0.465 mAP50-95 at 640 with rect against 0.474 without, "
    "at 1.46x the images/s",
    "cos_lr": "not measured apart from the rest of the plan",
    "patience": "Ultralytics' default; stopping early cuts a cosine schedule before its learning rate comes down "
    "(ultralytics #20615)",
    "val_every": "measured from COCO weights (ppe-large, 300 train / 200 val photos, 12 epochs at 416, 2-vCPU CPU): "
    "--val-every auto validated 6 of 12 epochs and the stage took 356 and 364 s against 385 and 364 s (two runs), "
    "but its best.pt, chosen among fewer epochs, scored 0.368 mAP50-95 at 640 against 0.378 both times; "
    "--val-every auto where validation dominates",
    "finetune": "measured: the 416 weights scored 0.474 at 640 and 0.449 at 416; a fine-tune at a tenth of the rate "
    "added 0.005 at 640 for 30% of the time (at the full rate it undid the main stage: 0.483 to 0.369)",
}

# --recipe classic: the single-script recipe the project started from, applied exactly (where the user set nothing)
CLASSIC: dict[str, Any] = {"optimizer": "Adam", "lr0": 0.001, "rect": True, "close_mosaic": 10, "patience": 10}
CLASSIC_COST = (
    "measured from COCO weights on ppe-large: 0.111 mAP50-95 at 640 after one epoch against the plan's 0.273 "
    "(Adam at 0.001 learns about half as much per epoch; rect turns mosaic and shuffling off)"
)
PHASES_HINT = "--phases auto trains it in phases of rising image size against the deadline"
# --time: what the deadline plan rests on (each reason cites its own; the docs' "Time to accuracy" page has them all)
SCHEDULE_EVIDENCE = {
    "one-size": "measured from COCO weights on ppe-large, 2-vCPU CPU, 20 minutes: at 416 with time= it reached the "
    "defaults' 60-minute mAP50-95 (0.481 at 640) in 0.31x their time (a second run ended at 0.475); in phases "
    "320/416/640 it ended at 0.460, at 416 on a linear-to-zero curve at 0.465",
    "phases": "measured from COCO weights on ppe-large, 2-vCPU CPU, 20 minutes: 0.460 mAP50-95 at 640 in phases "
    "320/416/640, 0.459 in 416/640, against 0.481 at one size with Ultralytics' time=, the default",
    "warmup": "a pretrained start needs about one epoch of warmup (Ultralytics' fine-tuning guide), not its 3 of a "
    "from-scratch COCO run",
    "lr": "a learning rate decayed linearly to zero at the end of the budget beats the usual schedules at small "
    "budgets (Budgeted Training, ICLR 2020; REX, arXiv 2107.04197)",
    "finetune": "measured from COCO weights, 2-vCPU CPU: on ppe-large in 20 minutes it ended at 0.476, 0.483 and "
    "0.477 mAP50-95 at 640 (one size for the whole budget: 0.481, 0.475, 0.479) and reached the defaults' 60-minute "
    "accuracy in 0.23x their time once; on underwater photos of small objects in 15 minutes, 0.408 and 0.419 "
    "against one size's 0.386",
}

# Ultralytics train arguments that speedtrain owns: they come from its own options (named by their keywords).
RESERVED_ARGS = {
    "data": "dataset",
    "model": "model",
    "project": "project",
    "name": "name",
    "resume": "resume",
    "mode": None,
    "task": None,
    "exist_ok": None,
    "save_dir": None,
}


def plan(hw: HardwareSnapshot, stats: DatasetStats, overrides: Overrides | None = None) -> TrainPlan:
    """Decide every knob of the run, each with a one-line reason."""
    folded = _fold_extra(overrides or Overrides())
    ov = _classic(folded)
    reasons: dict[str, str] = {}
    warnings: list[str] = []
    device, gpus = _device(hw, ov.device, reasons)
    _check_ranks(hw, ov.nproc_per_node, gpus, device)
    ranks = ov.world or ov.nproc_per_node or gpus
    if ranks > 1 and (ov.world or ov.nproc_per_node):
        where = f"{ranks} ranks (torchrun's WORLD_SIZE)" if ov.world else f"{ranks} ranks on this node"
        reasons["device"] += f"; {where}, one process each"
    model = ov.model or DEFAULT_MODEL
    reasons["model"] = "set by user" if ov.model else f"{DEFAULT_MODEL}: the current Ultralytics nano model"
    imgsz = _imgsz(ov.imgsz, "img-size", MAIN_IMGSZ, warnings)
    reasons["imgsz"] = "set by user" if ov.imgsz else f"{MAIN_IMGSZ}: {EVIDENCE['imgsz']}"
    main = _main_stage(hw, stats, ov, device, gpus, model, imgsz, reasons, warnings, ranks)
    stages = [main]
    finetune = _finetune_stage(hw, stats, ov, main, gpus, model, reasons, warnings)
    if finetune:
        stages.append(finetune)
    for stage in stages:
        _refuse_impossible_batch(hw, stage, gpus)
    reasons["warmup_epochs"] = "3: Ultralytics' default"
    if ov.recipe == "classic":
        _classic_reasons(folded, reasons)
    stages = _budgeted(stats, ov, stages, reasons, warnings)
    prepare_size, reasons["prepare"] = _prepare(stats, stages, ov.prepare)
    stages = _kept_caches(hw, stats, stages, prepare_size, ov.cache, reasons)
    return TrainPlan(
        device=device,
        model=model,
        stages=tuple(stages),
        reasons=tuple(reasons.items()),
        target_map=ov.target_map,
        estimates=tuple(_estimates(stats, stages[0]).items()),
        warnings=tuple(warnings),
        cache_estimate_gb=round(stats.decoded_gb(main.imgsz), 3),
        prepare_size=prepare_size,
        ranks=max(1, ranks),
    )


def _classic_reasons(given: Overrides, reasons: dict[str, str]) -> None:
    """--recipe classic: the recipe's own settings say so as their reason, not "set by user"."""
    for key in (k for k in CLASSIC if getattr(given, k) is None):
        reasons[key] = reasons.get(key, "").replace("set by user", "--recipe classic", 1) or "--recipe classic"
    reasons["optimizer"] = f"Adam at 0.001 (--recipe classic; {CLASSIC_COST})"


def _budgeted(
    stats: DatasetStats, ov: Overrides, stages: list[Stage], reasons: dict[str, str], warnings: list[str]
) -> list[Stage]:
    """--time: the run in phases against its deadline, or (where phases cannot be) Ultralytics' time= per stage."""
    if ov.phases is not None and ov.time is None:
        raise UsageError(f"{said('phases', ov.phases)}: phases are planned against a deadline; give {said('time')} too")
    if ov.time is None:
        return stages
    seconds = _budget_seconds(ov.time)
    why_not = _no_phases(ov, stages[0])
    if why_not or ov.phases is None:
        if ov.phases is None and len(stages) > 1 and stages[1].when == "auto":
            # a deadline has no time to decide in: the fine-tune gets its share, as measured
            stages = [stages[0], replace(stages[1], when="always")]
            reasons["finetune"] = (
                f"the last {FINETUNE_TIME_SHARE:.0%} of the budget at {stages[1].imgsz} px from the main stage's "
                f"best weights (--finetune auto with --time; {SCHEDULE_EVIDENCE['finetune']}); "
                f"{said('finetune', 'no')} trains one size for the whole budget"
            )
        elif ov.phases is None and len(stages) > 1 and stages[1].when == "ask":
            # asked after the main stage, a declined fine-tune would leave its share of the deadline unused
            reasons["finetune"] = (
                f"off with --time ({said('finetune', 'ask')}): the whole budget trains one size; "
                f"{said('finetune', 'auto')} gives the fine-tune {FINETUNE_TIME_SHARE:.0%} of it"
            )
            for key in ("finetune.batch", "finetune.cache", "finetune.lr0"):
                reasons.pop(key, None)
            stages = stages[:1]
        stages, reasons["time"] = _timed(_capped(stages, ov, reasons), seconds)
        reasons["time"] += f"; {why_not}" if why_not else f" ({SCHEDULE_EVIDENCE['one-size']}; {PHASES_HINT})"
        if ov.epochs is None:
            reasons["epochs"] += "; Ultralytics' time= refits them to the budget after the first epoch"
        return stages
    if ov.epochs is not None or ov.finetune_epochs is not None:
        warnings.append(
            "--epochs and --finetune-epochs do not apply with --time: the phases' epochs are fitted to the deadline"
        )
    return [_deadline_stage(stats, ov, stages, seconds, reasons)]


def _check_ranks(hw: HardwareSnapshot, requested: int | None, gpus: int, device: str) -> None:
    """--nproc-per-node within what this node can run: one rank per GPU of --device on GPUs; on a CPU at most one
    per logical core (each rank needs a thread of its own), as --threads and --workers are capped."""
    if requested is None:
        return
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise UsageError(f"{said('nproc_per_node', requested)}: a whole number of ranks, 1 or more")
    if gpus and requested != gpus:
        raise UsageError(
            f"{said('nproc_per_node', requested)}: {said('device', device)} has {gpus} GPU{'s' if gpus > 1 else ''}; "
            f"one rank per GPU (leave {said('nproc_per_node')} out, or list the GPUs in {said('device')})"
        )
    cores = max(hw.cpu_cores_logical, 1)
    if not gpus and requested > cores:
        raise UsageError(
            f"{said('nproc_per_node', requested)}: this machine has {cores} logical cores; use 1 to {cores} "
            "CPU ranks (each needs a core)"
        )


def _main_stage(
    hw: HardwareSnapshot,
    stats: DatasetStats,
    ov: Overrides,
    device: str,
    gpus: int,
    model: str,
    imgsz: int,
    reasons: dict[str, str],
    warnings: list[str],
    ranks: int = 0,
) -> Stage:
    batch, fallbacks, reasons["batch"] = _batch(hw, gpus, model, imgsz, ov.batch, device, ranks)
    n = max(gpus, 1)
    if ov.batch is not None and stats.train_images and batch > max(2 * stats.train_images, n):
        # a user's batch far beyond the dataset (over twice its size): Ultralytics would cut it to the dataset's
        # size anyway, after sizing memory and the OOM chain for the larger number; say so here instead
        clamped = max(n, stats.train_images // n * n)
        fallbacks = tuple(b for b in fallbacks if b < clamped)
        reasons["batch"] += f"; clamped to {clamped}: the dataset has {stats.train_images} training images"
        batch = clamped
    workers, reasons["workers"] = _workers(hw, gpus, ov.workers, batch, imgsz, warnings)
    threads, reasons["threads"] = _threads(hw, gpus, ov.threads, ov.nproc_per_node or 1)
    epochs, reasons["epochs"] = _epochs(ov)
    once = epochs == 1 and ov.time is None  # with --time the epochs that fit are not known yet
    cache, reasons["cache"] = _cache(hw, stats, imgsz, workers, gpus, ov.cache, once)
    pipeline, reasons["pipeline"] = _pipeline(ov.pipeline, gpus)
    rect, reasons["rect"] = _rect(ov.rect, pipeline, ranks)
    close_mosaic, reasons["close_mosaic"] = _close_mosaic(ov.close_mosaic, epochs, rect)
    optimizer, lr0, reasons["optimizer"], reasons["lr0"] = _optimizer(ov, stats, batch, epochs)
    reasons["cos_lr"] = f"cosine learning-rate decay (Ultralytics' default is linear); {EVIDENCE['cos_lr']}"
    patience = ov.patience if ov.patience is not None else PATIENCE
    reasons["patience"] = "set by user" if ov.patience is not None else f"{PATIENCE}: {EVIDENCE['patience']}"
    amp, reasons["amp"] = _amp(ov.amp, gpus)
    deterministic, reasons["deterministic"] = _deterministic(ov.deterministic)
    val_every, reasons["val_every"] = _val_every(ov, ranks)
    return Stage(
        name="main",
        ram_cache_need_gb=round(ram_cache_need_gb(hw, stats, imgsz, workers, gpus), 2),
        imgsz=imgsz,
        epochs=epochs,
        batch=batch,
        batch_fallbacks=fallbacks,
        workers=workers,
        cache=cache,
        optimizer=optimizer,
        lr0=lr0,
        cos_lr=True,
        close_mosaic=close_mosaic,
        rect=rect,
        patience=patience,
        amp=amp,
        device=device,
        deterministic=deterministic,
        val_every=val_every,
        pipeline=pipeline,
        threads=threads,
        extra=ov.extra,
    )


def _finetune_stage(
    hw: HardwareSnapshot,
    stats: DatasetStats,
    ov: Overrides,
    main: Stage,
    gpus: int,
    model: str,
    reasons: dict[str, str],
    warnings: list[str],
) -> Stage | None:
    if ov.finetune == "no":
        reasons["finetune"] = "off (--finetune no)"
        return None
    imgsz = _imgsz(ov.finetune_imgsz, "finetune-img-size", FINETUNE_IMGSZ, warnings)
    if imgsz <= main.imgsz:
        reasons["finetune"] = f"skipped: the main stage already trains at {main.imgsz} >= {imgsz}"
        return None
    target = f", or its mAP50-95 at {imgsz} already reached --target-map {ov.target_map}" if ov.target_map else ""
    reasons["finetune"] = {
        "yes": f"runs at {imgsz} from the main stage's best weights (--finetune yes)",
        "auto": (
            f"auto: at {imgsz} from the main stage's best weights, unless they already score within "
            f"{FINETUNE_LAG:.0%} at {imgsz} of their mAP50-95 at {main.imgsz}{target} (both measured after the main "
            f"stage); {EVIDENCE['finetune']}"
        ),
        "ask": f"at {imgsz} from the main stage's best weights: asked at the end; skipped when not interactive",
    }[ov.finetune]
    user_batch = None if ov.batch is None else max(BATCH_CHAIN[-1], _scaled_batch(ov.batch, main.imgsz, imgsz))
    ranks = ov.world or ov.nproc_per_node or gpus
    batch, fallbacks, reasons["finetune.batch"] = _batch(hw, gpus, model, imgsz, user_batch, main.device, ranks)
    if user_batch is not None:
        reasons["finetune.batch"] = f"user batch scaled by ({main.imgsz}/{imgsz})^2 for the larger images"
    epochs = ov.finetune_epochs or (SAMPLE_EPOCHS[1] if ov.sample else FINETUNE_EPOCHS)
    once = epochs == 1 and ov.time is None
    cache, reasons["finetune.cache"] = _cache(hw, stats, imgsz, main.workers, gpus, ov.cache, once)
    optimizer, extra = main.optimizer, main.extra
    if optimizer == "auto":  # auto would choose its full rate again: name its choice, with auto's settings
        optimizer, _ = auto_optimizer(stats.train_images, batch, epochs, stats.classes)
        extra = (("momentum", 0.9), ("warmup_bias_lr", 0.0), *extra)  # the user's own key=value still win
    reasons["finetune.lr0"] = (
        f"{optimizer} at the main stage's lr0 x {FINETUNE_LR_FACTOR}: refine, don't relearn; no warmup"
    )
    return replace(
        main,
        name="finetune",
        imgsz=imgsz,
        epochs=epochs,
        batch=batch,
        batch_fallbacks=fallbacks,
        cache=cache,
        optimizer=optimizer,
        lr0=round(main.lr0 * FINETUNE_LR_FACTOR, 8),
        close_mosaic=min(CLOSE_MOSAIC if ov.close_mosaic is None else ov.close_mosaic, epochs),
        warmup_epochs=0.0,
        ram_cache_need_gb=round(ram_cache_need_gb(hw, stats, imgsz, main.workers, gpus), 2),
        when=FINETUNE_WHEN[ov.finetune],
        extra=extra,
    )


def _epochs(ov: Overrides) -> tuple[int, str]:
    if ov.epochs is not None:
        if isinstance(ov.epochs, bool) or not isinstance(ov.epochs, int) or ov.epochs < 1:
            raise UsageError(f"{said('epochs', ov.epochs)}: a whole number of epochs, 1 or more")
        return ov.epochs, "set by user"
    if ov.sample:
        return SAMPLE_EPOCHS[0], f"{SAMPLE_EPOCHS[0]}: a short demo on the embedded sample"
    return MAIN_EPOCHS, f"{MAIN_EPOCHS}: the length of the cosine schedule"


def auto_optimizer(train_images: int, batch: int, epochs: int, classes: int) -> tuple[str, float]:
    """What Ultralytics' optimizer=auto picks for this run: (name, learning rate).

    ultralytics/engine/trainer.py (8.4.190): iterations = ceil(images / max(batch, nbs)) x epochs; over 10,000 it
    is MuSGD at 0.01, else AdamW at round(0.002 x 5 / (4 + nc), 6), both with momentum 0.9 and warmup_bias_lr 0.
    """
    iterations = math.ceil(max(train_images, 1) / max(batch, NBS)) * epochs
    if iterations > AUTO_ITERATIONS:
        return "MuSGD", 0.01
    return "AdamW", round(0.002 * 5 / (4 + max(classes, 1)), 6)


def _optimizer(ov: Overrides, stats: DatasetStats, batch: int, epochs: int) -> tuple[str, float, str, str]:
    """(optimizer, lr0, optimizer's reason, lr0's reason): Ultralytics' own choice unless the user names one.

    `optimizer=auto` ignores lr0, so a user's --lr0 alone makes auto's choice explicit with that rate."""
    name, fit = auto_optimizer(stats.train_images, batch, epochs, stats.classes)
    if ov.optimizer and ov.optimizer.lower() != "auto":
        adaptive = ov.optimizer in ADAPTIVE
        lr0 = ov.lr0 or (fit if adaptive else LR0_DEFAULT)
        why = (
            f"{lr0}: auto's rate for {stats.classes} classes (Ultralytics' 0.01 is an SGD rate)"
            if adaptive
            else (f"{lr0}: Ultralytics' default")
        )
        why = "set by user" if ov.lr0 else why
        return ov.optimizer, lr0, "set by user", why
    if ov.lr0:
        return name, ov.lr0, f"{name}: auto's choice for this run, named so that --lr0 takes effect", "set by user"
    why = f"auto: Ultralytics' own choice, here {name} at {fit} ({stats.classes} classes, {stats.train_images} images"
    why += f" x {epochs} epochs)" + ("; " + EVIDENCE["optimizer"] if ov.optimizer is None else "")
    return "auto", fit, why, f"{fit}: chosen by optimizer=auto"


def _rect(requested: bool | None, pipeline: str, ranks: int = 0) -> tuple[bool, str]:
    """Rectangular batches by default; the fast pipeline always trains on square, shuffled mosaic batches, and so
    does multi-process (DDP) training: the plan says so instead of showing a rect it will not get."""
    if ranks > 1 and requested is not False:
        # ultralytics/engine/trainer.py (8.4.190, train()): "'rect=True' is incompatible with Multi-GPU training";
        # its distributed sampler shards shuffled indices, which rect's aspect-ratio order would not survive
        why = f"rect=False: DDP training on {ranks} ranks shards shuffled batches (mosaic on); rect needs one order"
        return False, ("set by user, but " if requested else "") + why
    rect = bool(requested)
    if pipeline == "fast" and rect:
        raise UsageError(
            f"{said('pipeline', 'fast')} trains on square mosaic batches; it cannot be combined with {said('rect')}"
        )
    if rect:
        why = (
            "rect=True: batches of similar aspect ratio, less padding; Ultralytics then turns off shuffle "
            f"and mosaic for the whole run ({EVIDENCE['rect-cost']})"
        )
    else:
        why = "rect=False: shuffled batches with mosaic augmentation, as Ultralytics trains"
        why += "; " + EVIDENCE["rect"] if requested is None else ""
    return rect, ("set by user; " if requested is not None else "") + why


def _amp(requested: bool | None, gpus: int) -> tuple[bool, str]:
    """Mixed precision on a GPU, unless the user turns it off (full precision, e.g. to chase a NaN loss); on CPU
    Ultralytics trains in full precision whatever amp says (its check_amp is for CUDA)."""
    if not gpus:
        return False, ("set by user, but " if requested else "") + "AMP is for GPUs; off on CPU"
    if requested is False:
        return False, "set by user: full precision (slower on a GPU, about twice the activation memory)"
    return True, "set by user: mixed precision on the GPU" if requested else "mixed precision on the GPU"


def _close_mosaic(requested: int | None, epochs: int, rect: bool) -> tuple[int, str]:
    """Ultralytics' own 10 last epochs without mosaic (all of a shorter stage), or the user's number."""
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 0):
        raise UsageError(f"{said('close_mosaic', requested)}: a whole number of epochs, 0 or more")
    last = min(CLOSE_MOSAIC if requested is None else requested, epochs)
    why = f"mosaic off for the last {last} epoch{'s' if last != 1 else ''}" if last else "mosaic to the end"
    why = f"set by user: {why}" if requested is not None else f"{why} (Ultralytics' default)"
    return last, why + (" (moot while rect=True, which disables mosaic)" if rect else "")


def _deterministic(requested: bool | None) -> tuple[bool, str]:
    """Speed by default; bitwise-repeatable runs on request.

    Ultralytics' default deterministic=True calls torch.use_deterministic_algorithms(True) and sets
    cudnn.deterministic, which rules out cuDNN's fastest (non-deterministic) kernels on a GPU. Published speed-ups
    measured with deterministic=False do not reproduce with it on, so it is a decision with a reason here.
    """
    if requested is not None:
        return requested, f"set by user: deterministic algorithms {'on' if requested else 'off'}"
    return False, (
        "off: deterministic kernels cost speed on a GPU (Ultralytics' default is on); --deterministic makes runs "
        "bitwise repeatable"
    )


def _pipeline(requested: str, gpus: int) -> tuple[PipelineKind, str]:
    """Ultralytics' CPU pipeline unless asked, or unless `speedtrain tune` measured the run data-bound on a GPU."""
    if requested not in ("auto", "fast", "ultralytics"):
        raise UsageError(f"{said('pipeline', requested, quoted=True)}: expected auto, fast or ultralytics")
    if requested in ("fast", "ultralytics"):
        return cast(PipelineKind, requested), f"{requested}: set by user"
    if not gpus:
        return "ultralytics", "ultralytics: on CPU the model step, not loading, sets the pace"
    return "ultralytics", (
        "ultralytics: not measured; --autotune times both pipelines on a data-bound GPU run and switches to fast "
        "only if it is faster, --pipeline fast forces it"
    )


def _prepare(stats: DatasetStats, stages: list[Stage], mode: str) -> tuple[int | None, str]:
    """Pre-resize to the largest training size when most images are much larger (auto), or always (yes)."""
    if mode not in ("auto", "yes", "no"):
        raise UsageError(f"{said('prepare', mode, quoted=True)}: expected auto, yes or no")
    if mode == "no":
        return None, "off (--prepare no)"
    size = max(s.imgsz for s in stages)
    sizes = stats.image_sizes
    which = "the fine-tune's size" if len(stages) > 1 else "the training size"
    larger = sizes.share_larger_than(size)
    if larger == 0:
        return None, f"not needed: every image is already at most {size} px ({which})"
    share = sizes.share_larger_than(round(size * PREPARE_FACTOR))
    median = sizes.median_long_side()
    if mode == "yes" or share > PREPARE_SHARE:
        why = "--prepare yes" if mode == "yes" else f"{share:.0%} of images exceed {PREPARE_FACTOR}x that"
        return size, f"resize to {size} px ({which}) once before training: {why} (median long side {median} px)"
    return None, f"not needed: {share:.0%} of images exceed {PREPARE_FACTOR}x {size} px (median {median} px)"


def apply_tuned(
    plan: TrainPlan,
    batch: int,
    workers: int,
    cache: Cache,
    why: str,
    fast_measured_faster: bool = False,
    pipeline_auto: bool = False,
) -> TrainPlan:
    """The plan with the main stage's batch, workers and cache as `speedtrain tune` measured them; a GPU run left
    on `--pipeline auto` (`pipeline_auto`) switches to the fast pipeline only when tune measured it faster here."""
    main = plan.stages[0]
    chain = tuple(sorted({b for b in (main.batch, *main.batch_fallbacks) if b < batch}, reverse=True))
    tuned = replace(main, batch=batch, batch_fallbacks=chain, workers=workers, cache=cache)
    reasons = dict(plan.reasons)
    if fast_measured_faster and main.on_gpu and pipeline_auto:
        tuned = replace(tuned, pipeline="fast", rect=False)
        reasons["pipeline"] = f"fast: speedtrain tune measured it faster than Ultralytics' pipeline here ({why})"
    for key, value in (("batch", batch), ("workers", workers), ("cache", cache or "none")):
        reasons[key] = f"{value}: measured by speedtrain tune ({why})"
    return replace(plan, stages=(tuned, *plan.stages[1:]), reasons=tuple(reasons.items()))


def recheck_cache(stage: Stage, ram_available_gb: float) -> tuple[Stage, str]:
    """Just before training: a planned RAM cache that no longer fits falls back to disk; the note says so."""
    if stage.cache != "ram" or stage.ram_cache_need_gb <= ram_available_gb:
        return stage, ""
    note = (
        f"{stage.name}: available RAM fell to {ram_available_gb:.1f} GB since planning, under the "
        f"{stage.ram_cache_need_gb:.1f} GB a RAM cache needs; using the disk cache instead"
    )
    return replace(stage, cache="disk"), note


def _device(hw: HardwareSnapshot, requested: str | None, reasons: dict[str, str]) -> tuple[str, int]:
    """Return (Ultralytics device string, number of GPUs used)."""
    if requested is None:
        if not hw.gpus:
            reasons["device"] = "cpu: no CUDA GPU found"
            return "cpu", 0
        ids = ",".join(str(g.index) for g in hw.gpus)
        reasons["device"] = (
            f"GPU {ids}: {hw.gpus[0].name}"
            if len(hw.gpus) == 1
            else f"GPUs {ids}: all {len(hw.gpus)} visible GPUs, one speedtrain rank each (torch.distributed DDP)"
        )
        return ids, len(hw.gpus)
    text = str(requested).strip().lower().replace("cuda:", "").replace(" ", "")  # device=7 arrives as a number
    text = "0" if text == "cuda" else text
    reasons["device"] = "set by user"
    if text in ("cpu", "mps"):
        return text, 0
    parts = text.split(",")
    if not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise UsageError(
            f"{said('device', requested, quoted=True)}: expected cpu, mps, a GPU index like 0, or a list like 0,1"
        )
    known = {g.index for g in hw.gpus}
    missing = [p for p in parts if int(p) not in known]
    if missing:
        have = f"GPUs {', '.join(map(str, sorted(known)))}" if known else "no CUDA GPU"
        raise UsageError(
            f"{said('device', requested)}: GPU {', '.join(missing)} does not exist (this machine has {have})"
        )
    return ",".join(parts), len(parts)


def selected_gpus(hw: HardwareSnapshot, device: str) -> tuple[Gpu, ...]:
    """The snapshot's GPUs that a device string ("0", "1,3", "cpu") names, by CUDA index."""
    ids = {int(p) for p in device.split(",") if p.isdigit()}
    return tuple(g for g in hw.gpus if g.index in ids)


def _batch(
    hw: HardwareSnapshot, gpus: int, model: str, imgsz: int, requested: int | None, device: str, ranks: int = 0
) -> tuple[int, tuple[int, ...], str]:
    """Return (total batch, fallback chain, reason); multi-GPU totals are per-GPU batch x GPUs (x ranks, when a
    launcher started several nodes' ranks)."""
    n = max(ranks or gpus, 1) if gpus else 1
    chain = BATCH_CHAIN if gpus else CPU_BATCH_CHAIN
    if requested is not None:
        return _user_batch(requested, n, chain, ranks)
    if not gpus:
        return _cpu_batch(hw, chain, ranks)
    free = min((g.free_vram_gb for g in selected_gpus(hw, device)), default=0.0)
    scale = model_scale(model)
    per_image = GB_PER_IMAGE_NANO_416 * MODEL_SCALE_MEMORY[scale] * (imgsz / MAIN_IMGSZ) ** 2
    fits = max(0.0, free - CUDA_CONTEXT_GB) * VRAM_USABLE_FRACTION / per_image
    per_gpu = next((b for b in chain if b <= fits), chain[-1])
    need = per_image * per_gpu + CUDA_CONTEXT_GB
    reason = f"{per_gpu}: est. {need:.1f} of {free:.1f} GB free VRAM ({scale}-scale model at {imgsz})"
    if per_gpu == chain[-1] and fits < chain[-1]:
        reason = f"{per_gpu}: the smallest batch tried; {free:.1f} GB free VRAM is tight at {imgsz}"
    if n > 1:
        reason += f"; x {n} GPUs = {per_gpu * n}"
    return per_gpu * n, tuple(c * n for c in chain if c < per_gpu), reason


def _user_batch(requested: int, n: int, chain: tuple[int, ...], ranks: int) -> tuple[int, tuple[int, ...], str]:
    """--batch-size as given (the total over `n` GPUs), with the chain below it for out-of-memory fallbacks."""
    if requested <= 0:
        raise UsageError(f"{said('batch', requested)}: must be a positive number of images")
    if requested < max(ranks, 1):  # Ultralytics gives each rank batch // ranks images: 0 fails minutes later
        raise UsageError(
            f"{said('batch', requested)}: the total batch is shared by {ranks} ranks, each needs at least one "
            f"image; use {said('batch', ranks)} or more (e.g. {ranks * 8}: 8 per rank)"
        )
    per_gpu = max(1, requested // n)
    return requested, tuple(c * n for c in chain if c < per_gpu), "set by user"


def _cpu_batch(hw: HardwareSnapshot, chain: tuple[int, ...], ranks: int) -> tuple[int, tuple[int, ...], str]:
    """CPU training: a batch by available RAM, at least one image per CPU rank."""
    batch = next(b for ram, b in CPU_BATCH_BY_RAM_GB if hw.ram_available_gb >= ram)
    why = f"{batch}: CPU training, sized by {hw.ram_available_gb:.0f} GB RAM"
    if ranks > batch:  # every CPU rank needs at least one image of the total
        batch, why = ranks, f"{ranks}: one image for each of {ranks} CPU ranks"
    return batch, tuple(c for c in chain if c < batch and c >= max(ranks, 1)), why


def _refuse_impossible_batch(hw: HardwareSnapshot, stage: Stage, gpus: int) -> None:
    """Refuse, before any work, a stage whose smallest batch cannot even hold its input images in memory (float32
    tensors of batch x 3 x imgsz^2, before a single activation): `--img-size 100000` would otherwise be killed by
    the kernel after minutes, or exhaust the GPU."""
    per_gpu = max(1, min((stage.batch, *stage.batch_fallbacks)) // max(gpus, 1))
    need = per_gpu * 3 * stage.imgsz**2 * 4 / 1024**3
    room, where = (
        (min((g.free_vram_gb for g in selected_gpus(hw, stage.device)), default=0.0), "free GPU memory")
        if gpus
        else (hw.ram_available_gb, "available RAM")
    )
    if need > room:
        knob = "imgsz" if stage.name == "main" else "finetune_imgsz"
        raise UsageError(
            f"{said(knob, stage.imgsz)}: a batch of {per_gpu} images at that size needs {need:,.1f} GB for its input "
            f"tensor alone, more than the {room:.1f} GB of {where}; YOLO trains at 320 to 1280"
        )


def _scaled_batch(batch: int, from_imgsz: int, to_imgsz: int) -> int:
    return int(batch * (from_imgsz / to_imgsz) ** 2)


def model_scale(model: str) -> str:
    """The n/s/m/l/x scale in a YOLO model name (yolo26n, yolov8s.pt, yolo11m.yaml); 'n' when unknown."""
    name = model.replace("\\", "/").rsplit("/", 1)[-1].lower()
    match = re.match(r"yolo(?:v?\d+)?([nsmlx])(?:[-_.]|$)", name)
    return match.group(1) if match else "n"


def _workers(
    hw: HardwareSnapshot, gpus: int, requested: int | None, batch: int, imgsz: int, warnings: list[str]
) -> tuple[int, str]:
    """Workers per GPU: by available RAM, capped at the cores per GPU and at what /dev/shm can hold."""
    per_gpu_batch = max(1, batch // max(gpus, 1))
    if requested is not None:
        most = THREADS_PER_CORE * max(hw.cpu_cores_logical, 1)
        if not 0 <= requested <= most:
            raise UsageError(
                f"{said('workers', requested)}: this machine has {hw.cpu_cores_logical} logical cores; use 0 to {most}"
            )
        if not gpus:  # ultralytics/engine/trainer.py (8.4.190) sets workers=0 for CPU training, whatever was asked
            if requested:
                warnings.append(f"--workers {requested}: on a CPU Ultralytics loads data in the training process")
            return 0, f"0: set by user to {requested}, but Ultralytics loads data in the training process on CPU"
        need = shm_need_gb(requested, per_gpu_batch, imgsz, gpus, hw.cpu_cores_logical)
        if gpus and hw.shm_free_gb is not None and need > hw.shm_free_gb:
            warnings.append(
                f"--workers {requested}: their batches need about {need:.1f} GB of /dev/shm, which has "
                f"{hw.shm_free_gb:.2f} GB free; workers may die with 'Bus error' (Docker: --shm-size=8g)"
            )
        return requested, "set by user"
    if not gpus:
        # ultralytics/engine/trainer.py sets workers=0 for CPU training: loading is not the bottleneck there.
        return 0, "0: Ultralytics loads data in the training process on CPU"
    by_ram = next(w for ram, w in WORKERS_BY_RAM_GB if hw.ram_available_gb >= ram)
    per_rank = max(1, hw.cpu_cores_logical // gpus)
    workers = min(by_ram, per_rank)
    reason = f"{workers}: {by_ram} for {hw.ram_available_gb:.0f} GB available RAM"
    if workers < by_ram:
        reason += f", capped at {per_rank} CPU cores" + (" per GPU" if gpus > 1 else "")
    if hw.shm_free_gb is None:
        return workers, reason
    fits = [w for w in range(workers, -1, -1) if shm_need_gb(w, per_gpu_batch, imgsz, gpus, per_rank) <= hw.shm_free_gb]
    if fits[0] == workers:
        return workers, reason
    need = shm_need_gb(workers, per_gpu_batch, imgsz, gpus, per_rank)
    reason = (
        f"{fits[0]}: /dev/shm has {hw.shm_free_gb:.2f} GB free and {workers} workers' batches would need about "
        f"{need:.1f} GB (est.); a larger /dev/shm (Docker: --shm-size=8g) allows {workers}"
    )
    warnings.append(f"workers cut to {fits[0]} by a small /dev/shm ({hw.shm_free_gb:.2f} GB free)")
    return fits[0], reason


def shm_need_gb(workers: int, per_gpu_batch: int, imgsz: int, gpus: int, cores_per_gpu: int) -> float:
    """/dev/shm the DataLoader workers of all GPUs fill (an estimate): each worker hands whole uint8 batches over
    through shared memory. Ultralytics 8.4.190 (data/build.py) prefetches 4 batches per training worker, and its
    validation loader (persistent too) has 2x the workers, capped at the cores, 2 batches each of 2x the batch."""
    if workers <= 0:
        return 0.0
    batch_gb = per_gpu_batch * imgsz * imgsz * 3 / 1024**3
    val_workers = min(2 * workers, max(cores_per_gpu, 1))
    return max(gpus, 1) * batch_gb * (workers * SHM_PREFETCH + val_workers * 2 * 2)


def _threads(hw: HardwareSnapshot, gpus: int, requested: int | None, local_ranks: int = 1) -> tuple[int | None, str]:
    """torch's intra-op threads: on CPU one per physical core; on a GPU Ultralytics' own setting.

    Ultralytics sets OMP_NUM_THREADS=1 at import and, for CPU training, torch.set_num_threads(min(8, cores - 1)):
    one thread on a 2-core machine, 8 on a 64-core one. CPU training loads data in the training process itself
    (Ultralytics forces workers=0), between steps, so no other process needs a core while the step runs: the
    step gets one thread per physical core, PyTorch's own default (SMT siblings share the vector units; measured
    on the 2-core development VM: 2 threads trained 1.46x to 1.74x faster than Ultralytics' 1, see the docs' Measured
    numbers). On a GPU
    the training process mostly launches kernels and the cores feed the dataloader workers, so it is left alone.
    """
    if requested is not None:
        most = THREADS_PER_CORE * max(hw.cpu_cores_logical, 1)
        if not 1 <= requested <= most:
            raise UsageError(
                f"{said('threads', requested)}: this machine has {hw.cpu_cores_logical} logical cores; use 1 to {most} "
                f"(the default, {max(1, min(hw.cpu_cores_physical, hw.cpu_cores_logical))}, is one per physical core)"
            )
        return requested, "set by user"
    if gpus:
        return None, "Ultralytics' own: on a GPU the training process launches kernels; cores feed the workers"
    cores = max(1, min(hw.cpu_cores_physical, hw.cpu_cores_logical))
    if local_ranks > 1:  # CPU ranks on one machine share its cores
        share = max(1, cores // local_ranks)
        return share, f"{share}: {cores} physical cores shared by {local_ranks} CPU ranks on this node"
    ultra = min(8, max(1, hw.cpu_cores_logical - 1))
    return cores, (
        f"{cores}: one per physical core; CPU training loads data between steps in the same process, so the "
        f"step can use every core (Ultralytics' own setting would be {ultra})"
    )


def ram_cache_factor(hw: HardwareSnapshot) -> float:
    """The process's growth while a RAM cache fills, per byte cached, with margin: glibc's allocator is set for the
    fill (speedtrain.allocator), other C libraries keep the packing copy."""
    return RAM_CACHE_FACTOR if hw.libc.startswith("glibc") else RAM_CACHE_FACTOR_UNTUNED


def ram_cache_need_gb(hw: HardwareSnapshot, stats: DatasetStats, imgsz: int, workers: int, gpus: int) -> float:
    """Available RAM a RAM cache needs: decoded images x the fill's factor, each worker's own memory, a reserve."""
    ranks = max(gpus, 1)  # every DDP rank caches its own copy
    decoded = stats.decoded_gb(imgsz) * ranks
    return decoded * ram_cache_factor(hw) + WORKER_RAM_GB * workers * ranks + RAM_RESERVE_GB


def _cache(
    hw: HardwareSnapshot,
    stats: DatasetStats,
    imgsz: int,
    workers: int,
    gpus: int,
    requested: str | None,
    once: bool = False,
) -> tuple[Cache, str]:
    """Ultralytics' image cache for a stage; `once`: the stage trains one epoch (each image is loaded once)."""
    if requested is not None:
        choices: dict[str, Cache] = {"ram": "ram", "disk": "disk", "none": False}
        value = choices.get(requested)
        if value is None:
            raise UsageError(f"{said('cache', requested, quoted=True)}: expected ram, disk or none")
        return value, "set by user"
    if once:  # Ultralytics fills a cache (RAM or .npy files) before the first batch, every image decoded once
        return False, (
            "none: one epoch loads each image once either way; a cache would load them all before the first batch "
            "and save nothing"
        )
    decoded = stats.decoded_gb(imgsz) * max(gpus, 1)
    need = ram_cache_need_gb(hw, stats, imgsz, workers, gpus)
    if need <= hw.ram_available_gb:
        return "ram", (
            f"ram: {decoded:.2f} GB decoded at {imgsz}; needs {need:.1f} GB with margin "
            f"(x{ram_cache_factor(hw)} + {WORKER_RAM_GB} GB/worker + {RAM_RESERVE_GB:.0f} GB), "
            f"{hw.ram_available_gb:.1f} GB available"
        )
    # Ultralytics' disk cache stores each image as a full-resolution .npy beside the training images.
    disk = stats.decoded_gb(None)
    if disk + DISK_RESERVE_GB <= hw.disk_free_gb:
        return "disk", (
            f"disk: RAM cache would need {need:.1f} GB with margin, {hw.ram_available_gb:.1f} GB available; "
            f"~{disk:.1f} GB of .npy files"
        )
    return False, f"none: neither RAM ({need:.1f} GB needed) nor disk ({disk:.1f} GB needed) has room"


def _kept_caches(
    hw: HardwareSnapshot,
    stats: DatasetStats,
    stages: list[Stage],
    prepare_size: int | None,
    requested: str | None,
    reasons: dict[str, str],
) -> list[Stage]:
    """A planned RAM cache becomes Ultralytics' disk cache where the images it would store are at about the training
    size (a pre-resized copy, or images no larger): the .npy files stay in speedtrain's view of the dataset between
    runs, so only the first run fills them, the operating system keeps them in memory where it has room (one copy for
    every rank of the machine), and the process does not hold the cache (CACHE_EVIDENCE)."""
    if requested is not None:
        return stages
    out = []
    for stage in stages:
        npy = stats.stored_gb(prepare_size)
        at_size = stats.decoded_gb(stage.imgsz)
        if stage.cache == "ram" and npy <= NPY_MAX_RATIO * at_size and npy + DISK_RESERVE_GB <= hw.disk_free_gb:
            where = f"at most {prepare_size} px, the pre-resized copy" if prepare_size else "as stored"
            key = "cache" if stage.name == "main" else "finetune.cache"
            reasons[key] = (
                f"disk: {npy:.2f} GB of decoded images ({where}) as .npy files in speedtrain's view of the dataset, "
                f"kept between runs: only the first run fills them; {CACHE_EVIDENCE}"
            )
            stage = replace(stage, cache="disk", ram_cache_need_gb=0.0)
        out.append(stage)
    return out


def _imgsz(value: int | None, flag: str, default: int, warnings: list[str]) -> int:
    if value is None:
        return default
    if value <= 0:
        raise UsageError(f"--{flag} {value}: must be a positive number of pixels")
    rounded = math.ceil(value / STRIDE) * STRIDE
    if rounded != value:
        warnings.append(f"--{flag} {value} is not a multiple of {STRIDE}; using {rounded} (as Ultralytics does)")
    return rounded


def _estimates(stats: DatasetStats, main: Stage) -> dict[str, str]:
    """Theoretical factors against the baseline; labelled as estimates, never as measurements."""
    res = (BASELINE["imgsz"] / main.imgsz) ** 2
    if main.schedule is not None:  # images per second scale with 1/pixels: each phase's share at its own rate
        res = sum(p.share * (BASELINE["imgsz"] / p.imgsz) ** 2 for p in main.schedule.phases)
    n = max(stats.train_images, 1)
    iters = math.ceil(n / BASELINE["batch"]) / math.ceil(n / main.batch)
    out = {
        "resolution": (
            f"{res:.2f}x the images of {BASELINE['imgsz']}-px training in the same time, over the phases"
            if main.schedule is not None
            else f"{res:.2f}x fewer pixels per image than {BASELINE['imgsz']}"
        )
        + " (estimate: compute ~ pixels)",
        "iterations": (
            f"as many iterations per epoch as batch {BASELINE['batch']}"
            if round(iters, 2) == 1
            else f"{iters:.2f}x fewer iterations per epoch than batch {BASELINE['batch']} (estimate)"
            if iters > 1
            else f"{1 / iters:.2f}x more iterations per epoch than batch {BASELINE['batch']} (estimate)"
        ),
    }
    if main.cache == "ram":
        out["cache"] = "no disk reads of cached images (estimate: helps when loading is the bottleneck)"
    elif main.cache == "disk":
        out["cache"] = "no image decoding once the .npy files exist (estimate: helps when loading is the bottleneck)"
    return out


def _budget_seconds(budget: str | float) -> float:
    """--time in seconds: "20m", "1h30m", or a plain number of hours as Ultralytics' time= takes it."""
    try:  # a plain number is hours, as Ultralytics' time= (here the whole run's, not each stage's)
        seconds = float(budget) * 3600 if not isinstance(budget, bool) else -1.0
    except ValueError:
        seconds = parse_duration(budget, "time")
    if not 60 <= seconds <= 30 * 24 * 3600:
        raise UsageError(f"{said('time', budget)}: between 1 minute and 30 days")
    return seconds


def _classic(ov: Overrides) -> Overrides:
    """--recipe classic: the single-script recipe's settings wherever the user set nothing."""
    if ov.recipe == "classic":
        return replace(ov, **{k: v for k, v in CLASSIC.items() if getattr(ov, k) is None})
    if ov.recipe != "speedtrain":
        raise UsageError(f"{said('recipe', ov.recipe, quoted=True)}: expected speedtrain or classic")
    return ov


def _no_phases(ov: Overrides, main: Stage) -> str:
    """Why a --time run cannot be planned in phases ("" when it can): each phase changes the image size of
    Ultralytics' shuffled, square batches, which rect batches and the fast pipeline's decoded store do not allow."""
    why = ""
    if ov.recipe == "classic":
        why = "--recipe classic: Ultralytics' time= fits the epochs, as the classic script trained"
    elif main.rect:
        why = "rect batches keep one image size: Ultralytics' time= fits the epochs"
    elif main.pipeline == "fast":
        why = "the fast pipeline decodes the images at one size: Ultralytics' time= fits the epochs"
    if ov.phases is not None and why:
        raise UsageError(f"{said('phases', ov.phases)}: with {why.split(':')[0]} a run cannot be trained in phases")
    return why


def _deadline_stage(
    stats: DatasetStats, ov: Overrides, stages: list[Stage], seconds: float, reasons: dict[str, str]
) -> Stage:
    """--time: one stage that trains phases of rising image size and ends at the size the model is scored at (the
    fine-tune's, else the main stage's), with one learning-rate curve to zero at the deadline. Batch and cache are
    those planned for the largest size; the fine-tune stage is the last phase."""
    main, final_stage = stages[0], stages[-1]
    sizes, shares = _phase_sizes(ov.phases)
    final = sizes[-1] if sizes else final_stage.imgsz
    user_first = main.imgsz if ov.imgsz is not None and final_stage is not main else None
    pretrained = not str(ov.model or DEFAULT_MODEL).lower().endswith((".yaml", ".yml"))
    schedule, why_low = plan_schedule(seconds, final, user_first, stats.small_box_px(final), pretrained, sizes, shares)
    stage = replace(
        main,
        imgsz=final,
        batch=final_stage.batch,
        batch_fallbacks=final_stage.batch_fallbacks,
        cache=final_stage.cache,
        ram_cache_need_gb=final_stage.ram_cache_need_gb,
        warmup_epochs=0.0,
        close_mosaic=0,
        patience=ov.patience or 0,
        val_every=1,
        schedule=schedule,
        when="always",
    )
    reasons.update(_schedule_reasons(schedule, why_low, ov, len(stages) > 1))
    if final_stage is not main:  # batch and cache as planned for the largest size; the fine-tune's own rows go
        reasons["batch"] = reasons.pop("finetune.batch") + f" (planned at {final}, the largest phase)"
        reasons["cache"] = reasons.pop("finetune.cache") + "; refilled at each phase's size"
        reasons.pop("finetune.lr0", None)
    reasons["epochs"] = "fitted to the deadline at run time from the measured pace" + (
        "" if main.optimizer != "auto" else f" ({main.epochs} only sizes optimizer=auto's choice)"
    )
    return stage


def _phase_sizes(text: str | None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """--phases "320,416,640", or with each phase's share of the budget "416:0.6,640:0.4": rising image sizes,
    multiples of 32, at most MAX_PHASES, shares (all or none) summing to 1; one clear line otherwise."""
    if text is None or str(text).strip().lower() == "auto":
        return (), ()
    example = f"{said('phases', text)}: rising image sizes, multiples of {STRIDE}, e.g. 320,416,640 or 416:0.6,640:0.4"
    try:
        parts = [p.split(":") for p in str(text).replace(" ", "").split(",") if p]
        sizes = tuple(int(p[0]) for p in parts)
        shares = tuple(float(p[1]) for p in parts if len(p) == 2)
    except (ValueError, IndexError):
        raise UsageError(example) from None
    if not sizes or any(s <= 0 or s % STRIDE for s in sizes) or list(sizes) != sorted(set(sizes)):
        raise UsageError(example)
    if len(sizes) > MAX_PHASES:
        raise UsageError(f"{said('phases', text)}: at most {MAX_PHASES} phases")
    if shares and (len(shares) != len(sizes) or min(shares) <= 0 or abs(sum(shares) - 1) > 0.01):
        raise UsageError(
            f"{said('phases', text)}: give every phase a share, each above 0, together 1 (e.g. 416:0.6,640:0.4)"
        )
    return sizes, shares


def _schedule_reasons(schedule: Schedule, why_low: str, ov: Overrides, had_finetune: bool) -> dict[str, str]:
    rows = "; ".join(f"{size} px for {share:.0%} (lr x{a:.2f} -> x{b:.2f})" for size, share, a, b in schedule.rows())
    start = "pretrained weights" if schedule.warmup < 0.1 else "scratch"
    out = {
        "time": (
            f"{duration(schedule.budget_s)}, planned in phases: {rows}; lowest size {why_low}; the epochs are "
            f"fitted at run time from the measured pace ({SCHEDULE_EVIDENCE['phases']})"
        ),
        "imgsz": (
            f"phases ending at {schedule.final_imgsz}, the size the model is scored at; the first phase's size "
            + ("set by user" if ov.imgsz is not None else f"from the boxes: {why_low}")
        ),
        "cos_lr": (
            f"one linear curve over every phase, warmup then down to 0 at the deadline (the optimizer and its "
            f"state go on across phases); {SCHEDULE_EVIDENCE['lr']}"
        ),
        "warmup_epochs": (f"{schedule.warmup:.0%} of the budget from {start}: {SCHEDULE_EVIDENCE['warmup']}"),
        "close_mosaic": f"mosaic off for the budget's last {schedule.close_mosaic:.0%} (not a count of epochs)",
        "patience": "set by user"
        if ov.patience
        else "off: the run anneals to its deadline; stopping early would cut it",
        "val_every": "the last epoch only, at the final size: nothing earlier is decided by a score (no early stop; "
        "the kept weights are the annealed ones), and its time is kept in reserve before the deadline",
    }
    if had_finetune:
        out["finetune"] = (
            f"the last phase trains at {schedule.final_imgsz} (--time plans the whole run; the fine-tune is its last "
            "phase, on the same learning-rate curve)"
        )
    return out


def _capped(stages: list[Stage], ov: Overrides, reasons: dict[str, str]) -> list[Stage]:
    """--epochs (--finetune-epochs) with --time: a limit the budget's fit never trains past. Ultralytics' time= alone
    refits the epochs to the budget after the first one whatever epochs= says (engine/trainer.py, 8.4.190)."""
    limits = {"main": ov.epochs, "finetune": ov.finetune_epochs}
    out = []
    for stage in stages:
        limit = limits[stage.name]
        if limit is not None:
            stage = replace(stage, max_epochs=limit)
            why = f"at most {limit} epoch{'s' if limit > 1 else ''} with --time, fewer where the budget ends first"
            if stage.name == "main":
                reasons["epochs"] = f"set by user: {why} (the epochs that fit are measured after the first)"
            else:
                reasons["finetune"] = f"{reasons.get('finetune', '')}; the fine-tune {why}".lstrip("; ")
        out.append(stage)
    return out


def _timed(stages: list[Stage], seconds: float) -> tuple[list[Stage], str]:
    """--time without phases: the run's budget shared between its stages, each handed to Ultralytics as time=
    (hours), which fits the stage's epochs to it from the measured mean epoch time after every epoch and rebuilds
    the learning-rate schedule with them, so that a cosine schedule still ends at its final rate when the time is up."""
    shares = {s.name: share for s, share in zip(stages, time_shares(stages), strict=True)}
    timed = [replace(s, extra=(*s.extra, ("time", round(seconds * shares[s.name] / 3600, 5)))) for s in stages]
    split = ", ".join(f"{s.name} {duration(seconds * shares[s.name])}" for s in stages)
    why = (
        f"{duration(seconds)}: {split}; Ultralytics' time= per stage fits the epochs to it from the measured epoch "
        "time and rebuilds the learning-rate schedule with them"
    )
    if len(stages) > 1:
        why += f"; {FINETUNE_TIME_SHARE:.0%} for the fine-tune"
    return timed, why


def time_shares(stages: Sequence[Stage]) -> tuple[float, ...]:
    """Each stage's share of a --time budget: all of it for one stage, FINETUNE_TIME_SHARE for a fine-tune."""
    if len(stages) == 1:
        return (1.0,)
    return tuple(FINETUNE_TIME_SHARE if s.name == "finetune" else 1 - FINETUNE_TIME_SHARE for s in stages)


def _val_every(ov: Overrides, ranks: int) -> tuple[int, str]:
    if any(key == "val" for key, _ in ov.extra):
        return 1, "1: val= is given, so Ultralytics' own validation setting applies"
    if ov.val_every is None:
        return 1, f"1: every epoch, as Ultralytics; {EVIDENCE['val_every']}"
    raw = str(ov.val_every).strip().lower()
    if ranks > 1:
        if raw not in ("auto", "1"):
            raise UsageError(
                f"{said('val_every', ov.val_every)}: with {ranks} ranks every epoch is validated; use 1 or auto"
            )
        return 1, f"1: with {ranks} ranks every epoch is validated (the ranks validate together)"
    if raw == "auto":
        return VAL_AUTO, (
            f"auto: every epoch until one validation is timed, then every k epochs so that validation stays under "
            f"{VAL_SHARE:.0%} of the run (k at most {VAL_EVERY_MAX} and a quarter of the epochs); the first, the "
            f"last {VAL_LAST} and any epoch that could stop the run early are always validated, and best.pt is "
            "chosen among validated epochs"
        )
    if not raw.isdigit() or int(raw) < 1:
        raise UsageError(f"{said('val_every', ov.val_every)}: expected auto or a whole number of epochs, 1 or more")
    return int(raw), "set by user" + (
        f"; the last {VAL_LAST} and any epoch that could stop the run early are validated too" if int(raw) > 1 else ""
    )


def _fold_extra(ov: Overrides) -> Overrides:
    """Move key=value arguments that name a planned knob (by its Ultralytics name) into the matching override. A
    key=value that contradicts the knob's flag, or an earlier key=value, is refused: neither silently wins (as git,
    click and Ultralytics' own CLI refuse or warn)."""
    changes: dict[str, Any] = {}
    rest = []
    for key, value in ov.extra:
        if key in FROM_ULTRALYTICS:
            if key == "cache":
                value = {True: "ram", False: "none"}.get(value, value)
            name = FROM_ULTRALYTICS[key]
            _refuse_contradiction(name, key, getattr(ov, name), changes.get(name), value)
            changes[name] = value
        else:
            rest.append((key, value))
    return replace(ov, extra=tuple(rest), **changes)


def _refuse_contradiction(name: str, key: str, flag_value: Any, earlier: Any, value: Any) -> None:
    """One line when `key=value` sets knob `name` to another value than its flag or an earlier `key=`."""
    flag = BY_NAME[name].flag
    if flag_value is not None and str(flag_value) != str(value):
        raise UsageError(f"{flag} {flag_value} and {key}={value} set the same thing to different values; give one")
    if earlier is not None and str(earlier) != str(value):
        raise UsageError(f"{key}={earlier} and {key}={value} are given twice with different values; give one")


def _check_type(key: str, raw: str, value: Any, default: Any) -> None:
    """Ultralytics' own rule for an argument's type, from its default (cfg/default.yaml): a boolean stays a
    boolean, a number a number, a whole number whole; checked here so that training never starts with lr0=abc."""
    if value is None:
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"{key}={raw}: expected True or False")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{key}={raw}: expected a whole number (default {default})")
    elif isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise UsageError(f"{key}={raw}: expected a number (default {default})")


def parse_extra_args(tokens: list[str], known: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Parse yolo-CLI style key=value tokens, checked against Ultralytics' own argument names."""

    out = []
    for token in tokens:
        key, sep, raw = token.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UsageError(f"unexpected argument {token!r}: extra Ultralytics arguments look like key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.append(_checked_arg(key, raw, value, known))
    return tuple(out)


def check_extra_args(args: dict[str, Any], known: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Python keyword arguments for Ultralytics (the API's **args), checked like key=value on the command line."""
    return tuple(_checked_arg(key, repr(value), value, known) for key, value in args.items())


def _checked_arg(key: str, raw: str, value: Any, known: dict[str, Any]) -> tuple[str, Any]:
    if key in RESERVED_ARGS:
        option = RESERVED_ARGS[key]
        raise UsageError(f"{key}= is set by speedtrain" + (f"; use {said(option)}" if option else ""))
    if key not in known:
        close = closest(key, known)
        hint = f"; did you mean {' or '.join(c + '=' for c in close)}?" if close else ""
        raise UsageError(f"{key}= is not an Ultralytics train argument{hint}")
    _check_type(key, raw, value, known[key])
    return key, value


# --- the fine-tune's rule, run after the main stage ---------------------------------------------------------------


def skip_reason(
    stage: Stage,
    done: list[StageResult],
    target_map: float | None,
    decide: Callable[[StageResult], bool | None] | None,
) -> str:
    if stage.when == "always" or not done:
        return ""
    main = done[0]
    if stage.when == "auto":
        return finetune_skip_reason(main, stage.imgsz, target_map)
    answer = decide(main) if decide else None
    if answer is None:  # nobody to ask: decided as auto decides
        why = finetune_skip_reason(main, stage.imgsz, target_map)
        return f"not asked (no interactive terminal) and, as auto decides, {why}" if why else ""
    return "" if answer else "declined at the prompt"


def finetune_skip_reason(main: StageResult, imgsz: int, target_map: float | None) -> str:
    """--finetune auto: why the fine-tune at `imgsz` is not needed, or "" when it runs.

    It runs when the main stage's best weights lose accuracy at the larger size: their mAP50-95 there is more than
    FINETUNE_LAG (relative) under their mAP50-95 at their own size. When either is unknown it runs."""
    own, there = main.score_at(main.imgsz), main.score_at(imgsz)
    if own is None or there is None:
        return ""
    if target_map is not None and there >= target_map:
        return f"main stage mAP50-95 at {imgsz} px is {there:.3f}, at or above --target-map {target_map}"
    if own <= 0 and there <= 0:
        return f"the main stage's weights score 0 mAP50-95 at {main.imgsz} and at {imgsz} px: nothing to refine yet"
    if there >= own * (1 - FINETUNE_LAG):
        return (
            f"the main stage's weights score {there:.3f} mAP50-95 at {imgsz} px against {own:.3f} at "
            f"{main.imgsz}: they already carry over (a fine-tune runs when they lose over {FINETUNE_LAG:.0%})"
        )
    return ""
