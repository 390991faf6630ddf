#!/usr/bin/env python3
"""Ultralytics' input pipeline against `--pipeline fast`, and both against the step floor.

    python benchmarks/pipeline.py [--dataset PATH] [--images N] [--epochs 3] [--imgsz 416] [--batch 48]
    python benchmarks/pipeline.py --tiny     # CI smoke run: 8 images, 64 px, 1 epoch

Same dataset copy, model, epochs, batch and seed for both rows; steady images/s (first epoch left out), GPU busy %
(NVML), CPU % (psutil, whole machine), mAP50-95 after the same number of epochs, and the step floor: the model's
forward + backward + optimizer step on batches already on the device (speedtrain tune's step probe), the rate no
input pipeline can beat. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from compare_ultralytics import COCO, REPO, copy_dataset, measure, publish

from speedtrain import prepare, runner, tune, workflow
from speedtrain.planner import Overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=COCO if COCO.is_dir() else REPO / "speedtrain" / "sample")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--imgsz", type=int, default=416)
    ap.add_argument("--batch", type=int, help="default: the plan's batch")
    ap.add_argument("--model", default="yolo26n")
    ap.add_argument("--tiny", action="store_true", help="smoke run: 8 images, 64 px, 1 epoch")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args()
    if args.tiny:
        args.images, args.epochs, args.imgsz = 8, 1, 64
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_dataset(args.dataset, args.images, Path(tmp) / "data")
        ov = Overrides(model=args.model, imgsz=args.imgsz, batch=args.batch, finetune="no", prepare="no", rect=False)
        planned = workflow.make_plan(root, ov, ["plots=False", "seed=0", "deterministic=False"])
        view = prepare.make_view(planned.stats, Path(tmp) / "view")
        weights, note = runner.resolve_model(args.model)
        base = replace(planned.plan.stages[0], epochs=args.epochs, patience=100, rect=False)
        runner.train_stage(replace(base, imgsz=64, epochs=1), weights, view, Path(tmp) / "warmup", log=lambda _: None)
        rows = {
            "Ultralytics pipeline": replace(base, pipeline="ultralytics"),
            "speedtrain --pipeline fast": replace(base, pipeline="fast"),
        }
        results = {
            name: measure(stage, weights, view, Path(tmp) / "runs" / stage.pipeline) for name, stage in rows.items()
        }
        floor = tune.probe_steps(base, weights, base.device[0].isdigit(), float("inf"), log=lambda _: None)
        at_batch = [s for s in floor if s.batch <= base.batch and s.images_per_s]
    heading = f"{args.images} images of {args.dataset.name}, {args.epochs} epochs at {args.imgsz} px"
    heading += f", batch {base.batch}, {note}"
    top = at_batch[-1] if at_batch else None
    notes = [f"step floor (batch {top.batch}, data already on the device): {top.images_per_s} img/s"] if top else []
    publish(heading, planned.hw, "pipeline", results, notes, args.out)


if __name__ == "__main__":
    main()
