#!/usr/bin/env python3
"""The pre-resized copy's JPEG quality: its size on disk and what a trained model scores on it, quality by quality.

    python benchmarks/jpeg_quality.py --weights best.pt [--dataset PATH] [--size 416] [--qualities auto,95,90,85,75]
        [--out FILE] [--tiny]

Writes the dataset's copy at --size once per quality (speedtrain's own resize, into a temporary folder), then
validates the same trained weights on each copy's val split at --size with Ultralytics' validator. The weights
stay fixed, so the score moves only with what the compression took from the images: a copy that scores as the
highest quality does keeps what a model learns from. Prints a markdown table: quality, the copy's size (train and
val images), the time to write it, mAP50 and mAP50-95. `--tiny`: a smoke run on the embedded sample (COCO
photos) at 160 px, scored with COCO's ../shared/weights/yolov8n.pt.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from speedtrain import dataset, resize, ultra

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared" / "datasets" / "ppe-large"
WEIGHTS = REPO.parent / "shared" / "weights" / "yolov8n.pt"
SAMPLE = REPO / "speedtrain" / "sample"


def images_mb(stats: dataset.DatasetStats) -> float:
    """The bytes of every image file of the dataset's splits, in MB."""
    files = {f for split in stats.splits for f in split.image_files}
    return sum(os.path.getsize(f) for f in files) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, help="trained weights (.pt) to score every copy with")
    ap.add_argument("--dataset", type=Path, default=DEFAULT)
    ap.add_argument("--size", type=int, default=416)
    ap.add_argument("--qualities", default="auto,95,90,85,75", help="numbers, or auto (speedtrain's default)")
    ap.add_argument("--out", type=Path, help="also write the table here")
    ap.add_argument("--tiny", action="store_true", help="a smoke run on the embedded sample")
    a = ap.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    if a.tiny:
        a.dataset, a.weights, a.size = SAMPLE, WEIGHTS, 160
    if a.weights is None:
        ap.error("--weights: the trained weights to score every copy with")
    stats = dataset.scan(a.dataset)
    lines = [
        f"| JPEG quality | copy at {a.size} (MB) | written in (s) | mAP50 | mAP50-95 |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for q in (x.strip() for x in a.qualities.split(",")):
            t0 = time.perf_counter()
            summary = resize.resize_dataset(stats, a.size, Path(tmp) / f"q{q}", quality=q)
            took = time.perf_counter() - t0
            m = ultra.validate(
                a.weights,
                summary.yaml_path,
                imgsz=a.size,
                batch=16,
                device="cpu",
                workers=0,
                plots=False,
                verbose=False,
                project=tmp,
                name=f"val{q}",
            )
            size_mb = images_mb(dataset.scan(Path(tmp) / f"q{q}"))
            chose = "/".join(str(k) for k, _ in summary.qualities) if q == "auto" else ""
            label = f"{q} ({chose})" if chose else q
            lines.append(f"| {label} | {size_mb:.1f} | {took:.1f} | {m.box.map50:.4f} | {m.box.map:.4f} |")
            print(lines[-1], flush=True)
    setting = (
        f"\n{a.dataset.name}: {stats.train_images} train / {stats.val_images} val images, {images_mb(stats):.1f} MB "
        f"as stored; scored with {a.weights.name} at {a.size} px; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical cores"
    )
    text = "\n".join(lines) + "\n" + setting + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
