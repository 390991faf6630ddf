"""Find and read a YOLO dataset (data.yaml or images/ + labels/ layout) into DatasetStats; never writes."""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml
from PIL import Image

from speedtrain.errors import DatasetError
from speedtrain.parallel import Progress, pmap
from speedtrain.util import NotAFile, TooLarge, file_kind, first_line, is_regular_file, read_bounded

# Bound before ultralytics is imported (speedtrain imports it later, lazily): Ultralytics replaces Image.open with
# a wrapper that runs check_requirements("pi-heif") -- a pip install when online -- on any file Pillow cannot
# identify, so a corrupt JPEG met by the scan would start an install.
open_image = Image.open

# The extensions Ultralytics 8.4 loads as images (ultralytics/data/utils.py IMG_FORMATS).
IMG_FORMATS = frozenset(
    {
        "avif",
        "bmp",
        "dng",
        "heic",
        "heif",
        "jp2",
        "jpeg",
        "jpeg2000",
        "jpg",
        "mpo",
        "png",
        "tif",
        "tiff",
        "webp",
    }
)
YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml", "dataset.yml")
# Limits for a dataset yaml, which comes from anyone: COCO's own data.yaml is 3 KB and about 250 nodes. A few
# hundred bytes of nested aliases ("billion laughs") expand to billions of nodes when walked.
YAML_MAX_BYTES = 1024**2
YAML_MAX_NODES = 100_000
# Classes in a dataset: LVIS has 1,203 and Open Images 601; a count far beyond is a typo, and names for a
# billion classes would be built before anything else could fail
MAX_CLASSES = 100_000
VAL_DIR_NAMES = ("val", "valid", "validation")
SIZE_SAMPLE = 1000  # image headers read for the size summary; more images are sampled, and the stats say so
COORD_TOLERANCE = 0.01  # Ultralytics accepts normalised coordinates up to 1.01 (verify_image_label)


@dataclass(frozen=True, slots=True)
class Problem:
    severity: str  # "error" stops training; "warning" is reported and Ultralytics skips the file
    kind: str
    file: str
    detail: str

    def line(self) -> str:
        return f"{self.file}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Split:
    name: str
    sources: tuple[str, ...]  # absolute folders, list files or image files, as in data.yaml
    image_files: tuple[str, ...]
    label_files: tuple[str, ...]  # the label path Ultralytics would read for each image (may not exist)
    labelled: int  # images whose label file exists
    backgrounds: int  # images with no label file or an empty one
    instances: int
    # the 10th percentile of the boxes' sizes, sqrt(w x h) in normalised coordinates (a box, not a polygon); None
    # when the split has no boxes
    small_box: float | None = None


@dataclass(frozen=True, slots=True)
class ImageSizes:
    """(width, height) of a sample of the training images, read from headers."""

    dims: tuple[tuple[int, int], ...]
    total: int

    @property
    def sampled(self) -> bool:
        return len(self.dims) < self.total

    def median_long_side(self) -> int:
        return int(statistics.median(max(d) for d in self.dims)) if self.dims else 0

    def max_long_side(self) -> int:
        return max((max(d) for d in self.dims), default=0)

    def share_larger_than(self, long_side: int) -> float:
        """Fraction of sampled images whose long side exceeds `long_side`."""
        return sum(max(d) > long_side for d in self.dims) / len(self.dims) if self.dims else 0.0

    def decoded_bytes_per_image(self, imgsz: int | None, shrink_only: bool = False) -> float:
        """Mean bytes of one decoded image (3 channels uint8): long side resized to imgsz, or as stored if None;
        `shrink_only`: only images larger than imgsz are resized (a pre-resized copy keeps smaller ones as they are)."""
        if not self.dims:
            return (imgsz or 640) ** 2 * 3.0
        total = 0.0
        for w, h in self.dims:
            r = 1.0 if imgsz is None else imgsz / max(w, h)
            r = min(r, 1.0) if shrink_only else r
            total += round(w * r) * round(h * r) * 3
        return total / len(self.dims)


