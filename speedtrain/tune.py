"""Measured auto-tune: time the model's training step per batch size and the real dataloader per workers/cache.

The end-to-end rate of a configuration is bounded by the slower of the two; the winner is the fastest predicted
configuration, preferring fewer workers, less cache memory and then the larger batch within 5%, confirmed by a
short real run. Results are
cached per machine, dataset, model and image size. Imports torch and ultralytics inside functions only.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from speedtrain import __version__
from speedtrain.dataset import DatasetStats
from speedtrain.hardware import HardwareSnapshot
from speedtrain.planner import Stage
from speedtrain.prepare import write_atomic

Log = Callable[[str], None]
TIE = 0.05  # configurations within 5% of the best predicted rate count as ties
CACHE_MEMORY_RANK = {False: 0, "disk": 1, "ram": 2}  # on a tie, the cache that holds the least memory wins
GPU_BATCHES = (8, 16, 32, 48, 64, 96, 128)
CPU_BATCHES = (2, 4, 8, 16)
WORKER_CANDIDATES = (2, 4, 8, 12, 16)
PROBE_IMAGES = {"gpu": 512, "cpu": 48}  # the loader and confirm probes use at most this many training images
LOADER_SECONDS = {"gpu": 4.0, "cpu": 1.5}  # each loader configuration is timed this long (at least 3 batches)


@dataclass(frozen=True, slots=True)
class StepProbe:
    batch: int
    images_per_s: float | None  # None: out of memory, or the budget ran out before it was timed
    peak_mem_gb: float | None
    oom: bool = False


@dataclass(frozen=True, slots=True)
class LoaderProbe:
    workers: int
    cache: str | bool
    images_per_s: float
    peak_ram_gb: float


@dataclass(frozen=True, slots=True)
class TuneResult:
    fingerprint: str
    device: str
    model: str
    imgsz: int
    steps: tuple[StepProbe, ...]
    loaders: tuple[LoaderProbe, ...]
    batch: int
    workers: int
    cache: str | bool
    predicted_images_per_s: float
    bound: str  # "data" or "compute": which side sets the pace at the chosen configuration
    bound_factor: float  # how many times faster the other side could go
    diagnosis: tuple[str, ...]
    achieved_images_per_s: float | None = None  # the confirming short run
    elapsed_s: float = 0.0
    budget_s: float = 0.0
    created_at: str = ""
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps"] = [asdict(s) for s in self.steps]
        data["loaders"] = [asdict(x) for x in self.loaders]
        data["diagnosis"] = list(self.diagnosis)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneResult:
        data = dict(data)
        data["steps"] = tuple(StepProbe(**s) for s in data["steps"])
        data["loaders"] = tuple(LoaderProbe(**x) for x in data["loaders"])
        data["diagnosis"] = tuple(data["diagnosis"])
        return cls(**data)


def fingerprint(hw: HardwareSnapshot, stats: DatasetStats, model: str, imgsz: int, device: str) -> str:
    """Same machine, same dataset (images and their bytes), same model, size and device: same tune result."""
    train = stats.split("train")
    files = train.image_files if train else ()
    size = sum(Path(f).stat().st_size for f in files if Path(f).exists())
    key = {
        "gpus": [(g.name, round(g.total_vram_gb)) for g in hw.gpus],
        "cores": hw.cpu_cores_logical,
        "ram": round(hw.ram_total_gb),
        "dataset": [stats.root, len(files), size],
        "model": model,
        "imgsz": imgsz,
        "device": device,
        "version": __version__,
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_cached(cache_dir: Path, key: str) -> TuneResult | None:
    path = cache_dir / f"{key}.json"
    try:
        return replace(TuneResult.from_dict(json.loads(path.read_text(encoding="utf-8"))), cached=True)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def tune(
    stage: Stage,
    model_source: str,
    data_yaml: str | Path,
    hw: HardwareSnapshot,
    stats: DatasetStats,
    *,
    budget_s: float = 90.0,
    cache_dir: Path,
    retune: bool = False,
    confirm: bool = True,
    project: Path | None = None,
    log: Log = lambda _: None,
) -> TuneResult:
    """Probe, decide, confirm and cache; a cached result for the same fingerprint is returned unless `retune`."""
    key = fingerprint(hw, stats, model_source, stage.imgsz, stage.device)
    if not retune and (cached := load_cached(cache_dir, key)):
        log(f"tune: using the result measured {cached.created_at} (--retune measures again)")
        return cached
    t0 = time.perf_counter()
    on_gpu = stage.device[0].isdigit()
    deadline = t0 + budget_s * (0.8 if confirm else 1.0)
    steps = probe_steps(stage, model_source, on_gpu, t0 + budget_s * 0.4, log)
    loaders = probe_loaders(stage, data_yaml, hw, stats, on_gpu, deadline, log)
    result = decide(stage, steps, loaders, stats)
    if confirm and project is not None:
        achieved = _confirm(stage, result, model_source, data_yaml, project, stats)
        result = replace(result, achieved_images_per_s=achieved)
    result = replace(
        result,
        fingerprint=key,
        model=model_source,
        elapsed_s=round(time.perf_counter() - t0, 1),
        budget_s=budget_s,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    write_atomic(cache_dir / f"{key}.json", (json.dumps(result.to_dict(), indent=2) + "\n").encode())
    return result


def probe_steps(stage: Stage, model_source: str, on_gpu: bool, deadline: float, log: Log) -> tuple[StepProbe, ...]:
    """Time forward + loss + backward + Adam step of the real model on batches already on the device."""
    import torch
    from ultralytics import YOLO
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    device = torch.device(f"cuda:{stage.device.split(',')[0]}" if on_gpu else "cpu")
    model = YOLO(model_source).model.to(device)
    model.args = get_cfg(DEFAULT_CFG)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=on_gpu)
    results = []
    for batch in GPU_BATCHES if on_gpu else CPU_BATCHES:
        if time.perf_counter() > deadline:
            break
        probe = _time_steps(model, optimizer, scaler, batch, stage.imgsz, device, on_gpu)
        results.append(probe)
        log(f"tune: step batch {batch}: " + ("out of memory" if probe.oom else f"{probe.images_per_s} img/s"))
        if probe.oom:
            break
    del model, optimizer
    _free(on_gpu)
    return tuple(results)


def _time_steps(model: Any, optimizer: Any, scaler: Any, batch: int, imgsz: int, device: Any, amp: bool) -> StepProbe:
    import torch

    from speedtrain.runner import is_oom

    g = torch.Generator().manual_seed(0)
    n = batch * 4  # four boxes per image, COCO-like
    data = {
        "img": torch.rand(batch, 3, imgsz, imgsz, generator=g).to(device),
        "cls": torch.randint(0, 80, (n, 1), generator=g).float().to(device),
        "bboxes": (torch.rand(n, 4, generator=g) * 0.5 + 0.25).to(device),
        "batch_idx": torch.arange(batch).repeat_interleave(4).float().to(device),
    }
    if amp:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        timed, t0 = 0, 0.0
        for i in range(2 + (8 if amp else 2)):  # 2 warm-up steps, then timed ones
            if i == 2:
                _sync(amp)
                t0 = time.perf_counter()
            with torch.autocast(device.type, enabled=amp):
                loss, _ = model.loss(data)
            scaler.scale(loss.sum()).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            timed += i >= 2
        _sync(amp)
        rate = round(batch * timed / (time.perf_counter() - t0), 1)
        peak = round(torch.cuda.max_memory_reserved(device) / 1024**3, 2) if amp else None
        return StepProbe(batch, rate, peak)
    except Exception as exc:
        if not is_oom(exc):
            raise
        optimizer.zero_grad(set_to_none=True)
        return StepProbe(batch, None, None, oom=True)
    finally:
        del data
        _free(amp)


def probe_loaders(
    stage: Stage,
    data_yaml: str | Path,
    hw: HardwareSnapshot,
    stats: DatasetStats,
    on_gpu: bool,
    deadline: float,
    log: Log,
) -> tuple[LoaderProbe, ...]:
    """Iterate Ultralytics' real training dataloader (augmentation included) per worker count and cache mode."""
    from speedtrain.planner import ram_cache_need_gb

    n_gpus = max(1, len(stage.device.split(","))) if on_gpu else 1
    workers = [w for w in WORKER_CANDIDATES if w <= hw.cpu_cores_logical // n_gpus] if on_gpu else [0]
    caches: list[str | bool] = [False, "disk"]
    if ram_cache_need_gb(stats, stage.imgsz, max(workers or [0]), n_gpus) <= hw.ram_available_gb:
        caches.append("ram")
    results = []
    for cache in caches:
        for w in workers or [0]:
            if time.perf_counter() > deadline:
                return tuple(results)
            probe = _time_loader(stage, data_yaml, stats, w, cache, on_gpu, deadline)
            results.append(probe)
            log(f"tune: loader {w} workers, cache {cache or 'none'}: {probe.images_per_s} img/s")
    return tuple(results)


def _time_loader(
    stage: Stage,
    data_yaml: str | Path,
    stats: DatasetStats,
    workers: int,
    cache: str | bool,
    on_gpu: bool,
    deadline: float,
) -> LoaderProbe:
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import DEFAULT_CFG

    data = check_det_dataset(str(data_yaml))
    limit = PROBE_IMAGES["gpu" if on_gpu else "cpu"]
    fraction = min(1.0, limit / max(stats.train_images, 1))
    overrides = {**dict(stage.extra), "imgsz": stage.imgsz, "cache": cache, "rect": stage.rect, "fraction": fraction}
    cfg = get_cfg(DEFAULT_CFG, overrides={k: v for k, v in overrides.items() if k in DEFAULT_CFG.__dict__})
    dataset = build_yolo_dataset(cfg, data["train"], stage.batch, data, mode="train", rect=stage.rect, stride=32)
    loader = build_dataloader(dataset, stage.batch, workers, shuffle=not stage.rect, rank=-1, device="cpu")
    proc = psutil.Process()
    peak, images, batches, t0 = 0.0, 0, 0, 0.0
    enough = LOADER_SECONDS["gpu" if on_gpu else "cpu"]
    try:
        while True:  # passes over the (sliced) training set until enough batches were timed
            for batch in loader:
                if not t0:  # the first batch pays for starting the workers: timing starts after it
                    t0 = time.perf_counter()
                    continue
                images, batches = images + len(batch["img"]), batches + 1
                peak = max(peak, _tree_rss_gb(proc))
                elapsed = time.perf_counter() - t0
                if batches >= 3 and (elapsed > enough or time.perf_counter() > deadline):
                    break
            else:
                continue
            break
    finally:
        if hasattr(loader, "close"):
            loader.close()
    elapsed = time.perf_counter() - t0 if t0 else 0.0
    return LoaderProbe(workers, cache, round(images / elapsed, 1) if elapsed > 0 else 0.0, round(peak, 2))


def decide(
    stage: Stage, steps: tuple[StepProbe, ...], loaders: tuple[LoaderProbe, ...], stats: DatasetStats
) -> TuneResult:
    """Pick the configuration with the best predicted rate, min(step rate, loader rate); ties prefer less."""
    timed = [s for s in steps if s.images_per_s]
    gpus = len(stage.device.split(",")) if stage.device[0].isdigit() else 1
    if not timed or not loaders:
        why = "the probes ran out of time or memory; the plan stays as it was"
        return TuneResult("", stage.device, "", stage.imgsz, steps, loaders, stage.batch, stage.workers,
                          stage.cache, 0.0, "unknown", 1.0, (why,))  # fmt: skip
    options = [(predicted_rate(s.images_per_s or 0.0, x), s, x) for s in timed for x in loaders]
    best = max(rate for rate, _, _ in options)
    close = [o for o in options if o[0] >= best * (1 - TIE)]
    # Ties: fewer workers, then less cache memory (RAM the run would hold), then the LARGER batch: it fits (the
    # probe ran it) and amortises per-iteration costs the step probe leaves out (EMA, logging, loader overhead);
    # measured on the 2-core VM, batch 2 from a flat CPU probe trained at 8.3 img/s where batch 16 trained at 10.2.
    rate, step, loader = min(close, key=lambda o: (o[2].workers, CACHE_MEMORY_RANK[o[2].cache], -o[1].batch))
    step_rate, load_rate = step.images_per_s or 0.0, loader.images_per_s
    data_bound = load_rate < step_rate
    factor = (
        round(step_rate / load_rate if data_bound else load_rate / step_rate, 2) if min(step_rate, load_rate) else 1.0
    )
    return TuneResult(
        fingerprint="",
        device=stage.device,
        model="",
        imgsz=stage.imgsz,
        steps=steps,
        loaders=loaders,
        batch=step.batch * gpus,  # the step probe runs on one GPU; DDP splits the total batch across them
        workers=loader.workers,
        cache=loader.cache,
        predicted_images_per_s=round(rate * gpus, 1),
        bound="data" if data_bound else "compute",
        bound_factor=factor,
        diagnosis=tuple(_diagnose(data_bound, factor, step, steps, stats, stage)),
    )


def predicted_rate(step_rate: float, loader: LoaderProbe) -> float:
    """End-to-end images/s: with worker processes loading overlaps the step (the slower side sets the pace);
    with 0 workers (CPU training) the same process loads, then steps, so the two times add up."""
    if loader.workers > 0:
        return min(step_rate, loader.images_per_s)
    if step_rate <= 0 or loader.images_per_s <= 0:
        return 0.0
    return 1 / (1 / step_rate + 1 / loader.images_per_s)


def _diagnose(
    data_bound: bool, factor: float, step: StepProbe, steps: tuple[StepProbe, ...], stats: DatasetStats, stage: Stage
) -> list[str]:
    where = "the GPU" if stage.device[0].isdigit() else "the CPU"
    if data_bound:
        out = [f"data-bound: the model could train {factor}x faster than the loader delivers images"]
        if stats.image_sizes.share_larger_than(round(stage.imgsz * 1.5)) > 0.5:
            out.append("pre-resize the dataset (--prepare yes): most images are much larger than the training size")
        out.append("lighter augmentation in the last epochs helps (close_mosaic=N, or mosaic=0.5)")
        out.append("more CPU cores, or a faster local disk, feed the loader faster")
        return out
    out = [f"compute-bound: {where} sets the pace; the loader could deliver {factor}x more"]
    faster = [s for s in steps if s.batch > step.batch and (s.images_per_s or 0) > (step.images_per_s or 0) * (1 + TIE)]
    if faster:  # only when the larger batch lost on the loader side or on memory
        out.append(f"a larger batch would step faster ({faster[-1].batch}: {faster[-1].images_per_s} img/s)")
    out.append("a smaller --img-size or model is the remaining lever; AMP is on where the GPU supports it")
    return out


def _confirm(
    stage: Stage, result: TuneResult, model_source: str, data_yaml: str | Path, project: Path, stats: DatasetStats
) -> float | None:
    """A short real training pass with the winner, on a slice of the training set: predicted against achieved."""
    from speedtrain.runner import train_stage

    limit = PROBE_IMAGES["gpu" if stage.device[0].isdigit() else "cpu"]
    extra = {**dict(stage.extra), "fraction": min(1.0, limit / max(1, stats.train_images)), "plots": False}
    trial = replace(
        stage, name="tune-confirm", epochs=1, batch=result.batch, workers=result.workers, cache=result.cache,
        extra=tuple(extra.items()),
    )  # fmt: skip
    return train_stage(trial, model_source, data_yaml, project / ".tune-runs", log=lambda _: None).images_per_s


def _tree_rss_gb(proc: psutil.Process) -> float:
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total / 1024**3


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _free(cuda: bool) -> None:
    import gc

    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()
