"""The fast pipeline on CPU tensors and real COCO images: boxes follow pixels, mosaic, filtering, seeds, training."""

from __future__ import annotations

import functools
import importlib
import json
import math
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_benchmark, table_rows
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


def _batch(store, indices, hyp, mosaic_on=False, seed=0):
    """make_batch in Ultralytics' flat format, plus the padded output (images 0-255) for pixel checks."""
    out = pipeline.make_batch(store, indices, hyp, mosaic_on, torch.Generator().manual_seed(seed), "cpu")
    return out, pipeline.to_ultralytics(out, [store.files[i] for i in indices])


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
        out, _ = _batch(painted, [0], hyp, seed=seed)
        boxes = out["boxes"][0][out["mask"][0]]
        if len(boxes):  # a box pushed mostly out of the picture is dropped, like Ultralytics does
            assert_colour_inside(out["img"][0] * 255, boxes[0, 1:], COLOURS["red"], tight)


def test_mosaic_combines_four_images_with_their_boxes(painted):
    """The four tiles around the centre, seen whole through a matrix that halves the 2S canvas into S."""
    st = pipeline.StoreTensors.of(painted)
    tiles = torch.tensor([[0, 1, 2, 3]])
    s = painted.imgsz
    mosaic, centre = torch.tensor([True]), torch.tensor([[150.0, 110.0]])
    offsets, used = pipeline._tile_offsets(st.hw[tiles], mosaic, centre, s)
    half = torch.tensor([[[0.5, 0, 0], [0, 0.5, 0], [0, 0, 1.0]]])
    img = pipeline.warp(st.images[tiles], offsets, used, mosaic, centre, torch.tensor([2.0 * s]), half, s)
    boxes, mask = pipeline._place_boxes(st.labels[tiles], st.counts[tiles], offsets, used, torch.tensor([2.0 * s]))
    boxes, mask = pipeline.warp_boxes(boxes, mask, half, torch.tensor([0.5]), s)
    kept = boxes[0][mask[0]]
    assert sorted(kept[:, 0].int().tolist()) == [0, 1, 2, 3]  # one box from each of the four images
    for row in kept:
        assert_colour_inside(img[0], row[1:], list(COLOURS.values())[int(row[0])], tight=False)


def test_full_batch_in_ultralytics_format(painted):
    _, batch = _batch(painted, [0, 1, 2, 3], Hyp(), mosaic_on=True)
    assert batch["img"].shape == (4, 3, 128, 128)
    assert batch["img"].min() >= 0
    assert batch["img"].max() <= 1
    assert batch["bboxes"].shape[1] == 4
    assert batch["cls"].shape == (len(batch["bboxes"]), 1)
    assert ((batch["bboxes"] >= 0) & (batch["bboxes"] <= 1)).all()
    assert set(batch["batch_idx"].int().tolist()) <= {0, 1, 2, 3}


def test_close_mosaic_uses_single_letterboxed_images(painted):
    _, batch = _batch(painted, [0], replace(NO_AUG, mosaic=1.0), mosaic_on=False)
    assert batch["cls"].flatten().tolist() == [0.0]  # only its own box: no other image was mixed in
    img = batch["img"][0] * 255
    box = batch["bboxes"][0] * 128
    xyxy = torch.stack([box[0] - box[2] / 2, box[1] - box[3] / 2, box[0] + box[2] / 2, box[1] + box[3] / 2])
    assert_colour_inside(img, xyxy, COLOURS["red"], tight=True)


def test_identical_seeds_give_identical_batches(painted):
    a, _ = _batch(painted, [0, 1, 2, 3], Hyp(degrees=10), True, seed=7)
    b, _ = _batch(painted, [0, 1, 2, 3], Hyp(degrees=10), True, seed=7)
    c, _ = _batch(painted, [0, 1, 2, 3], Hyp(degrees=10), True, seed=8)
    assert torch.equal(a["img"], b["img"])
    assert torch.equal(a["boxes"], b["boxes"])
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
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    assert torch.equal(pipeline.hsv(imgs, NO_AUG, rand), imgs)
    out = pipeline.hsv(imgs, Hyp(hsv_h=0.5, hsv_s=0.7, hsv_v=0.4), rand)
    assert out.shape == imgs.shape
    assert out.min() >= 0
    assert out.max() <= 255.01
    assert (out - imgs).abs().mean() > 5


