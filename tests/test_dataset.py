"""Scanning real COCO images: counts, sizes, path resolution, layouts and the errors training must refuse."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tree_hash

from speedtrain import dataset
from speedtrain.errors import DatasetError


def test_counts_on_real_images(make_dataset):
    root = make_dataset(8, 4)
    stats = dataset.scan(root)
    assert (stats.train_images, stats.val_images, stats.classes) == (8, 4, 80)
    train = stats.split("train")
    labelled = sum(
        (root / "labels" / "train" / f"{p.stem}.txt").exists() for p in (root / "images" / "train").iterdir()
    )
    assert train.labelled == labelled
    lines = [ln for p in (root / "labels" / "train").iterdir() for ln in p.read_text().splitlines() if ln.strip()]
    assert train.instances == len(lines) > 0
    assert stats.errors == ()
    assert stats.image_sizes.max_long_side() == 640  # COCO photos are 640 px on the long side
    assert stats.yaml_path == str(root / "data.yaml")


def test_background_images_are_counted(make_dataset):
    root = make_dataset(6, 2)
    labels = sorted((root / "labels" / "train").iterdir())
    labels[0].unlink()  # no label file: a background image
    labels[1].write_text("")  # empty label file: also a background
    stats = dataset.scan(root)
    assert stats.split("train").backgrounds == 2
    assert stats.background_images == 2


def test_decoded_size_estimate_matches_the_images(make_dataset):
    root = make_dataset(4, 0)
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/train", "nc": 80}))
    stats = dataset.scan(root)
    from PIL import Image

    expected = 0
    for p in (root / "images" / "train").iterdir():
        w, h = Image.open(p).size
        r = 320 / max(w, h)
        expected += round(w * r) * round(h * r) * 3
    assert stats.decoded_gb(320) == pytest.approx(2 * expected / 1024**3)  # train and val each cache
    assert stats.decoded_gb(None) > stats.decoded_gb(320)


def test_large_sets_are_sampled_and_say_so(make_dataset):
    stats = dataset.scan(make_dataset(12, 2), sample=5)
    assert stats.sampled
    assert len(stats.image_sizes.dims) == 5
    assert stats.image_sizes.total == 12
    assert not dataset.scan(make_dataset(3, 1, name="small")).sampled


def test_yaml_path_or_folder(make_dataset):
    root = make_dataset(4, 2)
    assert dataset.scan(root / "data.yaml").train_images == dataset.scan(root).train_images == 4


def test_relative_path_key_is_resolved_against_the_yaml_folder(make_dataset, tmp_path, monkeypatch):
    root = make_dataset(4, 2)
    cfg = tmp_path / "configs"
    cfg.mkdir()
    (cfg / "mine.yaml").write_text(
        yaml.safe_dump({"path": "../ds", "train": "images/train", "val": "images/val", "nc": 80})
    )
    monkeypatch.chdir(tmp_path / "ds" / "images")  # the working directory must not matter
    stats = dataset.scan(cfg / "mine.yaml")
    assert stats.root == str(root)
    assert stats.train_images == 4
    assert any("resolved against the yaml's folder" in n for n in stats.notes)


def test_layout_without_yaml(make_dataset):
    root = make_dataset(4, 2)
    (root / "data.yaml").unlink()
    stats = dataset.scan(root)
    assert stats.yaml_path is None
    assert (stats.train_images, stats.val_images) == (4, 2)
    assert stats.classes >= 1
    assert stats.names[0] == "class0"


def test_flat_layout_validates_on_training_images(make_dataset, tmp_path):
    root = make_dataset(4, 0)
    (root / "data.yaml").unlink()
    flat = tmp_path / "flat"
    shutil.copytree(root / "images" / "train", flat / "images")
    shutil.copytree(root / "labels" / "train", flat / "labels")
    (flat / "classes.txt").write_text("\n".join(f"c{i}" for i in range(80)))
    stats = dataset.scan(flat)
    assert (stats.train_images, stats.val_images, stats.classes) == (4, 4, 80)
    assert any("validating on the training images" in n for n in stats.notes)


@pytest.mark.parametrize("names", [["a", "b"], {0: "a", 1: "b"}, {"0": "a", "1": "b"}])
def test_names_as_list_or_dict(make_dataset, names):
    root = make_dataset(2, 1)
    for label in (root / "labels").rglob("*.txt"):
        label.write_text("1 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": names}))
    assert dataset.scan(root).names == ("a", "b")


def test_crlf_and_polygon_labels_are_accepted(make_dataset):
    root = make_dataset(2, 1)
    labels = sorted((root / "labels" / "train").iterdir())
    labels[0].write_bytes(b"0 0.5 0.5 0.2 0.2\r\n1 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\r\n")
    stats = dataset.scan(root)
    assert stats.problems == ()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": "images/train", "names": ["a"]}, "missing required key(s): val"),
        ({"train": "images/nope", "val": "images/val", "nc": 80}, "train split not found"),
        ({"train": "images/train", "val": "images/val", "nc": 3, "names": ["a", "b"]}, "nc is 3 but names lists 2"),
        ({"train": "images/train", "val": "images/val", "names": {0: "a", 2: "c"}}, "without gaps"),
        ("just a string", "expected a mapping"),
    ],
)
def test_bad_yaml(make_dataset, data, message):
    root = make_dataset(2, 1)
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(DatasetError) as err:
        dataset.scan(root)
    assert message in str(err.value)


def test_split_with_zero_images(make_dataset):
    root = make_dataset(2, 1)
    for p in (root / "images" / "val").iterdir():
        p.unlink()
    with pytest.raises(DatasetError) as err:
        dataset.scan(root)
    assert "val split has no images" in str(err.value)


def test_missing_dataset_and_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="dataset not found"):
        dataset.scan(tmp_path / "nope")
    with pytest.raises(DatasetError, match="not a YOLO dataset"):
        dataset.scan(tmp_path)


def test_label_problems_are_found_with_file_names(make_dataset):
    root = make_dataset(4, 1)
    labels = sorted((root / "labels" / "train").iterdir())
    labels[0].write_text("99 0.5 0.5 0.2 0.2\n")
    labels[1].write_text("0 0.5 0.5\n")
    labels[2].write_text("0 1.5 0.5 0.2 0.2\n")
    stats = dataset.scan(root)
    kinds = {(p.kind, p.file) for p in stats.problems}
    assert ("class-out-of-range", str(labels[0])) in kinds
    assert ("malformed-label", str(labels[1])) in kinds
    assert ("coords-out-of-range", str(labels[2])) in kinds
    assert [p.kind for p in stats.errors] == ["class-out-of-range"]
    assert "class id 99 outside 0..79" in stats.errors[0].line()


def test_corrupt_image_is_a_warning_not_a_crash(make_dataset):
    root = make_dataset(3, 1)
    victim = sorted((root / "images" / "train").iterdir())[0]
    victim.write_bytes(b"not a jpeg at all")
    stats = dataset.scan(root)
    assert [(p.kind, p.file) for p in stats.problems] == [("unreadable-image", str(victim))]


def test_scan_never_writes(make_dataset):
    root = make_dataset(6, 2)
    before = tree_hash(root)
    dataset.scan(root)
    assert tree_hash(root) == before


def test_check_finds_every_kind_of_problem(make_dataset):
    root = make_dataset(6, 2)
    images = sorted((root / "images" / "train").iterdir())
    images[0].write_bytes(b"\xff\xd8 not a jpeg")  # corrupt
    data = images[1].read_bytes()
    images[1].write_bytes(data[: len(data) // 2])  # truncated: opens, fails to decode
    shutil.copy2(images[2], images[2].with_name("copy_of_" + images[2].name))  # duplicate
    (root / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # label without image
    (root / "labels" / "train" / f"{images[3].stem}.txt").write_text("0 0.5 0.5\n")  # malformed
    before = tree_hash(root)
    problems = dataset.check(dataset.scan(root), workers=2)
    found = {(p.kind, Path(p.file).name) for p in problems}
    assert ("unreadable-image", images[0].name) in found
    assert ("unreadable-image", images[1].name) in found
    assert ("duplicate-image", "copy_of_" + images[2].name) in found
    assert ("label-without-image", "ghost.txt") in found
    assert ("malformed-label", f"{images[3].stem}.txt") in found
    assert tree_hash(root) == before


def test_check_on_clean_copy_finds_nothing(make_dataset):
    root = make_dataset(4, 2)
    assert dataset.check(dataset.scan(root), workers=1) == ()


def test_a_val_split_without_a_single_box_is_a_finding(make_dataset):
    root = make_dataset(8, 4)
    for label in (root / "labels" / "val").glob("*.txt"):
        label.unlink()
    stats = dataset.scan(root)
    found = [p for p in stats.problems if p.kind == dataset.NO_VAL_BOXES]
    assert len(found) == 1
    assert "none of the 4 val images has a usable box" in found[0].detail
    assert found[0] in dataset.check(stats)  # `speedtrain check` lists it: never "no problems found"
    assert not [p for p in dataset.scan(make_dataset(8, 4, name="ok")).problems if p.kind == dataset.NO_VAL_BOXES]


def test_the_scan_knows_the_small_boxes(make_dataset):
    stats = dataset.scan(make_dataset(8, 4))
    small = stats.split("train").small_box
    assert small is not None
    assert 0 < small < 1
    assert stats.small_box_px(640) == pytest.approx(2 * stats.small_box_px(320), rel=0.01)