@dataclass(frozen=True, slots=True)
class DatasetStats:
    yaml_path: str | None  # the user's yaml, or None when the layout was read without one
    root: str
    names: tuple[str, ...]
    splits: tuple[Split, ...]
    image_sizes: ImageSizes
    problems: tuple[Problem, ...] = ()
    notes: tuple[str, ...] = field(default=())
    has_download_script: bool = False
    fingerprint: str = ""  # every image's and label file's path, size and mtime, hashed: what --resume checks

    def split(self, name: str) -> Split | None:
        return next((s for s in self.splits if s.name == name), None)

    @property
    def train_images(self) -> int:
        split = self.split("train")
        return len(split.image_files) if split else 0

    @property
    def val_images(self) -> int:
        split = self.split("val")
        return len(split.image_files) if split else 0

    @property
    def label_files(self) -> int:
        return sum(s.labelled for s in self.splits)

    @property
    def background_images(self) -> int:
        return sum(s.backgrounds for s in self.splits)

    @property
    def classes(self) -> int:
        return len(self.names)

    @property
    def sampled(self) -> bool:
        return self.image_sizes.sampled

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    def small_box_px(self, imgsz: int) -> float | None:
        """The training boxes' 10th-percentile size in pixels once images are letterboxed to `imgsz` (their long side
        to imgsz): the normalised size times imgsz times the images' median sqrt(w x h) / long side."""
        split = self.split("train")
        if split is None or split.small_box is None:
            return None
        dims = self.image_sizes.dims
        aspect = statistics.median(math.sqrt(w * h) / max(w, h) for w, h in dims) if dims else 1.0
        return round(split.small_box * imgsz * aspect, 2)

    def stored_gb(self, at_most: int | None) -> float:
        """Estimated size of Ultralytics' disk cache (.npy files of the images as stored, train and val), for the
        images as they are (None) or as a copy pre-resized to `at_most` px stores them."""
        per_image = self.image_sizes.decoded_bytes_per_image(at_most, shrink_only=True)
        return per_image * (self.train_images + self.val_images) / 1024**3

    def decoded_gb(self, imgsz: int | None) -> float:
        """Estimated size of Ultralytics' image cache: train and val each cache their images; None = full size."""
        per_image = self.image_sizes.decoded_bytes_per_image(imgsz)
        return per_image * (self.train_images + self.val_images) / 1024**3


def scan(path: str | Path, sample: int = SIZE_SAMPLE, copy_of: DatasetStats | None = None) -> DatasetStats:
    """Read the dataset at `path` (a folder or a yaml file) without modifying anything.

    `copy_of`: the dataset this one is speedtrain's resized copy of, whose label files it holds copied image for
    image (resize.resize_dataset); their figures are taken from it, so 25,000 labels are not read twice in a run."""
    yaml_path, data, root, notes = _resolve(Path(path))
    names = _names(data, yaml_path, root)
    splits, problems = [], []
    for split_name in ("train", "val", "test"):
        if split_name not in data or data[split_name] in (None, ""):
            continue
        known = copy_of.split(split_name) if copy_of is not None else None
        split, split_problems = _scan_split(split_name, data[split_name], root, len(names), yaml_path, known)
        splits.append(split)
        problems += split_problems
    train = next(s for s in splits if s.name == "train")
    val = next((s for s in splits if s.name == "val"), None)
    same = val is not None and set(val.image_files) == set(train.image_files)
    if same and not any("validating on the train" in n for n in notes):
        notes.append("val is the training images: its mAP measures memorisation, not how well the model generalises")
    if train.instances == 0:
        problems.append(
            Problem(
                "error",
                "no-labels",
                str(Path(train.sources[0])),
                f"none of the {len(train.image_files)} training images has a usable box "
                f"({train.labelled} label files, all empty or invalid): a detector cannot learn from background "
                f"images alone; label files go in labels/ beside images/, one 'class x y w h' line per box",
            )
        )
    if val is not None and val.instances == 0 and not same:
        problems.append(
            Problem(
                "warning",
                NO_VAL_BOXES,
                str(Path(val.sources[0])),
                f"none of the {len(val.image_files)} val images has a usable box ({val.labelled} label files): "
                "Ultralytics cannot compute mAP on them, so a run has no validation metrics; label them, or point "
                "val: at a labelled split",
            )
        )
    sizes, size_problems = _image_sizes(train.image_files, sample)
    return DatasetStats(
        yaml_path=str(yaml_path) if yaml_path else None,
        root=str(root),
        names=names,
        splits=tuple(splits),
        image_sizes=sizes,
        problems=tuple(problems + size_problems),
        notes=tuple(notes),
        has_download_script=bool(data.get("download")),
        fingerprint=fingerprint(splits),
    )


