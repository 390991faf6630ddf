"""Every dataset layout Ultralytics 8.4.190 trains, built from real photos: speedtrain plans, checks, prepares and
trains each of them, and finds the same images as Ultralytics' own check_det_dataset."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import coco_images, names_80
from typer.testing import CliRunner

from speedtrain import dataset, resize
from speedtrain.cli import app

Builder = Callable[[Path], Path]  # builds a layout under a folder; returns what the user passes as --dataset
N_TRAIN, N_VAL, N_TEST = 6, 3, 2


def _put(files: list[tuple[Path, Path]], images: Path, labels: Path) -> None:
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for img, label in files:
        shutil.copy2(img, images / img.name)
        if label.exists():
            shutil.copy2(label, labels / label.name)


def _splits() -> tuple[list, list, list]:
    files = coco_images()[: N_TRAIN + N_VAL + N_TEST]
    return files[:N_TRAIN], files[N_TRAIN : N_TRAIN + N_VAL], files[N_TRAIN + N_VAL :]


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def roboflow(with_test: bool) -> Builder:
    """A Roboflow YOLO export: train/, valid/ (and test/) each with images/ and labels/, and a data.yaml whose
    paths start with ../ (they resolve only in the yaml's own folder, as Ultralytics' fallback does)."""

    def build(tmp: Path) -> Path:
        root = tmp / "export"
        train, val, test = _splits()
        _put(train, root / "train" / "images", root / "train" / "labels")
        _put(val, root / "valid" / "images", root / "valid" / "labels")
        data = {"train": "../train/images", "val": "../valid/images"}
        if with_test:
            _put(test, root / "test" / "images", root / "test" / "labels")
            data["test"] = "../test/images"
        names = names_80()
        _write(
            root / "data.yaml",
            {**data, "nc": len(names), "names": names, "roboflow": {"workspace": "w", "project": "p", "version": 1}},
        )
        return root

    return build


def classic(tmp: Path) -> Path:
    """images/{train,val} + labels/{train,val} with `path:` absolute and relative splits."""
    root = tmp / "classic"
    train, val, _ = _splits()
    _put(train, root / "images" / "train", root / "labels" / "train")
    _put(val, root / "images" / "val", root / "labels" / "val")
    names = dict(enumerate(names_80()))
    return _write(root / "data.yaml", {"path": str(root), "train": "images/train", "val": "images/val", "names": names})


def absolute_splits(tmp: Path) -> Path:
    """No `path:`; absolute split folders, the yaml elsewhere."""
    root = classic(tmp).parent
    cfg = tmp / "configs"
    cfg.mkdir()
    return _write(
        cfg / "ppe.yaml",
        {"train": str(root / "images" / "train"), "val": str(root / "images" / "val"), "names": names_80()},
    )


def folder_lists(tmp: Path) -> Path:
    """Lists of folders as splits: train from two folders."""
    root = tmp / "lists"
    train, val, _ = _splits()
    _put(train[:3], root / "images" / "a", root / "labels" / "a")
    _put(train[3:], root / "images" / "b", root / "labels" / "b")
    _put(val, root / "images" / "val", root / "labels" / "val")
    return _write(root / "data.yaml", {"train": ["images/a", "images/b"], "val": ["images/val"], "names": names_80()})


def txt_lists(tmp: Path) -> Path:
    """Splits as txt files listing images (relative to the dataset root, with ./ as Ultralytics' exports write)."""
    root = tmp / "txt"
    train, val, _ = _splits()
    _put(train + val, root / "images" / "all", root / "labels" / "all")
    (root / "train.txt").write_text("".join(f"./images/all/{img.name}\n" for img, _ in train))
    (root / "val.txt").write_text("".join(f"./images/all/{img.name}\n" for img, _ in val))
    return _write(root / "data.yaml", {"path": str(root), "train": "train.txt", "val": "val.txt", "names": names_80()})


LAYOUTS: dict[str, Builder] = {
    "roboflow": roboflow(with_test=True),
    "roboflow-no-test": roboflow(with_test=False),
    "classic-path": classic,
    "absolute-splits": absolute_splits,
    "folder-lists": folder_lists,
    "txt-lists": txt_lists,
}


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    return request.param, LAYOUTS[request.param](tmp_path)


def _invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_speedtrain_finds_what_ultralytics_finds(layout):
    name, given = layout
    from ultralytics.data.utils import check_det_dataset

    stats = dataset.scan(given)
    assert (stats.train_images, stats.val_images, stats.classes) == (N_TRAIN, N_VAL, 80), name
    yaml_file = dataset.find_yaml(given)
    ours = {s.name: sorted(Path(i).name for i in s.image_files) for s in stats.splits}
    theirs = check_det_dataset(str(yaml_file), autodownload=False)
    for split in ("train", "val"):
        entries = theirs[split] if isinstance(theirs[split], list) else [theirs[split]]
        found = sorted(Path(i).name for i in dataset.list_images([Path(e) for e in entries]))
        assert ours[split] == found, (name, split)
    assert ("test" in ours) == (name == "roboflow")


def test_plan_and_check_accept_every_layout(layout, tmp_path):
    name, given = layout
    result = _invoke("plan", "--dataset", given, "--json", "--device", "cpu")
    assert result.exit_code == 0, (name, result.output)
    assert json.loads(result.output)["dataset"]["train_images"] == N_TRAIN
    result = _invoke("check", "--dataset", given, "--json", "--workers", 1)
    assert result.exit_code in (0, 1), (name, result.output)  # 1: COCO photos have a few real label problems
    assert "error:" not in result.output


def test_prepare_and_the_linked_view_keep_every_image(layout, tmp_path):
    name, given = layout
    stats = dataset.scan(given)
    summary = resize.resize_dataset(stats, 128, tmp_path / "small", workers=1)
    copy = dataset.scan(tmp_path / "small")
    assert (copy.train_images, copy.val_images) == (N_TRAIN, N_VAL), (name, summary)
    assert copy.image_sizes.max_long_side() <= 128
    view = dataset.scan(resize.make_view(stats, tmp_path / "view"))
    assert (view.train_images, view.val_images, view.label_files) == (N_TRAIN, N_VAL, stats.label_files)


@pytest.mark.slow
def test_train_accepts_every_layout(layout, tmp_path):
    name, given = layout
    result = _invoke(
        "train",
        "--dataset",
        given,
        "--img-size",
        64,
        "--epochs",
        1,
        "--finetune",
        "no",
        "--device",
        "cpu",
        "--project",
        tmp_path / "runs",
        "plots=False",
    )
    assert result.exit_code == 0, (name, result.output)
    doc = json.loads((tmp_path / "runs" / "train" / "speed_report.json").read_text())
    assert doc["stages"][0]["measured"]["images_per_epoch"] == N_TRAIN
