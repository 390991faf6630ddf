"""Write dataset copies speedtrain owns: the linked training view (and, with `speedtrain prepare`, resized copies).

Nothing here writes inside the user's dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageOps

from speedtrain.dataset import (
    DatasetStats,
    Problem,
    label_path,
    list_images,
    load_yaml,
    open_image,
    opencv_skips,
)
from speedtrain.errors import DiskSpaceError, UsageError
from speedtrain.knobs import said
from speedtrain.parallel import Progress, default_workers, pmap
from speedtrain.records import ResizeSummary
from speedtrain.util import (
    check_free_disk,
    disk_full_is_one_line,
    existing_parent,
    first_line,
    is_disk_full,
    within,
    write_atomic,
)

VIEW_DIR = ".datasets"


def view_dir(stats: DatasetStats, project: str | Path) -> Path:
    """Where the training view of this dataset lives: one per dataset under the project folder, reused."""
    key = "\n".join([stats.yaml_path or stats.root, *(src for s in stats.splits for src in s.sources)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(stats.root).name)[:40] or "dataset"
    return Path(project) / VIEW_DIR / f"{slug}-{digest}"


def prepared_dir(stats: DatasetStats, project: str | Path, size: int) -> Path:
    """Where `train --prepare` keeps its resized copy: beside the view, one per dataset and size, reused."""
    view = view_dir(stats, project)
    return view.with_name(f"{view.name}_{size}")


def make_view(stats: DatasetStats, dest: str | Path) -> Path:
    """Link the dataset's images and labels under `dest` and write its data.yaml there; return that yaml.

    Ultralytics writes `labels/<split>.cache` and, with cache=disk, a `.npy` beside every image; through the
    view those land in `dest`, never in the dataset. Re-running refreshes the links and drops stale `.npy`.
    The images are the scan's (a split's folders are not listed again); a label's existence comes from one listing
    of its folder, the view's own links from one walk with os.scandir: at 25,000 images an unchanged view is checked
    with a readlink per link and no other call per file.
    """
    dest = Path(dest).absolute()
    wanted: dict[str, str] = {}
    split_dirs: dict[str, list[str]] = {}
    source_ids: dict[str, str] = {}
    skip = opencv_skips(stats)  # Ultralytics' loader would stop at these; its own check skips other unreadable ones
    labels = _Listings()
    for split in stats.splits:
        for source in split.sources:
            if source not in source_ids:  # train and val often share a folder: link it once
                source_ids[source] = f"s{len(source_ids)}"
                images = split.image_files if len(split.sources) == 1 else list_images([Path(source)])
                wanted.update(_links_for_source(Path(source), images, str(dest), source_ids[source], skip, labels))
            split_dirs.setdefault(split.name, []).append(f"images/{source_ids[source]}")
    _sync_links(dest, wanted)
    data: dict[str, Any] = {"path": str(dest), **split_dirs}
    data["nc"] = len(stats.names)
    data["names"] = dict(enumerate(stats.names))
    yaml_path = dest / "data.yaml"
    write_atomic(yaml_path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode())
    return yaml_path


class _Listings:
    """Which regular files a folder holds, listed once per folder (instead of a stat per file)."""

    def __init__(self) -> None:
        self._files: dict[str, frozenset[str]] = {}

    def has(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self._files:
            try:
                with os.scandir(folder) as entries:
                    self._files[folder] = frozenset(e.name for e in entries if e.is_file())
            except OSError:  # no such folder (a split without labels), or not readable: no labels there
                self._files[folder] = frozenset()
        return name in self._files[folder]


def _links_for_source(
    source: Path, images: tuple[str, ...], dest: str, sid: str, skip: frozenset[str], labels: _Listings
) -> dict[str, str]:
    """Map view paths to real files for one split source (a folder, a list file or one image), without `skip`."""
    links: dict[str, str] = {}
    prefix = os.path.join(str(source), "") if source.is_dir() else None
    for n, image in enumerate(images):
        if image in skip:
            continue
        if prefix is not None and image.startswith(prefix):
            rel = image[len(prefix) :]
        else:  # list files may name images anywhere: number them to keep names unique
            rel = f"{n:07d}_{os.path.basename(image)}"
        links[os.path.join(dest, "images", sid, rel)] = image
        label = label_path(image)
        if labels.has(label):
            links[os.path.join(dest, "labels", sid, os.path.splitext(rel)[0] + ".txt")] = label
    return links


def _files_under(root: str) -> Iterator[os.DirEntry[str]]:
    """Every entry under `root` that is not a real folder (links, files), walked with os.scandir."""
    folders = [root]
    while folders:
        try:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    else:
                        yield entry
        except FileNotFoundError:
            continue


def _sync_links(dest: Path, wanted: dict[str, str]) -> None:
    """Make the view's links exactly `wanted`; keep Ultralytics' caches that still match their images."""
    present: set[str] = set()
    for folder in ("images", "labels"):
        for entry in _files_under(str(dest / folder)):
            path = entry.path
            if path.endswith(".npy"):
                image = next((p for p in _siblings(path) if p in wanted), None)
                if image is None or _mtime(wanted[image]) > _mtime(path):
                    os.unlink(path)
            elif path.endswith(".cache"):
                continue  # Ultralytics checks its label cache's hash itself
            elif path in wanted and _same_target(entry, wanted[path]):
                present.add(path)
            else:
                os.unlink(path)
    made: set[str] = set()
    for link, target in wanted.items():
        if link not in present:
            parent = os.path.dirname(link)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            _link(Path(target), Path(link))


def _siblings(npy: str) -> list[str]:
    stem = npy[: -len(".npy")]
    return [stem + s for s in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")]


def _same_target(entry: os.DirEntry[str], target: str) -> bool:
    if entry.is_symlink():
        return os.readlink(entry.path) == target
    return _up_to_date(Path(entry.path), Path(target))  # a hard link or copy (Windows without symlink rights)


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


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


# --- resized copies (`speedtrain prepare`, `optimize_training_speed.py --resize`) -------------------------------

MANIFEST = ".speedtrain-manifest.json"
TMP_PREFIX = ".st-"
JPEG_QUALITY = 95  # the copy's JPEG/WebP quality, unless a JPEG source is stored lower (copy_quality)
# --quality auto, for a JPEG source stored below 80: its own quality plus 15, at least 85. Measured on ppe-large's
# photos (stored at 70, 640 px, copied at 416): the copy is 0.81x its source's bytes at 85, 1.00x at 90, 1.39x at
# 95, and the same weights score 0.4610 mAP50-95 on the copy at 85 against 0.4626 at 95 (docs/measurements.md)
QUALITY_FLOOR = 85
QUALITY_ABOVE_SOURCE = 15
AUTO = 0  # the manifest's record of --quality auto
# the IJG (libjpeg) luminance quantization table at quality 50, in natural order: a JPEG's own table against it
# gives the quality setting it was saved with (exact for libjpeg, Pillow, OpenCV; an estimate for cameras)
_IJG_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
PIL_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


def default_out(stats: DatasetStats, size: int) -> Path:
    """The sibling folder a resized copy goes to by default: dataset_416 next to dataset."""
    root = Path(stats.root)
    return root.with_name(f"{root.name}_{size}")


def resize_dataset(
    stats: DatasetStats,
    size: int,
    out: str | Path | None = None,
    *,
    workers: int | None = None,
    quality: int | str | None = "auto",
    in_place: bool = False,
    progress: Progress | None = None,
) -> ResizeSummary:
    """Write a copy of the dataset whose images' long side is at most `size`; labels are copied unchanged.

    JPEG and WebP copies are written at `quality`; "auto" (or None) writes each at `copy_quality` of its source: 95,
    lower for a JPEG stored at a lower quality, so that the copy is not larger than the image it came from.

    Incremental (a manifest records each source's size and mtime), parallel across processes, and every file is
    written to a temporary name and renamed, so an interrupted run never leaves half an image.
    """
    if size < 32:
        raise UsageError(f"{said('size', size)}: must be at least 32 pixels")
    setting = _quality_setting(quality)
    t0 = time.perf_counter()
    root = Path(stats.root)
    out_dir = root if in_place else Path(out or default_out(stats, size)).absolute()
    if not in_place:
        _refuse_writing_into_the_dataset(stats, out_dir)
    _refuse_unwritable(stats, out_dir, in_place)
    pairs = _image_pairs(stats, root, out_dir)
    _check_disk(stats, size, out_dir, pairs, in_place)
    _remove_temp_files(out_dir)
    manifest = _load_manifest(out_dir)
    todo, unchanged = _pending(pairs, manifest, size, setting, out_dir)
    workers = workers or default_workers()
    jobs = [(str(src), str(dst), size, setting) for src, dst in todo]
    tally = _run_jobs(jobs, workers, progress, manifest, out_dir, (size, setting))
    removed = _remove_orphans(pairs, manifest, out_dir) if not in_place else 0
    _save_manifest(out_dir, manifest)
    kept = f"every image finished so far is kept; free some space and run the same prepare again to complete {out_dir}"
    with disk_full_is_one_line(out_dir, kept):
        labels = 0 if in_place else _copy_labels(pairs)
        yaml_path = None if in_place else _write_yaml(stats, root, out_dir)
    return ResizeSummary(
        out_dir=str(out_dir),
        yaml_path=str(yaml_path) if yaml_path else None,
        size=size,
        images=len(pairs),
        resized=tally.resized,
        copied=tally.copied,
        unchanged=unchanged,
        failed=tuple(tally.failed),
        labels_copied=labels,
        removed=removed,
        bytes_before=tally.bytes_before,
        bytes_after=tally.bytes_after,
        seconds=round(time.perf_counter() - t0, 3),
        workers=min(workers, max(1, len(jobs))),
        qualities=tuple(sorted(tally.qualities.items())),
    )


@dataclass
class _Tally:
    resized: int = 0
    copied: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    failed: list[Problem] = field(default_factory=list)
    qualities: Counter[int] = field(default_factory=Counter)  # JPEG/WebP images written, by quality


def _run_jobs(
    jobs: list[tuple[str, str, int, int]],
    workers: int,
    progress: Progress | None,
    manifest: dict[str, list[int]],
    out_dir: Path,
    settings: tuple[int, int],
) -> _Tally:
    """Resize in worker processes, recording each finished image in the manifest (saved every 2 s and at the end,
    so a killed run keeps most of its progress and an interrupted one all of it)."""
    tally, last_save = _Tally(), time.monotonic()
    try:
        for src, dst, status, n_before, n_after, error, quality in pmap(_resize_one, jobs, workers, progress):
            if status == "no-space":  # the disk filled up: stop, keep what is done (the manifest below) and say so
                done = tally.resized + tally.copied
                raise DiskSpaceError(
                    f"{dst}: the disk is full ({error}); the {done} images finished are kept; free "
                    f"some space and run the same prepare again to complete {out_dir}"
                )
            if status == "failed":
                tally.failed.append(Problem("warning", "unreadable-image", src, f"skipped: {error}"))
                continue
            setattr(tally, status, getattr(tally, status) + 1)
            if quality:
                tally.qualities[quality] += 1
            tally.bytes_before, tally.bytes_after = tally.bytes_before + n_before, tally.bytes_after + n_after
            manifest[_key(Path(dst), out_dir)] = _stamp(Path(src), *settings)  # (size, quality) of this run
            if time.monotonic() - last_save > 2:
                _save_manifest(out_dir, manifest)
                last_save = time.monotonic()
    finally:
        with contextlib.suppress(OSError):  # a full disk may refuse the manifest too: a re-run then redoes those
            _save_manifest(out_dir, manifest)
    return tally


def _image_pairs(stats: DatasetStats, root: Path, out_dir: Path) -> list[tuple[Path, Path]]:
    """(source image, output image) for every image of every split, each once."""
    seen: dict[Path, Path] = {}
    for split in stats.splits:
        for image in split.image_files:
            src = Path(image)
            if src not in seen:
                seen[src] = out_dir / _relative(src, root)
    return list(seen.items())


def _refuse_writing_into_the_dataset(stats: DatasetStats, out_dir: Path) -> None:
    """The copy is written outside the dataset and every folder its images come from, as the filesystem sees them:
    an --out that is, or leads through a link to, the dataset would overwrite the originals."""
    folders = {Path(stats.root)}
    for split in stats.splits:
        for source in map(Path, split.sources):
            folders.add(source if source.is_dir() else source.parent)
    for folder in sorted(folders):
        if within(out_dir, folder):
            via = "" if out_dir.is_relative_to(folder) else ", through a link"
            raise UsageError(
                f"{said('out', out_dir)}: inside the dataset ({folder}{via}); the copy must go elsewhere (or pass "
                f"{said('in_place')} to overwrite the images themselves)"
            )


def _refuse_unwritable(stats: DatasetStats, out_dir: Path, in_place: bool) -> None:
    """Where the resized images go must be writable (a read-only mount, another user's folder): one line first,
    instead of an error from the middle of the work."""
    targets = {Path(i).parent for s in stats.splits for i in s.image_files} if in_place else {out_dir}
    for folder in sorted(targets):
        where = existing_parent(folder)
        if not os.access(where, os.W_OK | os.X_OK):
            option = said("in_place") if in_place else said("out")
            raise UsageError(f"{option}: cannot write in {where} (read-only or not yours); nothing was changed")


def _relative(path: Path, root: Path) -> Path:
    """Path inside the copy: relative to the dataset root, or under external/ for files outside it."""
    try:
        return path.relative_to(root)
    except ValueError:
        digest = hashlib.sha1(str(path.parent).encode()).hexdigest()[:8]
        return Path("external") / digest / "images" / path.name


def _relative_source(source: Path, root: Path) -> Path:
    """A split's source inside the copy: a folder outside the dataset root is where _relative put its images."""
    if source.is_dir() and not source.is_relative_to(root):
        return _relative(source / "x", root).parent
    return _relative(source, root)


def _key(dst: Path, out_dir: Path) -> str:
    return dst.relative_to(out_dir).as_posix()


def _stamp(src: Path, size: int, quality: int) -> list[int]:
    st = src.stat()
    return [st.st_size, st.st_mtime_ns, size, quality]


def _pending(
    pairs: list[tuple[Path, Path]], manifest: dict[str, list[int]], size: int, quality: int, out_dir: Path
) -> tuple[list[tuple[Path, Path]], int]:
    todo, unchanged = [], 0
    for src, dst in pairs:
        if manifest.get(_key(dst, out_dir)) == _stamp(src, size, quality) and dst.is_file():
            unchanged += 1
        else:
            todo.append((src, dst))
    return todo, unchanged


def _resize_one(job: tuple[str, str, int, int]) -> tuple[str, str, str, int, int, str, int]:
    """Worker: resize (or copy) one image to its output atomically; never raises. The last field is the JPEG/WebP
    quality written (0 for a copy or a lossless format)."""
    src, dst, size, setting = job
    try:
        before = os.path.getsize(src)
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        with open_image(src) as im:
            w, h = im.size
            fmt = im.format or PIL_FORMATS.get(Path(src).suffix.lower(), "PNG")
            quality = setting or copy_quality(jpeg_quality(im))
            if max(w, h) <= size:  # never upscale: the file is copied byte for byte
                _copy_atomic(Path(src), Path(dst))
                return src, dst, "copied", before, before, "", 0
            r = size / max(w, h)
            target = (max(1, round(w * r)), max(1, round(h * r)))
            im.draft(None, target)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below the target
            resized = _downscale(im, target)
            icc = im.info.get("icc_profile")
        resized = ImageOps.exif_transpose(resized)  # rotate the pixels per EXIF; the orientation tag is dropped
        _save_atomic(resized, Path(dst), fmt, quality, icc)
        lossy = quality if fmt in ("JPEG", "WEBP") else 0
        return src, dst, "resized", before, os.path.getsize(dst), "", lossy
    except Exception as exc:  # a corrupt image is reported and skipped, never the run's end; a full disk ends it
        return src, dst, "no-space" if is_disk_full(exc) else "failed", 0, 0, first_line(exc), 0


def _quality_setting(quality: int | str | None) -> int:
    """--quality as given (a number from 1 to 100, or auto) as the manifest records it: AUTO for auto."""
    if quality is None or (isinstance(quality, str) and quality.strip().lower() == "auto"):
        return AUTO
    try:
        value = int(quality) if not isinstance(quality, bool | float) else -1
    except ValueError:
        value = -1
    if not 1 <= value <= 100:
        raise UsageError(f"{said('quality', quality)}: a JPEG quality from 1 to 100, or auto")
    return value


def jpeg_quality(im: Image.Image) -> int | None:
    """The quality setting a JPEG was saved with, from its luminance quantization table (read from the header, no
    decoding): the median ratio of its entries to the IJG table at quality 50, inverted as libjpeg scales it.
    None for other formats or an unusual table."""
    tables = getattr(im, "quantization", None) if im.format == "JPEG" else None
    luma = tables.get(0) if tables else None
    base = [v for row in _IJG_LUMA for v in row]
    if not luma or len(luma) != len(base):
        return None
    scale = statistics.median(100 * q / b for q, b in zip(luma, base, strict=True))
    if scale <= 0:
        return None
    return max(1, min(100, round((200 - scale) / 2 if scale <= 100 else 5000 / scale)))


def copy_quality(source: int | None) -> int:
    """--quality auto: the quality a resized copy is written at, given its source's JPEG quality (None: not a JPEG,
    or unknown). 95, or for a source stored lower, QUALITY_ABOVE_SOURCE above it and at least QUALITY_FLOOR: a
    copy at 416 of a 640-px photo stored at 70 is then smaller than its source (0.81x at 85; 1.39x at 95)."""
    if source is None:
        return JPEG_QUALITY
    return max(QUALITY_FLOOR, min(JPEG_QUALITY, source + QUALITY_ABOVE_SOURCE))


def _downscale(im: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Area-averaging downscale (Pillow's BOX filter); 16-bit images go through 32-bit integer mode."""
    if im.mode in ("I;16", "I;16B", "I;16L"):
        return im.convert("I").resize(target, Image.Resampling.BOX).convert(im.mode)
    return im.resize(target, Image.Resampling.BOX)


def _save_atomic(im: Image.Image, dst: Path, fmt: str, quality: int, icc: bytes | None) -> None:
    kwargs: dict[str, Any] = {"exif": im.getexif().tobytes()} if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else {}
    if icc:
        kwargs["icc_profile"] = icc
    if fmt == "JPEG":
        im = im.convert("RGB") if im.mode not in ("RGB", "L", "CMYK") else im
        kwargs.update(quality=quality, optimize=False)
    elif fmt == "WEBP":
        kwargs.update(quality=quality)
    tmp = dst.with_name(f"{TMP_PREFIX}{dst.name}.{os.getpid()}.tmp")
    try:
        im.save(tmp, format=fmt, **kwargs)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f"{TMP_PREFIX}{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_labels(pairs: list[tuple[Path, Path]]) -> int:
    """Copy each image's label file unchanged (YOLO labels are normalised) to the label path of its copy."""
    copied = 0
    for src_image, dst_image in pairs:
        src, dst = Path(label_path(str(src_image))), Path(label_path(str(dst_image)))
        if not src.is_file() or _up_to_date(dst, src):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        _copy_atomic(src, dst)
        copied += 1
    return copied


def _up_to_date(copy: Path, original: Path) -> bool:
    """True when `copy` has the original's size and is not older (copy2 keeps the mtime)."""
    try:
        c, o = copy.stat(), original.stat()
    except OSError:
        return False
    return c.st_size == o.st_size and c.st_mtime >= o.st_mtime


def _write_yaml(stats: DatasetStats, root: Path, out_dir: Path) -> Path:
    """data.yaml of the copy: the original's keys, splits relative to the copy, no path: and no download:."""
    data: dict[str, Any] = {}
    if stats.yaml_path:
        original = load_yaml(Path(stats.yaml_path)) or {}
        data = {k: v for k, v in original.items() if k not in ("path", "download")}
    for split in stats.splits:
        entries = [_relative_source(Path(s), root).as_posix() for s in split.sources]
        for source, entry in zip(split.sources, entries, strict=True):
            if Path(source).suffix.lower() == ".txt":  # a list of image paths: list the copies instead
                _write_list(Path(source), out_dir / entry, root, out_dir)
        data[split.name] = entries[0] if len(entries) == 1 else entries
    data.setdefault("names", dict(enumerate(stats.names)))
    path = out_dir / "data.yaml"
    write_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode())
    return path


def _write_list(source: Path, dest: Path, root: Path, out_dir: Path) -> None:
    """The copy's version of a split given as a .txt list: each listed image's copy, relative to the list's own
    folder as ./path (how Ultralytics resolves a list's relative lines)."""
    lines = []
    for image in list_images([source]):
        copy = out_dir / _relative(Path(image), root)
        lines.append("./" + os.path.relpath(copy, dest.parent).replace(os.sep, "/"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, ("\n".join(lines) + "\n").encode())


def _remove_orphans(pairs: list[tuple[Path, Path]], manifest: dict[str, list[int]], out_dir: Path) -> int:
    """Delete outputs this tool wrote earlier whose source image no longer exists."""
    live = {_key(dst, out_dir) for _, dst in pairs}
    removed = 0
    for key in [k for k in manifest if k not in live]:
        (out_dir / key).unlink(missing_ok=True)
        del manifest[key]
        removed += 1
    return removed


def _remove_temp_files(out_dir: Path) -> None:
    """Temporary files a killed run left behind."""
    if out_dir.is_dir():
        for tmp in out_dir.rglob(f"{TMP_PREFIX}*.tmp"):
            tmp.unlink(missing_ok=True)


def _load_manifest(out_dir: Path) -> dict[str, list[int]]:
    try:
        data = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("files", {}) if isinstance(data, dict) else {}


def _save_manifest(out_dir: Path, manifest: dict[str, list[int]]) -> None:
    doc = {"version": 1, "fields": ["size", "mtime_ns", "target_size", "quality"], "files": manifest}
    write_atomic(out_dir / MANIFEST, json.dumps(doc).encode())


def _check_disk(stats: DatasetStats, size: int, out_dir: Path, pairs: list[tuple[Path, Path]], in_place: bool) -> None:
    """Refuse to start when the copy clearly cannot fit: estimate from the sources' bytes and the size ratio."""
    if in_place or not pairs:
        return
    total = sum(src.stat().st_size for src, _ in pairs)
    long_side = stats.image_sizes.median_long_side() or size
    check_free_disk(out_dir, total * min(1.0, (size / long_side) ** 2) / 1024**3, "the resized copy")


LOAD_SAMPLE = 64  # images timed for the preparation's saving: 16 gave 203 and 84 s at 25,000 images on two runs


def measure_load_ms(images: list[str], imgsz: int, sample: int = LOAD_SAMPLE) -> float | None:
    """Milliseconds to load one image as Ultralytics does (cv2.imread, then resize to imgsz): the median over a
    sample spread across the images (a median: one image delayed by other work does not move it)."""

    import cv2

    picked = images[:: max(1, len(images) // sample)][:sample]
    times = []
    for image in picked:
        t0 = time.perf_counter()
        try:
            im = cv2.imread(image)
        except cv2.error:  # a header over OpenCV's pixel limit raises; Ultralytics skips such an image
            continue
        if im is None:
            continue
        h, w = im.shape[:2]
        r = imgsz / max(h, w)
        if r != 1:
            cv2.resize(im, (max(1, round(w * r)), max(1, round(h * r))), interpolation=cv2.INTER_AREA)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 2) if times else None