def fingerprint(splits: Iterable[Split]) -> str:
    """A hash of every image's and label file's path, size and modification time (a missing label counts as
    missing): equal when the files a run trains on are the ones it started with. Reads no image."""
    h = hashlib.sha1()
    for split in splits:
        for image, label in zip(split.image_files, split.label_files, strict=True):
            for path in (image, label):
                try:
                    st = os.stat(path)
                    h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{path}\0-\n".encode())
    return h.hexdigest()[:16]


def changes(before: DatasetSummaryLike, after: DatasetStats) -> list[str]:
    """What differs between a run's dataset and the same dataset now, in words ([] when nothing does)."""
    out = []
    for what, old, new in (
        ("training images", before.train_images, after.train_images),
        ("val images", before.val_images, after.val_images),
        ("label files", before.label_files, after.label_files),
    ):
        if old != new:
            out.append(f"{what} {old} -> {new}")
    if not out and before.fingerprint and before.fingerprint != after.fingerprint:
        out.append("images or label files changed (same counts)")
    return out


class DatasetSummaryLike(Protocol):
    """What a report keeps of a scan (records.DatasetSummary), as far as `changes` reads it."""

    @property
    def train_images(self) -> int: ...
    @property
    def val_images(self) -> int: ...
    @property
    def label_files(self) -> int: ...
    @property
    def fingerprint(self) -> str: ...


def _resolve(path: Path) -> tuple[Path | None, dict[str, Any], Path, list[str]]:
    """Return (yaml path or None, data mapping, dataset root, notes) for a folder or a yaml path."""
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    path = path.absolute()
    if not path.is_dir() and not path.is_file():  # a FIFO, a device, a socket: never opened, never waited on
        raise DatasetError(f"{path}: {file_kind(path.stat().st_mode)}, not a file; expected a dataset folder or yaml")
    if path.is_file() and path.suffix.lower() not in (".yaml", ".yml"):
        raise DatasetError(f"{path}: expected a dataset folder or a .yaml file")
    yaml_path = find_yaml(path)
    if yaml_path:
        return _read_yaml(yaml_path)
    if (path / "images").is_dir():
        return (None, *_layout_data(path))
    if len(list(path.glob("*.y*ml"))) > 1:
        raise DatasetError(f"{path}: several yaml files and no data.yaml; pass the yaml file itself")
    raise DatasetError(f"{path}: no data.yaml and no images/ folder; not a YOLO dataset")


def find_yaml(path: Path) -> Path | None:
    """The yaml a dataset path stands for: the file itself, data.yaml (or the like), or a folder's only yaml."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    for name in YAML_NAMES:
        if (path / name).exists() and not (path / name).is_dir():  # not a regular file: load_yaml says what it is
            return path / name
    yamls = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
    return yamls[0] if len(yamls) == 1 else None


def load_yaml(path: Path) -> Any:
    """yaml.safe_load with limits: at most YAML_MAX_BYTES, and at most YAML_MAX_NODES nodes once every alias is
    expanded (counted on the composed node graph, shared nodes once each, so the count itself stays cheap).
    Raises DatasetError with one line naming the file."""
    try:
        text = read_bounded(path, YAML_MAX_BYTES).decode("utf-8-sig")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except TooLarge:
        raise DatasetError(f"{path}: too large for a dataset yaml (limit 1 MB)") from None
    except NotAFile as exc:
        raise DatasetError(f"{exc}; expected a dataset yaml") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DatasetError(f"{path}: cannot read yaml ({first_line(exc)})") from None
    if node is not None and _expanded_nodes(node, {}) > YAML_MAX_NODES:
        raise DatasetError(
            f"{path}: its aliases expand to more than {YAML_MAX_NODES:,} values (a 'billion laughs' yaml?); refused"
        )
    try:  # a tag such as !!python/object/apply composes, and the safe loader refuses to construct it: nothing runs
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: cannot read yaml ({first_line(exc)})") from None


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in the document with every alias expanded; each distinct node is visited once (memo by id)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = YAML_MAX_NODES + 1  # a node reached again while being counted: a cycle, refuse it
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_nodes(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    else:
        total = 1
    memo[key] = min(total, YAML_MAX_NODES + 1)  # capped: the sums stay small numbers
    return memo[key]


def download_script(path: Path) -> str | None:
    """The `download:` entry of the dataset's yaml: a URL or code that plain Ultralytics runs when data is missing."""
    yaml_path = find_yaml(path)
    try:
        data = load_yaml(yaml_path) if yaml_path else None
    except DatasetError:
        return None
    script = data.get("download") if isinstance(data, dict) else None
    return str(script) if script else None


