"""What a RAM image cache costs the process at its peak, measured on a real fill of real photos: under the budget the
plan gives it. Ultralytics decodes the images, then packs them into one tensor; speedtrain.allocator keeps glibc
from holding the freed copies (docs/plan.md, the cache row)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import coco_images, names_80, snapshot

from speedtrain import allocator
from speedtrain.dataset import scan
from speedtrain.planner import RAM_RESERVE_GB, ram_cache_need_gb

TRAIN_IMAGES = 320  # 416-px images: about 160 MB cached, well above the process's own noise
IMGSZ = 416

FILL = """
import json, resource, sys
from speedtrain import allocator, ultra  # torch and Ultralytics imported: the process as it trains
lean = sys.argv[2] == "lean"
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if lean:
    allocator.fill_start()
loader = ultra.train_loader(sys.argv[1], {"imgsz": int(sys.argv[3]), "cache": "ram"}, 16, 0, False)
if lean:
    allocator.fill_end()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew": (peak - before) * 1024, "cache": int(loader.dataset.ims.offsets[-1])}))
"""


def _photos(root: Path) -> Path:
    """TRAIN_IMAGES real COCO photos (repeated under distinct names where fewer exist) and 4 for val."""
    photos = coco_images()
    for split, n in (("train", TRAIN_IMAGES), ("val", 4)):
        for d in ("images", "labels"):
            (root / d / split).mkdir(parents=True)
        for i in range(n):
            img, label = photos[i % len(photos)]
            os.symlink(img, root / "images" / split / f"{i:04d}_{img.name}")
            if label.exists():
                os.symlink(label, root / "labels" / split / f"{i:04d}_{label.name}")
    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": dict(enumerate(names_80()))}
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root


def _fill(data_yaml: Path, mode: str, tmp: Path) -> dict:
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp / "yolo-config")}
    out = subprocess.run(
        [sys.executable, "-c", FILL, str(data_yaml), mode, str(IMGSZ)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not allocator.tunable(), reason="speedtrain sets the allocator of glibc only")
def test_a_real_ram_cache_fill_stays_under_the_plan_s_budget(tmp_path):
    root = _photos(tmp_path / "ds")
    filled = _fill(root / "data.yaml", "lean", tmp_path)
    stats = scan(root)
    hw = snapshot(ram=64.0)
    budget = (ram_cache_need_gb(hw, stats, IMGSZ, 0, 0) - RAM_RESERVE_GB) * 1024**3  # the cache's part of it
    estimated = stats.decoded_gb(IMGSZ) * 1024**3
    assert filled["cache"] <= estimated * 1.05  # the plan's decoded-size estimate covers the cache (val included)
    # 1.2x here (the labels and the dataset's own arrays on top: 1.02x at 4,000 photos), 2.2x without the setting
    assert filled["grew"] <= 1.4 * filled["cache"], filled
    assert filled["grew"] <= budget


def test_the_cache_fill_is_wrapped_on_the_events_around_ultralytics_dataset_build():
    from speedtrain import ultra

    events = ultra.Recorder().callbacks()
    assert ultra._cache_fill_start in events["on_pretrain_routine_start"]
    assert events["on_pretrain_routine_end"] == [ultra._cache_fill_end]
