#!/usr/bin/env python3
"""Validation cadence: the same training with every epoch validated (Ultralytics' way) and with `--val-every auto`.

    python benchmarks/val_cadence.py [--dataset PATH] [--model PATH] [--train 300] [--val 200] [--img-size 416]
        [--epochs 12] [--arms 1,auto] [--out FILE] [--tiny]

Copies the first --train and --val photos of the dataset (default: ../shared/datasets/ppe-large, from
../shared/weights/yolov8n.pt) to a temporary folder: a small training split against a large validation split is
where validating every epoch costs most. Trains each arm with the same seed and prints a markdown table: the
cadence the run ended with, the epochs validated, the stage's wall time, the time spent validating, the
validation time the skipped epochs saved (an estimate from the measured validations), and the final weights'
mAP50-95 at the training size and at 640. `--tiny`: a smoke run on the embedded sample (4 epochs at 64 px).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PPE = REPO.parent / "shared" / "datasets" / "ppe-large"
WEIGHTS = REPO.parent / "shared" / "weights" / "yolov8n.pt"
SAMPLE = REPO / "speedtrain" / "sample"


def subset(source: Path, dest: Path, n_train: int, n_val: int) -> Path:
    """The first n photos of each split, with their labels, and a data.yaml with the source's names."""
    data = yaml.safe_load((source / "data.yaml").read_text())
    for split, n in (("train", n_train), ("val", n_val)):
        images = sorted((source / "images" / split).glob("*.jpg"))[:n]
        (dest / "images" / split).mkdir(parents=True)
        (dest / "labels" / split).mkdir(parents=True)
        for img in images:
            shutil.copy2(img, dest / "images" / split / img.name)
            label = source / "labels" / split / f"{img.stem}.txt"
            if label.exists():
                shutil.copy2(label, dest / "labels" / split / label.name)
    names = data["names"]
    (dest / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": names}))
    return dest


def row(arm: str, rep: object) -> list[str]:
    m = rep.main.measured  # type: ignore[attr-defined]
    validated = len(m.epoch_validated) if m.epoch_validated else len(m.epoch_map50_95)
    at640 = m.score_at(640)
    return [
        arm,
        str(m.val_every),
        f"{validated} of {m.epochs_done}",
        f"{m.wall_time_s:.0f}",
        f"{m.val_time_s:.1f}" if m.val_time_s else "-",
        f"{m.val_saved_s:.1f}" if m.val_saved_s else "-",
        f"{m.metric('mAP50-95'):.3f}",
        f"{at640:.3f}" if at640 is not None else "-",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=PPE)
    ap.add_argument("--model", default=str(WEIGHTS))
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--img-size", type=int, default=416)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--arms", default="1,auto", help="--val-every values, comma-separated")
    ap.add_argument("--out", type=Path, help="also write the table here")
    ap.add_argument("--tiny", action="store_true", help="a smoke run on the embedded sample")
    a = ap.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import speedtrain

    if a.tiny:
        a.dataset, a.model, a.train, a.val, a.img_size, a.epochs = SAMPLE, "yolo26n.yaml", 8, 8, 64, 4
    lines = [
        "| --val-every | ended with | validated | stage s | validating s | saved s (est.) | "
        f"mAP50-95 @{a.img_size} | @640 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(a.dataset, Path(tmp) / "data", a.train, a.val)
        for arm in a.arms.split(","):
            rep = speedtrain.train(
                data,
                model=a.model,
                imgsz=a.img_size,
                epochs=a.epochs,
                val_every=arm,
                finetune="no",
                prepare="no",
                project=Path(tmp) / "runs",
                name=f"val-every-{arm}",
                verbose=False,
                hooks=speedtrain.Hooks(log=lambda _: None),
                seed=0,
                plots=False,
            )
            lines.append("| " + " | ".join(row(arm, rep)) + " |")
            print(lines[-1], flush=True)
    setting = (
        f"\n{a.dataset.name}: first {a.train} train / {a.val} val photos, {a.epochs} epochs at {a.img_size} "
        f"px from {Path(a.model).name}, seed 0; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical cores"
    )
    text = "\n".join(lines) + "\n" + setting + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
