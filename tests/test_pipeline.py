"""The fast pipeline on CPU tensors and real COCO images: boxes follow pixels, mosaic, filtering, seeds, training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_benchmark, table_rows
from typer.testing import CliRunner

from speedtrain import dataset, pipeline
from speedtrain.cli import app
from speedtrain.pipeline import Hyp

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "magenta": (255, 0, 255),
}  # not in these photos
NO_AUG = Hyp(mosaic=0.0, degrees=0, translate=0, scale=0, shear=0, fliplr=0, flipud=0, hsv_h=0, hsv_s=0, hsv_v=0)


@pytest.fixture
def painted(make_dataset, tmp_path) -> pipeline.Store:
    """A store of 4 real COCO photos at 128 px, each with one box painted a pure colour and labelled alone."""
    root = make_dataset(4, 1)
    stats = dataset.scan(root)
    store = pipeline.build_store(stats.split("train").sources[0], 128, tmp_path / "store", workers=1)
    store.images = np.array(store.images)  # writable copy for painting
    for i, rgb in enumerate(COLOURS.values()):
        h, w = (int(v) for v in store.hw[i])
        x1, y1, x2, y2 = w // 4, h // 4, w // 4 + 30, h // 4 + 20
        store.images[i, y1:y2, x1:x2] = rgb
        store.labels[i] = np.array([[i, x1, y1, x2, y2]], dtype=np.float32)
    return store


def colour_mask(img: torch.Tensor, rgb: tuple[int, int, int]) -> torch.Tensor:
    """Pixels (of a 3xHxW 0-255 image) within 30 of the colour on every channel."""
    target = torch.tensor(rgb, dtype=torch.float32)[:, None, None]
    return ((img - target).abs() < 30).all(0)


def assert_colour_inside(img: torch.Tensor, box: torch.Tensor, rgb: tuple[int, int, int], tight: bool) -> None:
    """The painted colour lies inside the box. A real photo has a few pixels of nearly any colour of its own, so
    95% of the matching pixels must be inside, and the painted region's extent is read from percentiles."""
    ys, xs = torch.nonzero(colour_mask(img, rgb), as_tuple=True)
    assert len(xs) > 20, "the painted region disappeared"
    x1, y1, x2, y2 = box.tolist()
    inside = (xs >= x1 - 1.5) & (xs <= x2 + 0.5) & (ys >= y1 - 1.5) & (ys <= y2 + 0.5)
    assert inside.float().mean() >= 0.95
    if tight:  # no rotation or shear: the box is the painted region, give or take interpolation at the edges
        qx = torch.quantile(xs[inside].float(), torch.tensor([0.02, 0.98]))
        qy = torch.quantile(ys[inside].float(), torch.tensor([0.02, 0.98]))
        assert abs(qx[0] - x1) <= 2.5
        assert abs(qx[1] + 1 - x2) <= 2.5
        assert abs(qy[0] - y1) <= 2.5
        assert abs(qy[1] + 1 - y2) <= 2.5


@pytest.mark.parametrize(
    ("hyp", "tight"),
    [
        (replace(NO_AUG, translate=0.1, scale=0.5), True),
        (replace(NO_AUG, degrees=15, shear=5, scale=0.3), False),
        (replace(NO_AUG, fliplr=1.0), True),
        (replace(NO_AUG, flipud=1.0), True),
    ],
    ids=["translate-scale", "rotate-shear", "fliplr", "flipud"],
)
def test_boxes_follow_the_pixels(painted, hyp, tight):
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        imgs = torch.from_numpy(painted.images[:1].copy()).permute(0, 3, 1, 2).float()
        canvas, boxes = pipeline.letterbox(painted, [0], imgs, "cpu")
        warped, boxes = pipeline.random_affine(canvas, boxes, hyp, 128, gen)
        warped, boxes = pipeline.flips(warped, boxes, hyp, gen)
        if len(boxes[0]):  # a box pushed mostly out of the picture is dropped, like Ultralytics does
            assert_colour_inside(warped[0], boxes[0][0, 1:], COLOURS["red"], tight)


def test_mosaic_combines_four_images_with_their_boxes(painted):
    gen = torch.Generator().manual_seed(1)
    imgs = torch.from_numpy(painted.images[:1].copy()).permute(0, 3, 1, 2).float()
    canvas, boxes = pipeline.mosaic4(painted, [0], [[1, 2, 3]], imgs, gen, "cpu")
    assert canvas.shape == (1, 3, 256, 256)
    assert sorted(boxes[0][:, 0].int().tolist()) == [0, 1, 2, 3]  # one box from each of the four images
    for row in boxes[0]:
        rgb = list(COLOURS.values())[int(row[0])]
        clipped = row[1:]
        if (clipped[2] - clipped[0]) * (clipped[3] - clipped[1]) > 100:  # a tile may be cut by the canvas edge
            assert_colour_inside(canvas[0], clipped, rgb, tight=False)


def test_full_batch_in_ultralytics_format(painted):
    batch = pipeline.make_batch(painted, [0, 1, 2, 3], Hyp(), True, torch.Generator().manual_seed(0), "cpu")
    assert batch["img"].shape == (4, 3, 128, 128)
    assert batch["img"].min() >= 0
    assert batch["img"].max() <= 1
    assert batch["bboxes"].shape[1] == 4
    assert batch["cls"].shape == (len(batch["bboxes"]), 1)
    assert ((batch["bboxes"] >= 0) & (batch["bboxes"] <= 1)).all()
    assert set(batch["batch_idx"].int().tolist()) <= {0, 1, 2, 3}