def _read_yaml(path: Path) -> tuple[Path, dict[str, Any], Path, list[str]]:
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with train, val and names keys")
    missing = [k for k in ("train", "val") if not data.get(k)]
    if missing:
        raise DatasetError(f"{path}: missing required key(s): {', '.join(missing)}")
    notes = []
    raw_root = data.get("path")
    if raw_root in (None, ""):
        root = path.parent
    else:
        root = Path(str(raw_root)).expanduser()
        if not root.is_absolute():
            # Plain Ultralytics resolves a relative `path:` against its global datasets_dir; the user meant
            # the folder the yaml lives in, so resolve it there and say so.
            root = (path.parent / root).absolute()
            notes.append(f"relative path '{raw_root}' resolved against the yaml's folder: {root}")
    return path, data, Path(os.path.normpath(root)), notes


def _layout_data(path: Path) -> tuple[dict[str, Any], Path, list[str]]:
    """Build the data mapping for an images/ + labels/ folder without a yaml."""
    images = path / "images"
    train = images / "train" if (images / "train").is_dir() else images
    val = next((images / v for v in VAL_DIR_NAMES if (images / v).is_dir()), None)
    notes = [f"no data.yaml in {path}; read the images/ + labels/ layout"]
    if val is None:
        val = train
        notes.append("no validation split found; validating on the training images")
    data: dict[str, Any] = {"train": str(train), "val": str(val)}
    classes_txt = path / "classes.txt"
    if classes_txt.is_file():
        try:
            text = read_bounded(classes_txt, YAML_MAX_BYTES).decode("utf-8-sig", errors="replace")
        except OSError as exc:
            raise DatasetError(f"{classes_txt}: cannot read the class names ({first_line(exc)})") from None
        data["names"] = [n.strip() for n in text.splitlines() if n.strip()]
    return data, path, notes


def _names(data: dict[str, Any], yaml_path: Path | None, root: Path) -> tuple[str, ...]:
    where = str(yaml_path) if yaml_path else "dataset"
    names, nc = data.get("names"), data.get("nc")
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: names keys must be class ids 0, 1, 2, ...") from None
        if keys != list(range(len(keys))):
            raise DatasetError(f"{where}: names keys must run 0..{len(keys) - 1} without gaps")
        names = [names.get(k, names.get(str(k))) for k in keys]
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or not 1 <= nc <= MAX_CLASSES):
        raise DatasetError(f"{where}: nc is {nc!r}; expected a whole number of classes from 1 to {MAX_CLASSES:,}")
    if names is None:
        if nc is None:
            return _names_from_labels(data, root, yaml_path)
        names = [f"class{i}" for i in range(nc)]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{where}: names must be a non-empty list or mapping")
    if len(names) > MAX_CLASSES:
        raise DatasetError(f"{where}: {len(names):,} class names; speedtrain trains at most {MAX_CLASSES:,} classes")
    if nc is not None and nc != len(names):
        raise DatasetError(f"{where}: nc is {nc} but names lists {len(names)} classes")
    return tuple(str(n) for n in names)


def _names_from_labels(data: dict[str, Any], root: Path, yaml_path: Path | None) -> tuple[str, ...]:
    """Name classes class0..classN after the largest id in the training labels (no names, no nc, no classes.txt);
    the train entries resolve against the dataset root, as the splits themselves do."""
    single = not isinstance(data["train"], list)
    entries = data["train"] if not single else [data["train"]]
    sources = [split_source(e, root, single) for e in entries]
    top, where_top = -1, ""
    for image in list_images([s for s in sources if s.exists()]):
        for row in _label_rows(Path(label_path(image))) or []:
            if row and row[0].isdigit() and int(row[0]) > top:
                top, where_top = int(row[0]), label_path(image)
    if top >= MAX_CLASSES:  # names would be built for every id up to it
        raise DatasetError(
            f"{where_top}: class id {top} with no names: or nc: in the dataset; speedtrain trains at most "
            f"{MAX_CLASSES:,} classes (a typo in the label?)"
        )
    if top < 0:
        where = f"{yaml_path} has no names: or nc: key, and" if yaml_path else f"{root}: no classes.txt, and"
        raise DatasetError(f"{where} the training labels hold no class ids to name classes from")
    return tuple(f"class{i}" for i in range(top + 1))


