#!/usr/bin/env python3
"""Resize throughput: speedtrain's parallel resize against a single-process Pillow loop on the same images.

    python benchmarks/resize_throughput.py [--dataset PATH] [--size 416] [--repeat 3]

Copies the images (default: ../shared/datasets/coco128, else the embedded sample) to a temporary folder, then
times (a) the plain loop people write (open, EXIF transpose, LANCZOS resize, save, one process), (b) speedtrain
with one process (reduced-scale JPEG decoding and area downscaling alone), (c) speedtrain with every core. Each
is run --repeat times on a fresh output folder; the best run is reported. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

from speedtrain import dataset, resize
from speedtrain.parallel import default_workers

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared" / "datasets" / "coco128"


def pillow_loop(images: list[Path], out: Path, size: int) -> float:
    """The baseline: one process, Pillow only."""
    t0 = time.perf_counter()
    for src in images:
        with Image.open(src) as im:
            im = ImageOps.exif_transpose(im)
            r = size / max(im.size)
            if r < 1:
                im = im.resize((round(im.width * r), round(im.height * r)), Image.Resampling.LANCZOS)
            im.convert("RGB").save(out / src.name, quality=95)
    return time.perf_counter() - t0


def speedtrain_resize(stats: dataset.DatasetStats, out: Path, size: int, workers: int) -> float:
    t0 = time.perf_counter()
    summary = resize.resize_dataset(stats, size, out, workers=workers)
    assert summary.processed == len(stats.split("train").image_files), summary
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=DEFAULT if DEFAULT.is_dir() else REPO / "speedtrain" / "sample")
    ap.add_argument("--size", type=int, default=416)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        images_dir = root / "images" / "train"
        images_dir.mkdir(parents=True)
        source = sorted({Path(i) for s in dataset.scan(args.dataset).splits for i in s.image_files})
        for src in source:
            shutil.copy2(src, images_dir / src.name)
        (root / "data.yaml").write_text("train: images/train\nval: images/train\nnc: 80\n")
        stats = dataset.scan(root)
        images = sorted(images_dir.iterdir())
        cores = default_workers()
        runs: dict[str, list[float]] = {"pillow loop, 1 process": [], "speedtrain, 1 process": []}
        runs[f"speedtrain, {cores} processes"] = []
        for n in range(args.repeat):
            out = Path(tmp) / f"out{n}"
            (out / "loop").mkdir(parents=True)
            runs["pillow loop, 1 process"].append(pillow_loop(images, out / "loop", args.size))
            runs["speedtrain, 1 process"].append(speedtrain_resize(stats, out / "one", args.size, 1))
            runs[f"speedtrain, {cores} processes"].append(speedtrain_resize(stats, out / "all", args.size, cores))
        base = len(images) / min(runs["pillow loop, 1 process"])
        print(f"{len(images)} images from {args.dataset}, long side -> {args.size}; best of {args.repeat}")
        machine = platform.processor() or platform.machine()
        print(f"machine: {machine}, {cores} cores usable, Python {platform.python_version()}")
        print()
        print("| method | images/s (best) | median s | vs Pillow loop |")
        print("|---|---|---|---|")
        for name, times in runs.items():
            rate = len(images) / min(times)
            print(f"| {name} | {rate:.0f} | {statistics.median(times):.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
