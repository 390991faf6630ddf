"""The linked training view: Ultralytics' caches land in it, never in the dataset."""

from __future__ import annotations

import os

import yaml
from conftest import tree_hash

from speedtrain import dataset, prepare


def test_view_links_every_image_and_label_and_leaves_the_dataset_alone(make_dataset, tmp_path):
    root = make_dataset(6, 3)
    before = tree_hash(root)
    stats = dataset.scan(root)
    view_yaml = prepare.make_view(stats, tmp_path / "view")
    assert tree_hash(root) == before
    data = yaml.safe_load(view_yaml.read_text())
    assert data["path"] == str(tmp_path / "view")
    assert data["nc"] == 80
    assert "download" not in data
    viewed = dataset.scan(view_yaml)
    assert (viewed.train_images, viewed.val_images, viewed.label_files) == (6, 3, stats.label_files)
    for image in viewed.split("train").image_files:
        assert os.path.realpath(image).startswith(str(root))


def test_train_and_val_sharing_a_folder_are_linked_once(make_dataset, tmp_path):
    root = make_dataset(4, 0)
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/train", "nc": 80}))
    view_yaml = prepare.make_view(dataset.scan(root), tmp_path / "view")
    data = yaml.safe_load(view_yaml.read_text())
    assert data["train"] == data["val"] == ["images/s0"]


def test_view_follows_changes_and_drops_stale_caches(make_dataset, tmp_path):
    root = make_dataset(4, 1)
    view = tmp_path / "view"
    prepare.make_view(dataset.scan(root), view)
    gone = sorted((root / "images" / "train").iterdir())[0]
    stale_npy = view / "images" / "s0" / f"{gone.stem}.npy"
    stale_npy.write_bytes(b"x")
    kept = sorted((root / "images" / "train").iterdir())[1]
    fresh_npy = view / "images" / "s0" / f"{kept.stem}.npy"
    fresh_npy.write_bytes(b"x")
    gone.unlink()
    prepare.make_view(dataset.scan(root), view)
    assert not os.path.lexists(view / "images" / "s0" / gone.name)
    assert not stale_npy.exists()
    assert fresh_npy.exists()  # its image did not change: Ultralytics may reuse it
    assert dataset.scan(view / "data.yaml").train_images == 3


def test_view_dir_is_stable_per_dataset(make_dataset, tmp_path):
    a, b = dataset.scan(make_dataset(2, 1, name="a")), dataset.scan(make_dataset(2, 1, name="b"))
    assert prepare.view_dir(a, tmp_path) == prepare.view_dir(a, tmp_path) != prepare.view_dir(b, tmp_path)


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "f.json"
    prepare.write_atomic(target, b"{}")
    prepare.write_atomic(target, b'{"a": 1}')
    assert target.read_bytes() == b'{"a": 1}'
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]