def split_source(entry: Any, root: Path, single: bool = True) -> Path:
    """Where a split entry of a data yaml points: absolute, or relative to the dataset root.

    Roboflow exports write `train: ../train/images` into a data.yaml that sits beside `train/`; Ultralytics resolves
    such a path in the yaml's folder when the literal one does not exist (data/utils.py check_det_dataset, 8.4.190:
    a string entry starting with "../"; list items are taken as written), and so does speedtrain."""
    text = str(entry)
    p = Path(text).expanduser()
    if p.is_absolute():
        return p
    if single and text.startswith("../") and not (root / p).exists() and (root / text[3:]).exists():
        return Path(os.path.normpath(root / text[3:]))
    return root / p


def _scan_split(
    name: str, entry: Any, root: Path, nc: int, yaml_path: Path | None, known: Split | None = None
) -> tuple[Split, list[Problem]]:
    entries = entry if isinstance(entry, list) else [entry]
    sources = []
    for item in entries:
        p = split_source(item, root, single=not isinstance(entry, list))
        if not p.exists():
            where = f" (from {yaml_path})" if yaml_path else ""
            raise DatasetError(f"{name} split not found: {p}{where}")
        sources.append(p)
    images = list_images(sources)
    if not images:
        raise DatasetError(f"{name} split has no images: {', '.join(map(str, sources))}")
    labels = tuple(label_path(i) for i in images)
    problems: list[Problem] = _shared_labels(images, labels) + _tiffs_opencv_cannot_read(images)
    if known is not None and len(known.image_files) == len(images):  # the copied labels of `known`: read already
        figures = (known.labelled, known.backgrounds, known.instances, known.small_box)
        return Split(name, tuple(map(str, sources)), images, labels, *figures), problems
    labelled = backgrounds = instances = 0
    sides: list[float] = []
    for label in labels:
        rows = _label_rows(Path(label))
        if rows is None:
            backgrounds += 1
            continue
        labelled += 1
        good = _check_rows(rows, label, nc, problems, sides)
        instances += good
        backgrounds += not rows
    small = _quantile(sides, SMALL_BOX_QUANTILE)
    split = Split(name, tuple(map(str, sources)), images, labels, labelled, backgrounds, instances, small)
    return split, problems


SMALL_BOX_QUANTILE = 0.1  # the box size the plan keeps large enough at its lowest resolution (schedule.py)
NO_VAL_BOXES = "val-no-boxes"  # a val split with no box at all: no metrics can be computed on it


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values.sort()
    return round(values[min(len(values) - 1, int(q * len(values)))], 6)


def _shared_labels(images: tuple[str, ...], labels: tuple[str, ...]) -> list[Problem]:
    """Images whose names differ only in the extension (a.jpg, a.png) read the same label file: Ultralytics
    trains both with its boxes, which can be right for one of them at most."""
    readers: dict[str, list[str]] = {}
    for image, label in zip(images, labels, strict=True):
        readers.setdefault(label, []).append(image)
    return [
        Problem(
            "warning",
            "shared-label",
            label,
            f"read by {len(imgs)} images: {', '.join(Path(i).name for i in imgs)}"
            "; rename all but one (each image's boxes go in its own label file)",
        )
        for label, imgs in readers.items()
        if len(imgs) > 1
    ]