def _bench():
    """benchmarks/pipeline.py, whose op counter these structural tests share (one definition of a syncing op)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module("pipeline")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.parametrize("mosaic_on", [True, False], ids=["mosaic", "close-mosaic"])
def test_a_batch_costs_the_same_ops_at_any_size_and_never_syncs(painted, mosaic_on):
    """Structural, not timed: the op count does not grow with the batch (no per-image Python loops), and none of
    the ops that read a GPU value back to the host runs (on CUDA each would stall the pipeline)."""
    st = pipeline.StoreTensors.of(painted)
    counts = {}
    bench = _bench()
    for b in (8, 64):
        indices = [i % len(painted) for i in range(b)]
        batch = functools.partial(pipeline.make_batch, st, indices, Hyp(degrees=10, shear=2), mosaic_on)
        calls = bench.op_names(functools.partial(batch, torch.Generator().manual_seed(0), "cpu"))
        counts[b] = len(calls)
        assert not bench.SYNCING & set(calls), sorted(bench.SYNCING & set(calls))
    assert counts[64] < 1.5 * counts[8], counts
    assert counts[64] == counts[8]  # in fact identical


def test_the_hand_off_to_the_loss_is_the_one_sync(painted):
    out, _ = _batch(painted, [0, 1, 2, 3], Hyp(), mosaic_on=True)
    _, syncs = _bench().count_ops(lambda: pipeline.to_ultralytics(out, ["f"] * 4))
    assert syncs == 1  # the nonzero that counts the surviving boxes


@pytest.mark.parametrize(("n", "world", "batch"), [(33, 2, 16), (8, 3, 2), (5, 1, 2)])
def test_every_rank_gets_the_same_number_of_batches(n, world, batch):
    shards = [pipeline._ShardSampler(n, seed=0, rank=r, world=world).indices() for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal: no rank waits for a batch the others never send
    assert len({math.ceil(len(s) / batch) for s in shards}) == 1
    assert set().union(*map(set, shards)) == set(range(n))  # every image, the padding repeats a few
    assert sum(map(len, shards)) - n < world


def test_the_loader_prefetches_in_order_and_repeats_with_the_seed(painted):
    def epoch():
        loader = pipeline.StoreLoader(painted, 3, seed=5, hyp=Hyp())
        return [(b["chunk"], b["fast"]["tiles"].sum().item()) for b in loader]

    first = epoch()
    assert len(first) == 2  # 4 images, batches of 3
    assert sorted(i for chunk, _ in first for i in chunk) == [0, 1, 2, 3]
    assert epoch() == first  # the background thread keeps the order and the random draws


def test_the_store_is_read_into_ram_only_when_it_fits():
    store = types.SimpleNamespace(size_gb=4.0)
    assert pipeline.keep_resident(store, ram_available_gb=64, world=1)
    assert not pipeline.keep_resident(store, ram_available_gb=6, world=1)  # 4 x 1.5 + 2 GB reserve > 6
    assert not pipeline.keep_resident(store, ram_available_gb=64, world=2)  # ranks share the page cache instead


def _build_and_report(args: tuple[str, str]) -> tuple[str, str]:
    """In a separate process: build the store (noting each real build in builds.txt); its folder and pixel hash."""
    import hashlib
    import os
    import time

    source, root = args
    build = pipeline._build

    def noted(folder, *rest):
        with open(Path(root) / "builds.txt", "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.5)  # a slow build: the other process surely asks while it runs
        return build(folder, *rest)

    pipeline._build = noted
    store = pipeline.build_store(source, 64, Path(root), workers=1)
    return str(store.folder), hashlib.sha256(np.asarray(store.images).tobytes()).hexdigest()


def test_two_processes_asking_for_one_store_build_it_once(make_dataset, tmp_path):
    import multiprocessing

    source = dataset.scan(make_dataset(6, 1)).split("train").sources[0]
    root = tmp_path / "s"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:  # two DDP ranks of one node, both starting on an empty store
        results = pool.map(_build_and_report, [(source, str(root))] * 2, chunksize=1)
    assert results[0] == results[1]  # the same folder, the same pixels
    assert len((root / "builds.txt").read_text().split()) == 1  # one process built it, the other waited and reused
    (tmp_path / "alone").mkdir()
    assert results[0][1] == _build_and_report((source, str(tmp_path / "alone")))[1]  # as a lone build makes it
    store_dir = root / pipeline.STORE_DIR
    assert sorted(p.name for p in store_dir.iterdir() if not p.name.endswith(".lock")) == [Path(results[0][0]).name]


def test_a_half_built_store_is_replaced_not_used(make_dataset, tmp_path):
    source = dataset.scan(make_dataset(3, 1)).split("train").sources[0]
    first = pipeline.build_store(source, 64, tmp_path / "s", workers=1)
    good = np.asarray(first.images).copy()
    (first.folder / "meta.json").unlink()  # as a build killed before it finished left it
    (first.folder / "images.u8").write_bytes(b"broken")
    again = pipeline.build_store(source, 64, tmp_path / "s", workers=1)
    assert again.folder == first.folder
    assert np.array_equal(np.asarray(again.images), good)
    assert not [p for p in first.folder.parent.iterdir() if p.name.endswith(".tmp")]


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
    assert main["measured"]["fast_store"] == "ram"  # 8 images at 64 px fit in RAM many times over
    assert "fast pipeline store read into RAM" in result.output
    assert doc["reasons"]["pipeline"] == "fast: set by user"


@pytest.mark.slow
def test_pipeline_benchmark_smoke(tmp_path):
    text = run_benchmark("pipeline.py", tmp_path)
    aug = table_rows(text, "speedtrain (batched", "kornia")
    assert [r[0] for r in aug] == ["speedtrain (batched torch)", "kornia AugmentationSequential"]
    assert float(aug[0][3]) > 0  # augmentation-only images/s
    assert aug[0][5] == "0"  # no syncing op in our batch
    rows = table_rows(text, "Ultralytics", "speedtrain --")
    assert [r[0] for r in rows] == ["Ultralytics pipeline", "speedtrain --pipeline fast"]
    assert all(float(r[3]) > 0 for r in rows)  # steady img/s measured for both pipelines
    assert "step floor" in text


def test_store_refuses_a_disk_too_small(make_dataset, tmp_path, monkeypatch):
    import shutil

    from speedtrain.errors import DiskSpaceError

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    source = dataset.scan(make_dataset(2, 1)).split("train").sources[0]
    with pytest.raises(DiskSpaceError, match="decoded store needs about"):
        pipeline.build_store(source, 64, tmp_path / "s", workers=1)
    assert not (tmp_path / "s").exists()  # nothing written
