#!/usr/bin/env python3
"""Ultralytics' input pipeline against `--pipeline fast`, and both against the step floor.

    python benchmarks/pipeline.py [--dataset PATH] [--images N] [--epochs 3] [--imgsz 416] [--batch 48]
    python benchmarks/pipeline.py --tiny     # CI smoke run: 8 images, 64 px, 1 epoch

Same dataset copy, model, epochs, batch and seed for both rows; steady images/s (first epoch left out), GPU busy %
(NVML), CPU % (psutil, whole machine), mAP50-95 after the same number of epochs, and the step floor: the model's
forward + backward + optimizer step on batches already on the device (speedtrain tune's step probe), the rate no
input pipeline can beat. Prints a markdown table.

First, augmentation alone (`--augment-only` stops there): speedtrain's batched augmentation against kornia's
(AugmentationSequential of RandomMosaic, RandomAffine, ColorJiggle and flips with `bbox_xyxy`, when kornia is
installed; it is not a speedtrain dependency) on the same gathered batch, at 416 and 640 px for batches 16 and 64:
images/s (median of 5 after a warm-up), aten ops per batch and host-syncing ops per batch (counted with a
TorchDispatchMode), and whether a box painted a pure colour stays on its pixels.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from compare_ultralytics import COCO, REPO, copy_dataset, measure, publish

from speedtrain import pipeline, resize, runner, tuner, ultra, workflow
from speedtrain.knobs import Overrides

SYNCING = {"_local_scalar_dense", "nonzero", "item", "masked_select", "unique", "is_nonzero", "index(bool mask)"}


def _is_bool_index(args: tuple[Any, ...]) -> bool:
    import torch

    return len(args) > 1 and any(getattr(i, "dtype", None) == torch.bool for i in args[1] or ())


def op_names(fn: Any) -> list[str]:
    """The aten ops dispatched while fn() runs; boolean-mask indexing (a nonzero on CUDA) is told apart."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: list[str] = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            name = str(func.overloadpacket.__name__)
            calls.append("index(bool mask)" if name == "index" and _is_bool_index(args) else name)
            return func(*args, **(kwargs or {}))

    with Ops():
        fn()
    return calls


def count_ops(fn: Any) -> tuple[int, int]:
    """(aten ops, host-syncing ops) dispatched while fn() runs."""
    calls = op_names(fn)
    return len(calls), sum(c in SYNCING for c in calls)


def timed(fn: Any, repeats: int = 5) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def painted_batch(store: pipeline.Store, n: int) -> tuple[Any, Any]:
    """n store images (repeated), image 0 with a pure-red box labelled as its only box."""
    import numpy as np

    st = pipeline.StoreTensors.of(store, resident=True)
    h, w = (int(v) for v in store.hw[0])
    x1, y1, x2, y2 = w // 4, h // 4, w // 4 + max(8, w // 6), h // 4 + max(6, h // 8)
    st.images[0, y1:y2, x1:x2] = torch_tensor([255, 0, 0])
    st.labels[0] = 0
    st.labels[0, 0] = torch_tensor([0, x1, y1, x2, y2], float)
    st.counts[0] = 1
    return st, np.arange(n) % len(store)


def torch_tensor(values: Any, kind: Any = None) -> Any:
    import torch

    return torch.tensor(values, dtype=torch.float32 if kind is float else torch.uint8)


def red_inside(img: Any, box: Any) -> float:
    """Share of pure-red pixels of one 0-255 image inside the box (1.0: the box follows the pixels)."""
    import torch

    red = ((img - torch.tensor([255.0, 0, 0])[:, None, None]).abs() < 40).all(0)
    ys, xs = torch.nonzero(red, as_tuple=True)
    if not len(xs):
        return float("nan")
    x1, y1, x2, y2 = box.tolist()
    return float(((xs >= x1 - 1.5) & (xs <= x2 + 0.5) & (ys >= y1 - 1.5) & (ys <= y2 + 0.5)).float().mean())


def ours(st: Any, idx: Any, hyp: pipeline.Hyp, size: int) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    gathered = pipeline.gather(st, idx, hyp, True, gen)
    run = lambda: pipeline.augment(gathered, hyp, size, gen)  # noqa: E731
    # the check without the mosaic (which can put image 0's box outside the crop) and the colour jitter (which
    # moves the red), as for kornia: geometry alone
    single = pipeline.gather(st, idx[:1], hyp, False, gen)
    geometry = replace(hyp, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0)
    return run, lambda: _ours_check(pipeline.augment(single, geometry, size, gen))


def _ours_check(out: dict[str, Any]) -> float:
    boxes = out["boxes"][0][out["mask"][0]]
    red = boxes[boxes[:, 0] == 0]
    return red_inside(out["img"][0] * 255, red[0, 1:]) if len(red) else float("nan")