def _check_rows(rows: list[list[str]], label: str, nc: int, problems: list[Problem], sides: list[float]) -> int:
    """Validate label rows like Ultralytics' verify_image_label; return the count of usable rows. Each usable box's
    size, sqrt(w x h) in normalised coordinates, is appended to `sides`."""
    good = 0
    for n, row in enumerate(rows, 1):
        if row and row[0] in ("<too-large>", "<binary>", "<not-a-file>", "<unreadable>"):
            what = {
                "<too-large>": f"{row[-1]}, too large to be a label file",
                "<binary>": "binary content",
                "<not-a-file>": f"{row[-1]}, not a file",
                "<unreadable>": f"cannot be read ({row[-1]})",
            }[row[0]]
            problems.append(Problem("error", "not-a-label-file", label, f"{what}; Ultralytics cannot read it"))
            return 0
        if len(row) < 5 or (len(row) > 5 and len(row) % 2 == 0):
            problems.append(Problem("warning", "malformed-label", label, f"line {n}: {len(row)} columns"))
            continue
        try:
            cls, coords = float(row[0]), [float(v) for v in row[1:]]
        except ValueError:
            problems.append(Problem("warning", "malformed-label", label, f"line {n}: not numbers"))
            continue
        if not math.isfinite(cls) or cls != int(cls) or not 0 <= cls < nc:
            problems.append(
                Problem("error", "class-out-of-range", label, f"line {n}: class id {row[0]} outside 0..{nc - 1}")
            )
            continue
        if not all(math.isfinite(v) for v in coords):
            problems.append(Problem("error", "coords-not-finite", label, f"line {n}: NaN or infinite coordinate"))
            continue
        if min(coords) < -COORD_TOLERANCE or max(coords) > 1 + COORD_TOLERANCE:
            problems.append(Problem("warning", "coords-out-of-range", label, f"line {n}: coordinates outside [0, 1]"))
            continue
        if len(coords) == 4:
            sides.append(math.sqrt(max(coords[2], 0.0) * max(coords[3], 0.0)))
        good += 1
    return good


LABEL_MAX_BYTES = 4 * 1024**2  # about 100,000 boxes; a label file larger than this is not a label file