def test_close_mosaic_uses_single_letterboxed_images(painted):
    hyp = replace(NO_AUG, mosaic=1.0)
    batch = pipeline.make_batch(painted, [0], hyp, False, torch.Generator().manual_seed(0), "cpu")
    assert batch["cls"].flatten().tolist() == [0.0]  # only its own box: no other image was mixed in
    img = batch["img"][0] * 255
    box = batch["bboxes"][0] * 128
    xyxy = torch.stack([box[0] - box[2] / 2, box[1] - box[3] / 2, box[0] + box[2] / 2, box[1] + box[3] / 2])
    assert_colour_inside(img, xyxy, COLOURS["red"], tight=True)


def test_identical_seeds_give_identical_batches(painted):
    a = pipeline.make_batch(painted, [0, 1, 2, 3], Hyp(degrees=10), True, torch.Generator().manual_seed(7), "cpu")
    b = pipeline.make_batch(painted, [0, 1, 2, 3], Hyp(degrees=10), True, torch.Generator().manual_seed(7), "cpu")
    c = pipeline.make_batch(painted, [0, 1, 2, 3], Hyp(degrees=10), True, torch.Generator().manual_seed(8), "cpu")
    assert torch.equal(a["img"], b["img"])
    assert torch.equal(a["bboxes"], b["bboxes"])
    assert not torch.equal(a["img"], c["img"])


def test_box_filter_matches_ultralytics():
    from ultralytics.data.augment import RandomPerspective

    g = torch.Generator().manual_seed(0)
    before = torch.rand(500, 4, generator=g) * 100
    before[:, 2:] += before[:, :2]
    after = before * (torch.rand(500, 1, generator=g) * 1.5) + torch.rand(500, 4, generator=g) * 3
    ours = pipeline.box_candidates(before, after).numpy()
    theirs = RandomPerspective().box_candidates(before.numpy().T, after.numpy().T)
    assert ours.tolist() == theirs.tolist()
    assert 0 < ours.sum() < len(ours)  # the sample exercises both outcomes


def test_hsv_changes_colours_within_range_and_zero_gain_is_identity(painted):
    imgs = torch.from_numpy(painted.images[:2].copy()).permute(0, 3, 1, 2).float()
    assert torch.equal(pipeline.hsv(imgs, NO_AUG, torch.Generator().manual_seed(0)), imgs)
    out = pipeline.hsv(imgs, Hyp(hsv_h=0.5, hsv_s=0.7, hsv_v=0.4), torch.Generator().manual_seed(0))
    assert out.shape == imgs.shape
    assert out.min() >= 0
    assert out.max() <= 255.01
    assert (out - imgs).abs().mean() > 5


def test_store_is_reused_and_rebuilt_when_images_change(make_dataset, tmp_path):
    root = make_dataset(3, 1)
    source = dataset.scan(root).split("train").sources[0]
    first = pipeline.build_store(source, 64, tmp_path / "s", workers=1)
    assert pipeline.build_store(source, 64, tmp_path / "s", workers=1).folder == first.folder
    label = next((root / "labels" / "train").iterdir())
    label.write_text("0 0.5 0.5 0.2 0.2\n")
    assert pipeline.build_store(source, 64, tmp_path / "s", workers=1).folder != first.folder
    assert first.images.shape == (3, 64, 64, 3)
    assert first.size_gb > 0


@pytest.mark.slow
def test_training_with_the_fast_pipeline(make_dataset, tmp_path):
    args = ["train", "--dataset", str(make_dataset(8, 2)), "--img-size", "64", "--epochs", "2", "--finetune", "no"]
    args += [
        "--prepare",
        "no",
        "--pipeline",
        "fast",
        "--project",
        str(tmp_path / "runs"),
        "plots=False",
        "close_mosaic=1",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((tmp_path / "runs" / "train" / "speed_report.json").read_text())
    main = doc["stages"][0]
    assert (main["pipeline"], main["rect"], main["status"]) == ("fast", False, "completed")
    assert Path(main["measured"]["weights"]).is_file()
    assert main["measured"]["images_per_epoch"] == 8
    assert main["measured"]["epochs_done"] == 2
    assert doc["reasons"]["pipeline"] == "fast: set by user"


@pytest.mark.slow
def test_pipeline_benchmark_smoke(tmp_path):
    text = run_benchmark("pipeline.py", tmp_path)
    rows = table_rows(text, "Ultralytics", "speedtrain")
    assert [r[0] for r in rows] == ["Ultralytics pipeline", "speedtrain --pipeline fast"]
    assert all(float(r[2]) > 0 for r in rows)  # steady img/s measured for both pipelines
    assert "step floor" in text


def test_store_refuses_a_disk_too_small(make_dataset, tmp_path, monkeypatch):
    import shutil

    from speedtrain.errors import DiskSpaceError

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    source = dataset.scan(make_dataset(2, 1)).split("train").sources[0]
    with pytest.raises(DiskSpaceError, match="decoded store needs"):
        pipeline.build_store(source, 64, tmp_path / "s", workers=1)
    assert not (tmp_path / "s").exists()  # nothing written