def kornia_aug(st: Any, idx: Any, hyp: pipeline.Hyp, size: int) -> tuple[Any, Any] | None:
    try:
        import kornia.augmentation as K  # noqa: N812
    except ImportError:
        return None
    import torch

    torch.manual_seed(0)
    imgs = st.images[torch.as_tensor(idx)].permute(0, 3, 1, 2).float() / 255
    boxes = st.labels[torch.as_tensor(idx)][..., 1:]
    aug = K.AugmentationSequential(
        K.RandomMosaic((size, size), mosaic_grid=(2, 2), p=hyp.mosaic),
        K.RandomAffine(
            hyp.degrees,
            translate=(hyp.translate, hyp.translate),
            scale=(1 - hyp.scale, 1 + hyp.scale),
            shear=hyp.shear,
            p=1.0,
            padding_mode="fill",
            fill_value=torch.full((3,), 114 / 255),
        ),
        K.ColorJiggle(brightness=hyp.hsv_v, saturation=hyp.hsv_s, hue=hyp.hsv_h, p=1.0),
        K.RandomHorizontalFlip(p=hyp.fliplr),
        K.RandomVerticalFlip(p=hyp.flipud),
        data_keys=["input", "bbox_xyxy"],
    )

    def run() -> Any:
        out, b = aug(imgs, boxes)
        # Ultralytics' filter after kornia; the sequential does not expose the boxes before its affine step, so the
        # filter's cost is counted against the output itself
        return out, b, pipeline.box_candidates(b, b)

    def check() -> float:
        # without the mosaic (which moves image 0 into another sample's quadrant), image 0's red box must follow
        geometry = [m for m in list(aug.children())[1:] if not isinstance(m, K.ColorJiggle)]
        single = K.AugmentationSequential(*geometry, data_keys=["input", "bbox_xyxy"])
        out, b = single(imgs[:1], boxes[:1])
        return red_inside(out[0] * 255, b[0, 0])

    return run, check


def augment_table(store: pipeline.Store, sizes: tuple[int, ...], batches: tuple[int, ...]) -> list[str]:
    """Augmentation alone, ours against kornia's, on one gathered batch of real photos (CPU tensors)."""
    import torch

    hyp = pipeline.Hyp(degrees=10.0, shear=2.0)  # Ultralytics' defaults plus rotation and shear: every stage runs
    lines = [
        f"Augmentation only (CPU, {torch.get_num_threads()} threads; Ultralytics' defaults plus degrees=10, "
        "shear=2; images/s median of 5):",
        "",
        "| augmentation | imgsz | batch | images/s | aten ops / batch | syncing ops / batch | red box on its pixels |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        resized = pipeline.build_store(store.files, size, Path(store.folder).parents[2] / f"aug{size}", workers=2)
        for batch in batches:
            st, idx = painted_batch(resized, batch)
            for name, make in (("speedtrain (batched torch)", ours), ("kornia AugmentationSequential", kornia_aug)):
                pair = make(st, idx, hyp, size)
                if pair is None:
                    lines.append(f"| {name} | {size} | {batch} | not installed | | | |")
                    continue
                run, check = pair
                seconds = timed(run)
                ops, syncs = count_ops(run)
                lines.append(f"| {name} | {size} | {batch} | {batch / seconds:.0f} | {ops} | {syncs} | {check():.2f} |")
    return lines


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
    ap.add_argument("--augment-only", action="store_true", help="only the augmentation table")
    args = ap.parse_args()
    if args.tiny:
        args.images, args.epochs, args.imgsz = 8, 1, 64
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_dataset(args.dataset, args.images, Path(tmp) / "data")
        source = workflow.scan_dataset(root).split("train").sources[0]
        store = pipeline.build_store(source, 64, Path(tmp) / "stores" / "s" / "x", workers=2)
        sizes, batches = ((64,), (4,)) if args.tiny else ((416, 640), (16, 64))
        aug_lines = augment_table(store, sizes, batches)
        print("\n".join(aug_lines) + "\n")
        if args.augment_only:
            if args.out:
                args.out.write_text("\n".join(aug_lines) + "\n")
            return
        ov = Overrides(model=args.model, imgsz=args.imgsz, batch=args.batch, finetune="no", prepare="no", rect=False)
        planned = workflow.make_plan(root, ov, ["plots=False", "seed=0", "deterministic=False"])
        view = resize.make_view(planned.stats, Path(tmp) / "view")
        weights, note = ultra.resolve_model(args.model)
        base = replace(planned.plan.stages[0], epochs=args.epochs, patience=100, rect=False)
        runner.train_stage(replace(base, imgsz=64, epochs=1), weights, runner.StageContext(view, Path(tmp) / "warmup"))
        rows = {
            "Ultralytics pipeline": replace(base, pipeline="ultralytics"),
            "speedtrain --pipeline fast": replace(base, pipeline="fast"),
        }
        results = {
            name: measure(stage, weights, view, Path(tmp) / "runs" / stage.pipeline) for name, stage in rows.items()
        }
        floor = tuner.probe_steps(base, weights, base.on_gpu, float("inf"), log=lambda _: None)
        at_batch = [s for s in floor if s.batch <= base.batch and s.images_per_s]
    heading = f"{args.images} images of {args.dataset.name}, {args.epochs} epochs at {args.imgsz} px"
    heading += f", batch {base.batch}, {note}"
    top = at_batch[-1] if at_batch else None
    notes = [f"step floor (batch {top.batch}, data already on the device): {top.images_per_s} img/s"] if top else []
    text = publish(heading, planned.hw, "pipeline", results, notes, None)
    if args.out:
        args.out.write_text("\n".join(aug_lines) + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
