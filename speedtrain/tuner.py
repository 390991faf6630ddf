"""Measured auto-tune: time the model's training step per batch size and the real dataloader per workers/cache.

The end-to-end rate of a configuration is bounded by the slower of the two. The plan's own configuration is
always measured, and another one replaces it only when it is predicted faster by more than the measurements'
own noise (twice the combined standard error of the two predictions, from the spread of the timed steps and
batches), and then only when a short real training run of it is not slower than the same run of the plan.
Among the configurations that beat the plan, the fastest wins, preferring fewer workers, less cache memory and
then the larger batch within 5%. Results are cached per machine, dataset, model and image size. Imports torch
and ultralytics inside functions only.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil

from speedtrain.dataset import DatasetStats
from speedtrain.hardware import HardwareSnapshot
from speedtrain.knobs import Cache, Stage, said
from speedtrain.oom import is_oom
from speedtrain.planner import ram_cache_need_gb
from speedtrain.records import LoaderProbe, StepProbe, TuneResult
from speedtrain.runner import StageContext, train_stage
from speedtrain.util import torch_threads_restored, write_atomic

Log = Callable[[str], None]
TIE = 0.05  # among configurations that beat the plan, those within 5% of the best predicted rate count as ties
NOISE_SIGMAS = 2.0  # a challenger must beat the plan by this many combined standard errors (about 95%)
CACHE_MEMORY_RANK = {False: 0, "disk": 1, "ram": 2}  # on a tie, the cache that holds the least memory wins
GPU_BATCHES = (8, 16, 32, 48, 64, 96, 128)
CPU_BATCHES = (2, 4, 8, 16)
WORKER_CANDIDATES = (2, 4, 8, 12, 16)
PROBE_IMAGES = {"gpu": 512, "cpu": 48}  # the loader and confirm probes use at most this many training images
LOADER_SECONDS = {"gpu": 4.0, "cpu": 1.5}  # each loader configuration is timed this long (at least 3 batches)
TIMED_STEPS = {"gpu": 8, "cpu": 3}  # after 2 warm-up steps; at least 3, so that their spread can be measured


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
        "version": _version(),
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
        log(f"tune: using the result measured {cached.created_at} ({said('retune')} measures again)")
        return cached
    t0 = time.perf_counter()
    on_gpu = stage.on_gpu
    # The probes take at most 60% of the budget when two short confirming runs follow, all of it otherwise.
    deadline = t0 + budget_s * (0.6 if confirm else 1.0)
    steps = probe_steps(stage, model_source, on_gpu, t0 + budget_s * (0.3 if confirm else 0.5), log)
    loaders = probe_loaders(stage, data_yaml, hw, stats, on_gpu, deadline, log)
    result = decide(stage, steps, loaders, stats)
    if confirm and project is not None and result.predicted_images_per_s:
        trial = functools.partial(
            _confirm, model_source=model_source, data_yaml=data_yaml, project=project, stats=stats
        )
        result = confirm_against_plan(stage, result, trial, log)
        if on_gpu and result.bound == "data" and stage.pipeline != "fast":
            result = confirm_fast_pipeline(stage, result, trial, log)
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
    """Time forward + loss + backward + Adam step of the real model on batches already on the device.

    The plan's own per-GPU batch is always timed (first, so that a short budget still measures it), then the
    candidate sizes in order up to the first out-of-memory one.
    """

    with torch_threads_restored(stage.threads):
        return _probe_steps(stage, model_source, on_gpu, deadline, log)


def _probe_steps(stage: Stage, model_source: str, on_gpu: bool, deadline: float, log: Log) -> tuple[StepProbe, ...]:
    import torch

    from speedtrain import ultra

    device = torch.device(f"cuda:{stage.gpu_ids[0]}" if on_gpu else "cpu")
    model = ultra.step_model(model_source, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=on_gpu)
    planned = _plan_batch(stage)
    results: dict[int, StepProbe] = {}
    for batch in (planned, *sorted(set(GPU_BATCHES if on_gpu else CPU_BATCHES) - {planned})):
        if results and time.perf_counter() > deadline:
            break
        probe = _time_steps(model, optimizer, scaler, batch, stage.imgsz, device, on_gpu)
        results[batch] = probe
        log(f"tune: step batch {batch}: " + ("out of memory" if probe.oom else f"{probe.images_per_s} img/s"))
        if probe.oom and batch != planned:
            break
    del model, optimizer
    _free(on_gpu)
    return tuple(results[b] for b in sorted(results))


def _plan_batch(stage: Stage) -> int:
    """The plan's batch per GPU (the step probe runs on one GPU)."""
    gpus = max(1, len(stage.gpu_ids))
    return max(1, stage.batch // gpus)


def _time_steps(model: Any, optimizer: Any, scaler: Any, batch: int, imgsz: int, device: Any, amp: bool) -> StepProbe:
    import torch

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
        times = []
        for i in range(2 + TIMED_STEPS["gpu" if amp else "cpu"]):  # 2 warm-up steps, then timed ones
            _sync(amp)
            t0 = time.perf_counter()
            with torch.autocast(device.type, enabled=amp):
                loss, _ = model.loss(data)
            scaler.scale(loss.sum()).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            _sync(amp)  # one sync per step: each step's own time, so that their spread is the noise
            if i >= 2:
                times.append(time.perf_counter() - t0)
        rate = round(batch * len(times) / sum(times), 1)
        peak = round(torch.cuda.max_memory_reserved(device) / 1024**3, 2) if amp else None
        return StepProbe(batch, rate, peak, rel_err=relative_error(times))
    except Exception as exc:
        if not is_oom(exc):
            raise
        optimizer.zero_grad(set_to_none=True)
        return StepProbe(batch, None, None, oom=True)
    finally:
        del data
        _free(amp)


def relative_error(samples: list[float]) -> float:
    """Standard error of the mean of `samples`, relative to the mean (0 for fewer than two samples)."""
    if len(samples) < 2 or statistics.fmean(samples) <= 0:
        return 0.0
    return round(statistics.stdev(samples) / statistics.fmean(samples) / math.sqrt(len(samples)), 4)


def probe_loaders(
    stage: Stage,
    data_yaml: str | Path,
    hw: HardwareSnapshot,
    stats: DatasetStats,
    on_gpu: bool,
    deadline: float,
    log: Log,
) -> tuple[LoaderProbe, ...]:
    """Iterate Ultralytics' real training dataloader (augmentation included) per worker count and cache mode.

    The plan's own workers and cache are measured first, so that a short budget still times the plan.
    """

    n_gpus = max(1, len(stage.gpu_ids))
    workers = [w for w in WORKER_CANDIDATES if w <= hw.cpu_cores_logical // n_gpus] if on_gpu else [0]
    caches: list[Cache] = [False, "disk"]
    if ram_cache_need_gb(hw, stats, stage.imgsz, max(workers or [0]), n_gpus) <= hw.ram_available_gb:
        caches.append("ram")
    planned = (stage.workers if on_gpu else 0, stage.cache)
    combos = [planned, *((w, c) for c in caches for w in workers or [0] if (w, c) != planned)]
    results: list[LoaderProbe] = []
    for w, cache in combos:
        if results and time.perf_counter() > deadline:
            break
        probe = _time_loader(stage, data_yaml, stats, w, cache, on_gpu, deadline)
        results.append(probe)
        log(f"tune: loader {w} workers, cache {cache or 'none'}: {probe.images_per_s} img/s")
    return tuple(results)


def _time_loader(
    stage: Stage,
    data_yaml: str | Path,
    stats: DatasetStats,
    workers: int,
    cache: Cache,
    on_gpu: bool,
    deadline: float,
) -> LoaderProbe:
    from speedtrain import ultra

    limit = PROBE_IMAGES["gpu" if on_gpu else "cpu"]
    fraction = min(1.0, limit / max(stats.train_images, 1))
    overrides = {**dict(stage.extra), "imgsz": stage.imgsz, "cache": cache, "rect": stage.rect, "fraction": fraction}
    loader = ultra.train_loader(data_yaml, overrides, stage.batch, workers, stage.rect)
    proc = psutil.Process()
    peak, images, t0, last = 0.0, 0, 0.0, 0.0
    gaps: list[float] = []  # seconds per image between consecutive batches: their spread is the noise
    enough = LOADER_SECONDS["gpu" if on_gpu else "cpu"]
    try:
        while True:  # passes over the (sliced) training set until enough batches were timed
            for batch in loader:
                now = time.perf_counter()
                if not t0:  # the first batch pays for starting the workers: timing starts after it
                    t0 = last = now
                    continue
                images += len(batch["img"])
                gaps.append((now - last) / max(1, len(batch["img"])))
                last = now
                peak = max(peak, _tree_rss_gb(proc))
                if len(gaps) >= 3 and (now - t0 > enough or now > deadline):
                    break
            else:
                continue
            break
    finally:
        if hasattr(loader, "close"):
            loader.close()
    elapsed = last - t0 if t0 else 0.0
    rate = round(images / elapsed, 1) if elapsed > 0 else 0.0
    return LoaderProbe(workers, cache, rate, round(peak, 2), rel_err=relative_error(gaps))


@dataclass(frozen=True, slots=True)
class _Option:
    rate: float  # predicted images/s on one GPU (or the CPU)
    rel_err: float  # its relative standard error
    step: StepProbe
    loader: LoaderProbe


def decide(
    stage: Stage, steps: tuple[StepProbe, ...], loaders: tuple[LoaderProbe, ...], stats: DatasetStats
) -> TuneResult:
    """Keep the plan's configuration unless another is predicted faster by more than the measurements' noise."""
    timed = [s for s in steps if s.images_per_s]
    gpus = max(1, len(stage.gpu_ids))
    plan_key = (_plan_batch(stage), stage.workers if stage.on_gpu else 0, stage.cache)
    if not timed or not loaders:
        why = "the probes ran out of time or memory; the plan stays as it was"
        return TuneResult(
            "",
            stage.device,
            "",
            stage.imgsz,
            steps,
            loaders,
            stage.batch,
            stage.workers,
            stage.cache,
            0.0,
            "unknown",
            1.0,
            (why,),
            kept_plan=True,
            plan_batch=stage.batch,
            plan_workers=plan_key[1],
            plan_cache=stage.cache,
        )
    options = [_option(s, x) for s in timed for x in loaders]
    incumbent = next((o for o in options if (o.step.batch, o.loader.workers, o.loader.cache) == plan_key), None)
    chosen = _chosen(options, incumbent)
    data_bound, factor = _bound(chosen)
    diagnosis = _diagnose(data_bound, factor, chosen.step, steps, stats, stage)
    if incumbent is not None:
        diagnosis.insert(0, _against_plan(chosen, incumbent, options, gpus))
    return TuneResult(
        fingerprint="",
        device=stage.device,
        model="",
        imgsz=stage.imgsz,
        steps=steps,
        loaders=loaders,
        batch=chosen.step.batch * gpus,  # the step probe runs on one GPU; DDP splits the total batch across them
        workers=chosen.loader.workers,
        cache=chosen.loader.cache,
        predicted_images_per_s=round(chosen.rate * gpus, 1),
        bound="data" if data_bound else "compute",
        bound_factor=factor,
        diagnosis=tuple(diagnosis),
        plan_predicted_images_per_s=round(incumbent.rate * gpus, 1) if incumbent else None,
        kept_plan=chosen is incumbent,
        plan_batch=stage.batch,
        plan_workers=plan_key[1],
        plan_cache=stage.cache,
    )


def _chosen(options: list[_Option], incumbent: _Option | None) -> _Option:
    """The plan's configuration, unless another beats it by more than the noise; the fastest when the plan's could
    not be timed (out of memory, or no time)."""
    if incumbent is None:
        return _best(options)
    challengers = [o for o in options if o.rate > incumbent.rate * (1 + beat_margin(incumbent, o))]
    return _best(challengers) if challengers else incumbent


def _bound(chosen: _Option) -> tuple[bool, float]:
    """(data-bound, how many times faster the other side could go) for the chosen configuration."""
    step_rate, load_rate = chosen.step.images_per_s or 0.0, chosen.loader.images_per_s
    data_bound = load_rate < step_rate
    if not min(step_rate, load_rate):
        return data_bound, 1.0
    return data_bound, round(step_rate / load_rate if data_bound else load_rate / step_rate, 2)


def _option(step: StepProbe, loader: LoaderProbe) -> _Option:
    step_rate = step.images_per_s or 0.0
    rate = predicted_rate(step_rate, loader)
    if loader.workers > 0:  # the slower side sets the pace, and its noise
        err = step.rel_err if step_rate <= loader.images_per_s else loader.rel_err
    elif rate > 0:  # 1/r = 1/s + 1/l: each side's error weighs by its share of the time
        err = math.hypot(rate / step_rate * step.rel_err, rate / loader.images_per_s * loader.rel_err)
    else:
        err = 0.0
    return _Option(rate, err, step, loader)


def beat_margin(incumbent: _Option, challenger: _Option) -> float:
    """How much faster (relative) a challenger must be predicted to replace the plan: NOISE_SIGMAS standard
    errors of the difference of two independent measurements."""
    return NOISE_SIGMAS * math.hypot(incumbent.rel_err, challenger.rel_err)


def _best(options: list[_Option]) -> _Option:
    """The fastest; within TIE of it, fewer workers, then less cache memory, then the LARGER batch: it fits (the
    probe ran it) and amortises per-iteration costs the step probe leaves out (EMA, logging, loader overhead);
    measured on the 2-core VM, batch 2 from a flat CPU probe trained at 8.3 img/s where batch 16 trained at 10.2."""
    best = max(o.rate for o in options)
    close = [o for o in options if o.rate >= best * (1 - TIE)]
    return min(close, key=lambda o: (o.loader.workers, CACHE_MEMORY_RANK[o.loader.cache], -o.step.batch))


def _against_plan(chosen: _Option, plan: _Option, options: list[_Option], gpus: int) -> str:
    """One line: why the plan's configuration was kept or replaced."""
    plan_text = f"batch {plan.step.batch * gpus}, {plan.loader.workers} workers, cache {plan.loader.cache or 'none'}"
    if chosen is not plan:
        gain = chosen.rate / plan.rate - 1 if plan.rate else 0.0
        return (
            f"beats the plan ({plan_text}: {plan.rate * gpus:.1f} img/s predicted) by {gain:.0%}, more than the "
            f"measurement noise (+-{beat_margin(plan, chosen):.0%})"
        )
    rival = max((o for o in options if o is not plan), key=lambda o: o.rate, default=None)
    if rival is None or rival.rate <= plan.rate:
        return f"kept the plan ({plan_text}): nothing measured faster"
    gain = rival.rate / plan.rate - 1
    return (
        f"kept the plan ({plan_text}): the fastest other (batch {rival.step.batch * gpus}, {rival.loader.workers} "
        f"workers, cache {rival.loader.cache or 'none'}) was {gain:.0%} faster, within the measurement noise "
        f"(+-{beat_margin(plan, rival):.0%})"
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
    where = "the GPU" if stage.on_gpu else "the CPU"
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


Trial = Callable[[Stage, int, int, "str | bool"], "float | None"]  # (stage, batch, workers, cache) -> images/s


def confirm_against_plan(stage: Stage, result: TuneResult, trial: Trial, log: Log) -> TuneResult:
    """A short real training pass with the winner, and (when it is not the plan) the same with the plan; the
    plan's configuration stays unless the winner's pass is at least as fast."""
    achieved = trial(stage, result.batch, result.workers, result.cache)
    result = replace(result, achieved_images_per_s=achieved)
    if result.kept_plan:
        return replace(result, plan_achieved_images_per_s=achieved)
    plan_rate = trial(stage, stage.batch, result.plan_workers, stage.cache)
    result = replace(result, plan_achieved_images_per_s=plan_rate)
    log(f"tune: confirming runs: tuned {achieved} img/s, plan {plan_rate} img/s")
    if achieved is None or plan_rate is None or achieved >= plan_rate:
        return result
    line = (
        f"kept the plan: in a short real run the tuned configuration trained at {achieved} img/s, the plan's at "
        f"{plan_rate} img/s"
    )
    return replace(
        result,
        batch=stage.batch,
        workers=result.plan_workers,
        cache=stage.cache,
        predicted_images_per_s=result.plan_predicted_images_per_s or result.predicted_images_per_s,
        achieved_images_per_s=plan_rate,
        kept_plan=True,
        diagnosis=(line, *result.diagnosis[1:]),
    )


def confirm_fast_pipeline(stage: Stage, result: TuneResult, trial: Trial, log: Log) -> TuneResult:
    """A data-bound GPU run: the same short real run with --pipeline fast; it is chosen only if measured faster."""
    fast = trial(replace(stage, pipeline="fast", rect=False), result.batch, result.workers, result.cache)
    base = result.achieved_images_per_s
    log(f"tune: the fast pipeline trained at {fast} img/s, Ultralytics' at {base} img/s")
    faster = bool(fast and base and fast > base)
    line = f"fast pipeline: {fast} img/s against Ultralytics' pipeline's {base} img/s in the same short run: " + (
        "chosen" if faster else "not chosen, it is not faster here"
    )
    return replace(result, fast_achieved_images_per_s=fast, diagnosis=(*result.diagnosis, line))


def fast_pipeline_faster(result: TuneResult) -> bool:
    """True when the confirming runs measured the fast pipeline faster than Ultralytics' on this machine."""
    fast, base = result.fast_achieved_images_per_s, result.achieved_images_per_s
    return bool(fast and base and fast > base)


def _confirm(
    stage: Stage,
    batch: int,
    workers: int,
    cache: Cache,
    *,
    model_source: str,
    data_yaml: str | Path,
    project: Path,
    stats: DatasetStats,
) -> float | None:
    """One epoch of real training on a slice of the training set with this configuration: its images/s."""

    limit = PROBE_IMAGES["gpu" if stage.on_gpu else "cpu"]
    extra = {**dict(stage.extra), "fraction": min(1.0, limit / max(1, stats.train_images)), "plots": False}
    trial = replace(
        stage,
        name="tune-confirm",
        epochs=1,
        batch=batch,
        workers=workers,
        cache=cache,
        extra=tuple(extra.items()),
    )
    return train_stage(trial, model_source, StageContext(data_yaml, project / ".tune-runs")).images_per_s


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

    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def _version() -> str:
    """speedtrain's installed version (part of the tune cache's key: a new version measures again)."""

    try:
        return version("speedtrain")
    except PackageNotFoundError:
        return "unknown"