def _label_rows(label: Path) -> list[list[str]] | None:
    """Rows of a label file split on whitespace (CRLF-safe, a UTF-8 BOM dropped as Ultralytics' reader does), or
    None when the file does not exist. A file too large to be labels, something that is not a file (a FIFO, a
    device), or binary content is read as one malformed row: reported, never read beyond the limit, never waited on."""
    try:
        data = read_bounded(label, LABEL_MAX_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except TooLarge:
        return [["<too-large>", f"over {LABEL_MAX_BYTES // 1024**2}MB"]]
    except NotAFile:
        try:
            kind = file_kind(os.stat(label).st_mode)
        except OSError:
            kind = "not a file"
        return [["<not-a-file>", kind]]
    except OSError as exc:
        return [["<unreadable>", first_line(exc)]]
    if b"\0" in data:
        return [["<binary>"]]
    text = data.decode("utf-8-sig", errors="replace")
    return [line.split() for line in text.splitlines() if line.strip()]


def label_path(image: str) -> str:
    """The label file Ultralytics reads for an image: last /images/ becomes /labels/, extension .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(image.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def list_images(sources: Iterable[Path]) -> tuple[str, ...]:
    """Image files under folders, in list files (one path per line), or given directly, sorted like Ultralytics."""
    files: list[str] = []
    for source in sources:
        if source.is_dir():
            files += [str(p) for p in source.rglob("*") if p.is_file()]  # is_file(): regular files only
        elif source.suffix.lower() == ".txt":
            parent = source.parent
            for line in _list_file(source).splitlines():
                line = line.strip()
                if line:
                    p = Path(line)
                    files.append(str(p if p.is_absolute() else parent / p))
        else:
            files.append(str(source))
    images = {f for f in files if f.rpartition(".")[-1].lower() in IMG_FORMATS}
    # a FIFO or a device named like an image would block or never end when decoded: only regular files count
    return tuple(sorted(f for f in images if is_regular_file(f)))


LIST_MAX_BYTES = 256 * 1024**2  # a split's .txt list: about two million image paths


def _list_file(source: Path) -> str:
    """The text of a split's .txt list of images, bounded; one DatasetError line when it cannot be one."""
    try:
        return read_bounded(source, LIST_MAX_BYTES).decode("utf-8-sig", errors="replace")
    except TooLarge:
        raise DatasetError(f"{source}: over {LIST_MAX_BYTES // 1024**2} MB, too large for a list of images") from None
    except NotAFile as exc:
        raise DatasetError(f"{exc}; expected a list of images") from None
    except OSError as exc:
        raise DatasetError(f"{source}: cannot read the list of images ({first_line(exc)})") from None


TIFF_SUFFIXES = (".tif", ".tiff")
OPENCV_CANNOT = "opencv-cannot-decode"
PILLOW_DECODED = (".avif", ".heic", ".heif")  # Ultralytics reads these with Pillow (PIL_FALLBACK_SUFFIXES)


def _tiffs_opencv_cannot_read(images: tuple[str, ...]) -> list[Problem]:
    """TIFFs with 32-bit samples (Pillow modes F and I): Pillow opens them, OpenCV, which Ultralytics trains with,
    decodes them as nothing ("can not handle images with 32-bit samples"), and the first batch holding one stops the
    run. Only TIFF headers are read (other formats OpenCV decodes whenever Pillow does), so the scan stays cheap."""
    problems = []
    for image in images:
        if not image.lower().endswith(TIFF_SUFFIXES):
            continue
        try:
            with open_image(image) as im:
                mode = im.mode
        except Exception:  # an unreadable file: Ultralytics' own check skips it, and `check` reports it
            continue
        if mode in ("F", "I") or mode.startswith(("F;", "I;32")):
            why = f"a TIFF with 32-bit samples (mode {mode}) that OpenCV cannot decode; training leaves it out"
            problems.append(Problem("warning", OPENCV_CANNOT, image, why))
    return problems


def opencv_decodes(data: bytes) -> bool:
    """Whether OpenCV, which Ultralytics' loader uses, decodes these image bytes: it returns None for a format it
    cannot read and raises for a header over its pixel limit (2^30 pixels)."""
    import cv2
    import numpy as np

    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    except cv2.error:
        return False


def opencv_skips(stats: DatasetStats) -> frozenset[str]:
    """Images the scan found that Ultralytics would fail to load with OpenCV: the linked view leaves them out."""
    return frozenset(p.file for p in stats.problems if p.kind == OPENCV_CANNOT)


def _image_sizes(images: tuple[str, ...], sample: int) -> tuple[ImageSizes, list[Problem]]:
    picked = images if len(images) <= sample else tuple(random.Random(0).sample(images, sample))
    dims, problems = [], []
    for image in picked:
        try:
            with open_image(image) as im:
                dims.append(im.size)
        except Exception as exc:  # any failure reading one image makes it unreadable, never the scan's failure
            problems.append(Problem("warning", "unreadable-image", image, f"cannot read image ({exc})"))
    return ImageSizes(tuple(dims), len(images)), problems


def check(stats: DatasetStats, workers: int | None = None, progress: Progress | None = None) -> tuple[Problem, ...]:
    """Full validation: every image decoded (corrupt, truncated), duplicates by content, labels without images.

    Adds to the scan's label checks; reads only.
    """
    images = sorted({i for s in stats.splits for i in s.image_files})
    problems = [p for p in stats.problems if p.kind not in ("unreadable-image", OPENCV_CANNOT)]  # re-checked below
    first_by_hash: dict[str, str] = {}
    for image, digest, error in sorted(pmap(_inspect_image, images, workers, progress)):  # sorted: first is first
        if error == OPENCV_CANNOT:
            why = "Pillow reads it but OpenCV, which Ultralytics loads images with, cannot; " + (
                "training leaves it out" if image.lower().endswith(TIFF_SUFFIXES) else "convert it (e.g. to PNG)"
            )
            problems.append(Problem("warning", OPENCV_CANNOT, image, why))
        elif error:
            problems.append(Problem("warning", "unreadable-image", image, f"cannot decode ({error})"))
        elif digest in first_by_hash:
            problems.append(Problem("warning", "duplicate-image", image, f"same bytes as {first_by_hash[digest]}"))
        else:
            first_by_hash[digest] = image
    problems += _orphan_labels(stats)
    return tuple(problems)


def _inspect_image(image: str) -> tuple[str, str, str]:
    """Worker: (image, content hash, decode error or '')."""
    try:
        data = Path(image).read_bytes()
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        with open_image(io.BytesIO(data)) as im:
            im.load()  # a truncated JPEG fails here ("image file is truncated"), not at open
        if not image.lower().endswith(PILLOW_DECODED) and not opencv_decodes(data):
            return image, digest, OPENCV_CANNOT
        return image, digest, ""
    except Exception as exc:  # any decode failure makes this image unreadable, never the check's failure
        return image, "", first_line(exc)


def _orphan_labels(stats: DatasetStats) -> list[Problem]:
    """Label files in the splits' label folders that belong to no image."""
    expected = {label for s in stats.splits for label in s.label_files}
    folders = set()
    for split in stats.splits:
        for source in map(Path, split.sources):
            if source.is_dir():
                folders.add(Path(label_path(str(source / "x.jpg"))).parent)
    orphans = []
    for folder in sorted(f for f in folders if f.is_dir()):
        for label in sorted(folder.rglob("*.txt")):
            if str(label) not in expected and label.name != "classes.txt":
                orphans.append(Problem("warning", "label-without-image", str(label), "no image for this label"))
    return orphans
