#!/usr/bin/env python3
"""Plain Ultralytics against speedtrain's plan: same dataset, model and epochs; a markdown table of what was measured.

    python benchmarks/compare_ultralytics.py [--dataset PATH] [--images N] [--epochs 3] [--model yolo26n.yaml]
    python benchmarks/compare_ultralytics.py --tiny      # CI smoke run: 8 images, 64 px, 1 epoch

Rows: (a) Ultralytics defaults (640 px, batch 16, 8 workers, no cache, SGD/auto), (b) the same with batch=-1
(Ultralytics' AutoBatch; on CPU it keeps 16), (c0) the plan with Ultralytics' own torch thread count (on CPU:
min(8, cores - 1)), (c) the speedtrain plan for this machine (main stage only), (d) the
plan after `speedtrain tune` (its probes' time is reported separately, not counted in the rate). Each
trains from the same weights on a copy of the data through speedtrain's runner, so the timing callbacks are the
same, after one unrecorded warm-up training. Steady images/s leaves out the first epoch. With --tiny every row
trains at 64 px (a smoke test of the script, not a speed comparison).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from speedtrain import planner, resize, runner, ultra, workflow
from speedtrain.planner import Overrides, Stage

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "datasets" / "coco128"


def copy_dataset(source: Path, n: int, dest: Path) -> Path:
    """The first n images (and labels) of a dataset, as train and val, in a fresh folder."""
    stats = workflow.scan_dataset(source)
    images = sorted({i for s in stats.splits for i in s.image_files})[:n]
    for split in ("train", "val"):
        (dest / "images" / split).mkdir(parents=True)
        (dest / "labels" / split).mkdir(parents=True)
    for i, image in enumerate(images):
        split = "val" if i % 4 == 3 else "train"
        shutil.copy2(image, dest / "images" / split / Path(image).name)
        label = Path(resize.label_path(image))
        if label.is_file():
            shutil.copy2(label, dest / "labels" / split / label.name)
    data = {"train": "images/train", "val": "images/val", "names": dict(enumerate(stats.names))}
    (dest / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def rows_to_run(plan: planner.TrainPlan, tuned: planner.TrainPlan, epochs: int, tiny: bool) -> dict[str, Stage]:
    main = replace(plan.stages[0], epochs=epochs, patience=100)
    gpu = plan.device != "cpu"
    defaults = replace(
        main,
        imgsz=640,
        batch=16,
        batch_fallbacks=(8,),
        workers=8,
        cache=False,
        optimizer="auto",
        lr0=0.01,
        cos_lr=False,
        close_mosaic=10,
        rect=False,
        amp=gpu,
        warmup_epochs=3.0,
        threads=None,
        deterministic=True,
    )
    rows = {
        "(a) Ultralytics defaults": defaults,
        "(b) Ultralytics batch=-1": replace(defaults, batch=-1 if gpu else 16),
        "(c0) plan, Ultralytics' torch threads": replace(main, threads=None),
        "(c) speedtrain plan": main,
        "(d) speedtrain autotune": replace(tuned.stages[0], epochs=epochs, patience=100),
    }
    if tiny:  # (c) and (d) were planned and tuned at 64 px already
        rows = {k: replace(v, imgsz=64) for k, v in rows.items()}
    return rows


def measure(stage: Stage, weights: str, data_yaml: Path, project: Path) -> dict[str, str]:
    result = runner.train_stage(stage, weights, runner.StageContext(data_yaml, project))
    times = result.epoch_times_s
    steady = result.images_per_s_steady or result.images_per_s
    return {
        "imgsz / batch / workers / cache": f"{stage.imgsz} / {result.batch} / {stage.workers} / {stage.cache or '-'}",
        "threads": str(result.threads or "-"),
        "steady img/s": f"{steady:.1f}" if steady else "-",
        "epoch s (mean)": f"{statistics.fmean(times):.1f}" if times else "-",
        "GPU busy %": f"{result.gpu_util_mean:.0f}" if result.gpu_util_mean is not None else "-",
        "CPU %": f"{result.cpu_util_mean:.0f}" if result.cpu_util_mean is not None else "-",
        "peak VRAM GB": f"{result.gpu_mem_peak_gb:.1f}" if result.gpu_mem_peak_gb is not None else "-",
        "mAP50-95": f"{result.metric('mAP50-95'):.3f}" if result.metric("mAP50-95") is not None else "-",
    }


def publish(
    heading: str, hw: Any, first_col: str, results: dict[str, dict[str, str]], notes: list[str], out: Path | None
) -> str:
    """Print (and write to `out`) a markdown table of measured rows, headed by the data and the machine."""
    gpu = ", ".join(g.name for g in hw.gpus) or f"CPU only ({hw.cpu_cores_logical} cores)"
    cols = list(next(iter(results.values())))
    lines = [
        f"{heading}; {gpu}, {hw.ram_total_gb:.0f} GB RAM, Python {platform.python_version()}",
        "",
        f"| {first_col} | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
        *(f"| {name} | " + " | ".join(r[c] for c in cols) + " |" for name, r in results.items()),
    ]
    lines += ["", *notes] if notes else []
    text = "\n".join(lines)
    print(text)
    if out:
        out.write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=COCO if COCO.is_dir() else REPO / "speedtrain" / "sample")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--model", default="yolo26n")
    ap.add_argument("--tiny", action="store_true", help="smoke run: 8 images, 64 px, 1 epoch")
    ap.add_argument("--tune-budget-s", type=float, default=60.0, help="time budget of the autotune probes")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args()
    if args.tiny:
        args.images, args.epochs = 8, 1
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_dataset(args.dataset, args.images, Path(tmp) / "data")
        ov = Overrides(model=args.model, finetune="no", prepare="no", imgsz=64 if args.tiny else None)
        planned = workflow.make_plan(root, ov, ["plots=False"])
        view = resize.make_view(planned.stats, Path(tmp) / "view")
        weights, note = ultra.resolve_model(args.model)
        budget = 20.0 if args.tiny else args.tune_budget_s
        tuned, tune_result = workflow.autotune(planned, Path(tmp) / "tune", budget_s=budget, retune=True)
        # The first training in a process pays one-off costs (thread pools, allocator, lazy imports): spend them
        # on an unrecorded run so that row order cannot bias the table.
        warm = replace(planned.plan.stages[0], imgsz=64, epochs=1)
        runner.train_stage(warm, weights, runner.StageContext(view, Path(tmp) / "runs" / "warmup"))
        results = {}
        for name, stage in rows_to_run(planned.plan, tuned.plan, args.epochs, args.tiny).items():
            results[name] = measure(stage, weights, view, Path(tmp) / "runs" / name.split(")")[0].strip("("))
    heading = f"{args.images} images of {args.dataset.name}, {args.epochs} epochs, {note}"
    tail = f"autotune: {tune_result.elapsed_s} s of probes; " + "; ".join(tune_result.diagnosis)
    publish(heading, planned.hw, "run", results, [tail], args.out)


if __name__ == "__main__":
    main()
