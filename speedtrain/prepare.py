"""Write dataset copies speedtrain owns: the linked training view (and, with `speedtrain prepare`, resized copies).

Nothing here writes inside the user's dataset.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from speedtrain.dataset import DatasetStats, label_path, list_images

VIEW_DIR = ".datasets"


def view_dir(stats: DatasetStats, project: str | Path) -> Path:
    """Where the training view of this dataset lives: one per dataset under the project folder, reused."""
    key = "\n".join([stats.yaml_path or stats.root, *(src for s in stats.splits for src in s.sources)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(stats.root).name)[:40] or "dataset"
    return Path(project) / VIEW_DIR / f"{slug}-{digest}"


def make_view(stats: DatasetStats, dest: str | Path) -> Path:
    """Link the dataset's images and labels under `dest` and write its data.yaml there; return that yaml.

    Ultralytics writes `labels/<split>.cache` and, with cache=disk, a `.npy` beside every image; through the
    view those land in `dest`, never in the dataset. Re-running refreshes the links and drops stale `.npy`.
    """
    dest = Path(dest).absolute()
    wanted: dict[Path, Path] = {}
    split_dirs: dict[str, list[str]] = {}
    source_ids: dict[str, str] = {}
    for split in stats.splits:
        for source in split.sources:
            if source not in source_ids:  # train and val often share a folder: link it once
                source_ids[source] = f"s{len(source_ids)}"
                wanted.update(_links_for_source(Path(source), dest, source_ids[source]))
            split_dirs.setdefault(split.name, []).append(f"images/{source_ids[source]}")
    _sync_links(dest, wanted)
    data: dict[str, Any] = {"path": str(dest), **split_dirs}
    data["nc"] = len(stats.names)
    data["names"] = dict(enumerate(stats.names))
    yaml_path = dest / "data.yaml"
    write_atomic(yaml_path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode())
    return yaml_path


def _links_for_source(source: Path, dest: Path, sid: str) -> dict[Path, Path]:
    """Map view paths to real files for one split source (a folder, a list file or one image)."""
    links: dict[Path, Path] = {}
    images = list_images([source])
    for n, image in enumerate(images):
        real = Path(image)
        if source.is_dir():
            rel = real.relative_to(source) if real.is_relative_to(source) else Path(f"{n:07d}_{real.name}")
        else:  # list files may name images anywhere: number them to keep names unique
            rel = Path(f"{n:07d}_{real.name}")
        links[dest / "images" / sid / rel] = real
        label = Path(label_path(image))
        if label.is_file():
            links[(dest / "labels" / sid / rel).with_suffix(".txt")] = label
    return links


def _sync_links(dest: Path, wanted: dict[Path, Path]) -> None:
    """Make the view's links exactly `wanted`; keep Ultralytics' caches that still match their images."""
    for folder in ("images", "labels"):
        root = dest / folder
        if not root.exists():
            continue
        for path in list(root.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                continue
            if path.suffix == ".npy":
                image = next((p for p in _siblings(path) if p in wanted), None)
                if image is None or _mtime(wanted[image]) > _mtime(path):
                    path.unlink()
            elif path.suffix == ".cache":
                continue  # Ultralytics checks its label cache's hash itself
            elif path not in wanted or not _same_target(path, wanted[path]):
                path.unlink()
    for link, target in wanted.items():
        if not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            _link(target, link)


def _siblings(npy: Path) -> list[Path]:
    stem = npy.with_suffix("")
    return [stem.with_suffix(s) for s in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")]


def _same_target(link: Path, target: Path) -> bool:
    if link.is_symlink():
        return Path(os.readlink(link)) == target
    try:  # a hard link or copy (Windows without symlink rights): same file, same size and time
        st, tt = link.stat(), target.stat()
    except OSError:
        return False
    return (st.st_ino == tt.st_ino and st.st_dev == tt.st_dev) or (
        st.st_size == tt.st_size and st.st_mtime >= tt.st_mtime
    )


def _link(target: Path, link: Path) -> None:
    """Symlink; where that is not allowed (Windows without developer mode), hard link, then copy."""
    try:
        os.symlink(target, link)
        return
    except OSError:
        pass
    try:
        os.link(target, link)
    except OSError:
        shutil.copy2(target, link)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
