"""`--pipeline fast`: decode every training image once into a store, augment whole batches with torch.

Ultralytics' CPU pipeline decodes, mosaics, warps and colour-jitters each image in worker processes every epoch.
Here each epoch reads raw pixels from a uint8 store (read into RAM when it fits, memory-mapped otherwise) and
the augmentation runs on the training device as a fixed number of whole-batch tensor ops: the mosaic tiles are
laid in an atlas and sampled through each image's random affine matrix by one grid_sample (no canvas composed
image by image), HSV jitter and flips are per-image selects, and boxes travel as one padded (B, N, 5) tensor
with a validity mask that Ultralytics' box_candidates rule narrows. Nothing in a batch reads a GPU value back to
the host until the targets are handed to the loss (one nonzero). A background thread gathers the next batches
into pinned memory and copies them on a side CUDA stream while the current step runs (YOLOX's data_prefetcher
pattern). Geometry runs in float32 regardless of AMP.

Why hand-written torch rather than kornia (measured on the 2-vCPU development VM, CPU tensors, augmentation
alone, `python benchmarks/pipeline.py --augment-only`): at 416 px this code did 43 images/s at batch 16 and 24
at batch 64 against kornia 0.9's AugmentationSequential (RandomMosaic, RandomAffine, ColorJiggle, flips,
bbox_xyxy) 47 and 21; at 640, 12 and 8 against 13 and 8: as fast within run-to-run noise. It dispatches 423 aten
ops per batch at any batch size and none that syncs; kornia 1,212 at batch 16, 1,452 at 64, and 13 syncing ops
per batch. Both keep a painted box on its
pixels. kornia's mosaic and colour jitter are not Ultralytics' (its RandomMosaic crops differently, ColorJiggle
is not Ultralytics' HSV gains) and it does not apply Ultralytics' box filter, so it would change the training
recipe as well as cost more; torchvision.transforms.v2 draws one set of parameters per call, not per image.
DALI needs CUDA, and this code must also run on CPU tensors for the tests. Losses, validation (Ultralytics' own
loader), checkpoints, EMA, AMP, resume and DDP stay Ultralytics' own: speedtrain.ultra.FastDetectionTrainer only
replaces the training loader and the per-batch preprocessing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from speedtrain.dataset import label_path, list_images
from speedtrain.knobs import said
from speedtrain.parallel import pmap
from speedtrain.planner import RAM_CACHE_FACTOR, RAM_RESERVE_GB
from speedtrain.util import check_free_disk, write_atomic

PAD = 114  # Ultralytics' fill value for letterbox and mosaic borders
WH_THR, AR_THR, AREA_THR = 2.0, 100.0, 0.1  # Ultralytics' RandomPerspective.box_candidates defaults (boxes)
STORE_DIR = ".pipeline"


# --- the decoded store ----------------------------------------------------------------------------------------


@dataclass
class Store:
    """N training images, each resized (long side = imgsz, no upscaling beyond) into the top-left of an
    imgsz x imgsz uint8 RGB slot, with their (h, w) and labels as (cls, x1, y1, x2, y2) pixels of that frame."""

    folder: Path
    imgsz: int
    images: np.ndarray  # memmap (N, S, S, 3) uint8
    hw: np.ndarray  # (N, 2) int
    labels: list[np.ndarray]  # per image (n, 5) float32
    files: list[str]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def size_gb(self) -> float:
        return self.images.nbytes / 1024**3


def store_key(files: list[str], imgsz: int) -> str:
    """Changes when any image or label file is added, removed or modified, or the size changes."""
    h = hashlib.sha1(str(imgsz).encode())
    for f in files:
        for p in (f, label_path(f)):
            try:
                st = os.stat(p)
                h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{p}:-".encode())
    return h.hexdigest()[:16]


def build_store(train_source: str | list[str], imgsz: int, root: Path, workers: int | None = None) -> Store:
    """Decode the training images once into root/.pipeline/<key>/ (reused while nothing changes).

    Built once per store even when several processes ask at once (the DDP ranks of one node): they take a lock
    file in turn, and the first one builds while the others wait and reuse it. The store is built in a private
    folder and renamed into place complete, so no reader ever sees half of one (where file locks do not exist,
    as on Windows, two builders each build and the second simply finds the first's in place)."""
    sources = train_source if isinstance(train_source, list) else [train_source]
    files = list(list_images([Path(s) for s in sources]))
    folder = root / STORE_DIR / f"{store_key(files, imgsz)}-{imgsz}"
    if not (folder / "meta.json").is_file():
        _check_room(root, len(files) * imgsz * imgsz * 3)  # before anything is written
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder.with_name(f".{folder.name}.lock")):
            if not (folder / "meta.json").is_file():  # nobody built it while this process waited
                _build(folder, files, imgsz, workers)
    return load_store(folder)


def _build(folder: Path, files: list[str], imgsz: int, workers: int | None) -> None:
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        data_path = tmp / "images.u8"
        np.lib.format.open_memmap(data_path, mode="w+", dtype=np.uint8, shape=(len(files), imgsz, imgsz, 3)).flush()
        jobs = [(i, f, imgsz, str(data_path)) for i, f in enumerate(files)]
        hw = np.zeros((len(files), 2), dtype=np.int32)
        for i, h, w in pmap(_decode_into, jobs, workers):
            hw[i] = (h, w)
        labels = [_labels_for(f, int(h), int(w)) for f, (h, w) in zip(files, hw, strict=True)]
        np.savez(
            tmp / "labels.npz",
            hw=hw,
            counts=np.array([len(x) for x in labels]),
            rows=np.concatenate(labels) if labels else np.zeros((0, 5), np.float32),
        )
        write_atomic(tmp / "meta.json", json.dumps({"files": files, "imgsz": imgsz}).encode())
        if folder.exists() and not (folder / "meta.json").is_file():
            shutil.rmtree(folder)  # half of one from a run that was killed before the store existed in this form
        try:
            os.replace(tmp, folder)
        except OSError:  # another builder's complete store is in place already (no file locks here): use it
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """An exclusive lock on `lock` (a file) for the block, between processes; none where fcntl is missing."""
    try:
        import fcntl  # noqa: PLC0415 -- Unix only
    except ImportError:  # Windows: the atomic rename in _build still keeps every store whole
        yield
        return
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_room(root: Path, nbytes: int) -> None:
    """The store is written once, in full: refuse before writing when the disk cannot hold it."""
    check_free_disk(
        root,
        nbytes / 1024**3,
        "the fast pipeline's decoded store",
        f"free space, lower {said('imgsz')}, or use {said('pipeline', 'ultralytics')}",
    )


def load_store(folder: Path) -> Store:
    meta = json.loads((folder / "meta.json").read_text())
    arrays = np.load(folder / "labels.npz")
    rows, counts = arrays["rows"], arrays["counts"]
    labels = np.split(rows, np.cumsum(counts)[:-1]) if len(counts) else []
    images = np.load(folder / "images.u8", mmap_mode="r")
    return Store(folder, meta["imgsz"], images, arrays["hw"], list(labels), meta["files"])


def _decode_into(job: tuple[int, str, int, str]) -> tuple[int, int, int]:
    """Worker: decode one image (BGR->RGB), resize its long side to imgsz (area), write its slot; (i, h, w)."""
    import cv2

    i, path, imgsz, data_path = job
    try:
        im = cv2.imread(path)  # applies EXIF orientation, as Ultralytics' loader does
    except cv2.error:  # a header over OpenCV's pixel limit raises
        im = None
    if im is None:
        return i, 0, 0  # unreadable: an empty slot with no labels, never sampled for boxes
    h0, w0 = im.shape[:2]
    r = imgsz / max(h0, w0)
    h, w = min(imgsz, max(1, round(h0 * r))), min(imgsz, max(1, round(w0 * r)))
    im = cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    slots = np.load(data_path, mmap_mode="r+")
    slots[i].fill(PAD)
    slots[i, :h, :w] = im[:, :, ::-1]
    slots.flush()
    return i, h, w


def _labels_for(image: str, h: int, w: int) -> np.ndarray:
    """(cls, x1, y1, x2, y2) in pixels of the resized image; polygons become their bounding boxes."""
    rows = []
    try:
        lines = Path(label_path(image)).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        v = line.split()
        if len(v) < 5 or (len(v) > 5 and len(v) % 2 == 0):
            continue
        try:
            nums = [float(x) for x in v]
        except ValueError:
            continue
        if len(nums) == 5:
            c, cx, cy, bw, bh = nums
            x1, y1, x2, y2 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
        else:
            xs, ys = nums[1::2], nums[2::2]
            c, x1, y1, x2, y2 = nums[0], min(xs), min(ys), max(xs), max(ys)
        rows.append([c, x1 * w, y1 * h, x2 * w, y2 * h])
    return np.array(rows, dtype=np.float32).reshape(-1, 5) if h and w else np.zeros((0, 5), np.float32)


# --- batched augmentation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyp:
    """The Ultralytics hyperparameters the fast pipeline honours (same names and meanings)."""

    mosaic: float = 1.0
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    fliplr: float = 0.5
    flipud: float = 0.0
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4

    @classmethod
    def from_args(cls, args: Any) -> Hyp:
        return cls(**{k: float(getattr(args, k)) for k in cls.__dataclass_fields__})


@dataclass
class StoreTensors:
    """The store as torch tensors on the host: what a batch is gathered from with a few whole-batch ops."""

    images: Any  # (N, S, S, 3) uint8: the memory map itself, or a copy in RAM
    labels: Any  # (N, L, 5) float32, padded with zeros to the most boxes any image has (L >= 1)
    counts: Any  # (N,) int64: how many rows of `labels` are real
    hw: Any  # (N, 2) int64
    resident: bool  # True: the images were read into RAM; False: memory-mapped, read from disk as batches need them

    @classmethod
    def of(cls, store: Store, resident: bool = False) -> StoreTensors:

        import torch

        counts = np.array([len(x) for x in store.labels], dtype=np.int64)
        padded = np.zeros((len(store), max(1, int(counts.max(initial=0))), 5), dtype=np.float32)
        for i, rows in enumerate(store.labels):
            padded[i, : len(rows)] = rows
        with warnings.catch_warnings():  # a read-only memory map: torch warns that it must not be written; it is not
            warnings.simplefilter("ignore", UserWarning)
            images = torch.from_numpy(np.array(store.images) if resident else np.asarray(store.images))
        return cls(
            images=images,
            labels=torch.from_numpy(padded),
            counts=torch.from_numpy(counts),
            hw=torch.from_numpy(np.asarray(store.hw, dtype=np.int64)),
            resident=resident,
        )


def gather(st: StoreTensors, indices: Any, hyp: Hyp, mosaic_on: bool, gen: Any, pin: bool = False) -> dict[str, Any]:
    """Host side of a batch: pick the mosaic partners and flags (`gen`, a CPU generator) and gather every tile's
    pixels, boxes and sizes with whole-batch index ops, into pinned memory when `pin` (for an async copy)."""
    import torch

    idx = torch.as_tensor(indices, dtype=torch.int64)
    b = len(idx)
    n = st.images.shape[0]
    if mosaic_on and hyp.mosaic > 0:
        mosaic = torch.rand(b, generator=gen) < hyp.mosaic
        partners = torch.randint(0, n, (b, 3), generator=gen)
        tiles = torch.cat([idx[:, None], partners], 1)  # (B, 4): the image itself first, as Ultralytics does
    else:
        mosaic = torch.zeros(b, dtype=torch.bool)
        tiles = idx[:, None]  # (B, 1): close_mosaic epochs read one image per sample
    flat = tiles.reshape(-1)
    t = tiles.shape[1]
    s = st.images.shape[1]
    pixels = torch.empty((b * t, s, s, 3), dtype=torch.uint8, pin_memory=pin)
    torch.index_select(st.images, 0, flat, out=pixels)  # releases the GIL: a loader thread runs beside training
    return {
        "tiles": pixels.view(b, t, s, s, 3),
        "labels": st.labels.index_select(0, flat).view(b, t, -1, 5),
        "counts": st.counts.index_select(0, flat).view(b, t),
        "hw": st.hw.index_select(0, flat).view(b, t, 2),
        "mosaic": mosaic,
        "index": idx,
    }


def to_device(host: dict[str, Any], device: Any) -> dict[str, Any]:
    """Copy a gathered batch to the training device (asynchronously from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in host.items()}


def make_batch(
    store: Store | StoreTensors, indices: Any, hyp: Hyp, mosaic_on: bool, gen: Any, device: Any, dgen: Any = None
) -> dict[str, Any]:
    """Gather and augment one batch; padded targets (see `augment`). `gen` draws the host-side choices, `dgen`
    (a generator on `device`; default `gen` on CPU) the augmentation's random numbers."""
    st = store if isinstance(store, StoreTensors) else StoreTensors.of(store)
    batch = to_device(gather(st, indices, hyp, mosaic_on, gen), device)
    return augment(batch, hyp, int(st.images.shape[1]), dgen if dgen is not None else gen)


def augment(batch: dict[str, Any], hyp: Hyp, size: int, gen: Any) -> dict[str, Any]:
    """Mosaic, random affine, HSV and flips on a gathered batch, as a fixed number of whole-batch tensor ops.

    Returns {"img": (B, 3, S, S) float 0-1, "boxes": (B, N, 5) (cls, x1, y1, x2, y2) pixels, "mask": (B, N) bool,
    "index": (B,)}. Nothing is read back to the host: the boxes a filter drops are masked out, not removed.
    Geometry runs in float32 even under AMP (fp16 would move boxes by up to a pixel).
    """
    import torch

    device = batch["tiles"].device
    with torch.autocast(device.type, enabled=False):
        b = batch["tiles"].shape[0]
        rand = lambda *shape: torch.rand(*shape, generator=gen, device=gen.device).to(device)  # noqa: E731
        mosaic = batch["mosaic"]
        canvas = torch.where(mosaic, 2.0 * size, float(size))
        centre = (rand(b, 2) * size + size / 2).floor()  # Ultralytics: int(uniform(s/2, 3s/2)) per axis
        m, scale = affine_matrices(canvas, size, hyp, rand)
        offsets, used = _tile_offsets(batch["hw"], mosaic, centre, size)
        img = warp(batch["tiles"], offsets, used, mosaic, centre, canvas, m, size)
        boxes, mask = _place_boxes(batch["labels"], batch["counts"], offsets, used, canvas)
        boxes, mask = warp_boxes(boxes, mask, m, scale, size)
        img = hsv(img, hyp, rand)
        img, boxes = flips(img, boxes, hyp, rand)
    return {"img": img / 255, "boxes": boxes, "mask": mask, "index": batch["index"]}


def affine_matrices(canvas: Any, out_size: int, hyp: Hyp, rand: Any) -> tuple[Any, Any]:
    """Per-image 3x3 matrices M = T @ S @ R @ C exactly as Ultralytics' RandomPerspective (no perspective term);
    `canvas` is each image's input size (2S for a mosaic, S for a single image)."""
    import torch

    n = canvas.shape[0]
    u = lambda lo, hi: rand(n) * (hi - lo) + lo  # noqa: E731
    eye = torch.eye(3, device=canvas.device).repeat(n, 1, 1)
    c, r, sh, t = eye.clone(), eye.clone(), eye.clone(), eye.clone()
    c[:, 0, 2] = c[:, 1, 2] = -canvas / 2
    a = u(-hyp.degrees, hyp.degrees) * math.pi / 180
    s = u(1 - hyp.scale, 1 + hyp.scale)
    # cv2.getRotationMatrix2D(angle=a, center=(0, 0), scale=s): [[s cos a, s sin a], [-s sin a, s cos a]]
    r[:, 0, 0], r[:, 0, 1], r[:, 1, 0], r[:, 1, 1] = s * a.cos(), s * a.sin(), -s * a.sin(), s * a.cos()
    sh[:, 0, 1] = torch.tan(u(-hyp.shear, hyp.shear) * math.pi / 180)
    sh[:, 1, 0] = torch.tan(u(-hyp.shear, hyp.shear) * math.pi / 180)
    t[:, 0, 2] = u(0.5 - hyp.translate, 0.5 + hyp.translate) * out_size
    t[:, 1, 2] = u(0.5 - hyp.translate, 0.5 + hyp.translate) * out_size
    return t @ sh @ r @ c, s


def _tile_offsets(hw: Any, mosaic: Any, centre: Any, size: int) -> tuple[Any, Any]:
    """Where each tile's top-left corner lands on the canvas, (B, T, 2) as (x, y), and which tiles are used.

    Mosaic (Ultralytics' load_mosaic): tile 0 ends at the centre (top left), tile 1 starts at its x (top right),
    tile 2 at its y (bottom left), tile 3 at it (bottom right). A single image is centred (LetterBox, no upscaling).
    """
    import torch

    h, w = hw[..., 0].float(), hw[..., 1].float()
    t = hw.shape[1]
    xc, yc = centre[:, 0:1], centre[:, 1:2]
    if t == 4:
        ox = torch.stack([xc[:, 0] - w[:, 0], xc[:, 0], xc[:, 0] - w[:, 2], xc[:, 0]], 1)
        oy = torch.stack([yc[:, 0] - h[:, 0], yc[:, 0] - h[:, 1], yc[:, 0], yc[:, 0]], 1)
    else:
        ox, oy = torch.zeros_like(w), torch.zeros_like(h)
    single_x, single_y = ((size - w[:, 0]) / 2).floor(), ((size - h[:, 0]) / 2).floor()
    ox = torch.where(mosaic[:, None], ox, torch.cat([single_x[:, None], ox[:, 1:]], 1))
    oy = torch.where(mosaic[:, None], oy, torch.cat([single_y[:, None], oy[:, 1:]], 1))
    used = mosaic[:, None] | (torch.arange(t, device=hw.device) == 0)[None]
    return torch.stack([ox, oy], -1), used


def warp(tiles: Any, offsets: Any, used: Any, mosaic: Any, centre: Any, canvas: Any, m: Any, size: int) -> Any:
    """Sample every output pixel straight from the tiles: out(p) = canvas(M^-1 p), where the canvas is the tiles
    placed at their offsets (mosaic quadrants around the centre, or one centred image), PAD elsewhere.

    The T tiles of an image are laid side by side in one atlas (2 x 2 slots for a mosaic, a copy of the uint8
    tiles), each output pixel picks the tile its canvas point falls in, and one grid_sample over the batch reads
    it: a fixed number of whole-batch ops (no canvas is composed image by image), and each output pixel is
    interpolated once. Bilinear, PAD fill, pixel centres as cv2.warpAffine maps them. Where two mosaic tiles meet,
    a pixel takes the tile its centre falls in (Ultralytics interpolates across the seam: a 1-pixel difference).
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    b, t, s = tiles.shape[0], tiles.shape[1], tiles.shape[2]
    cols = 2 if t == 4 else 1
    inv = _affine_inverse(m)  # (B, 3, 3)
    ys, xs = torch.meshgrid(
        torch.arange(size, device=m.device, dtype=torch.float32),
        torch.arange(size, device=m.device, dtype=torch.float32),
        indexing="ij",
    )
    pts = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, -1, 3)  # (1, S*S, 3)
    src = (pts @ inv.transpose(1, 2))[..., :2]  # (B, S*S, 2): the canvas point of every output pixel
    cx, cy = src[..., 0], src[..., 1]
    inside = (cx >= 0) & (cy >= 0) & (cx < canvas[:, None]) & (cy < canvas[:, None])
    right = (cx >= centre[:, :1]) & mosaic[:, None]
    below = (cy >= centre[:, 1:]) & mosaic[:, None]
    q = (right.long() + 2 * below.long()).clamp_max(t - 1)  # the tile each pixel reads: 0 for a single image
    offset = offsets.gather(1, q[..., None].expand(-1, -1, 2))  # (B, S*S, 2)
    slot = torch.stack([q % cols, q // cols], -1) * s  # where that tile sits in the atlas
    atlas_xy = src - offset + slot
    rows = 2 if t == 4 else 1
    if t == 4:  # a single image in a mosaic batch: its last half pixel must not blend with the next atlas slot
        atlas_xy = torch.where(mosaic.view(b, 1, 1), atlas_xy, atlas_xy.clamp(max=s - 0.5))
    atlas = (
        tiles.view(b, rows, cols, s, s, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, rows * s, cols * s).float() - PAD
    )  # PAD becomes 0, like grid_sample's zero padding
    grid = (2 * atlas_xy + 1) / (cols * s) - 1
    sampled = F.grid_sample(
        atlas, grid.view(b, size, size, 2), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    keep = inside & used.gather(1, q)
    return sampled * keep.view(b, 1, size, size) + PAD


def _affine_inverse(m: Any) -> Any:
    """Inverse of affine 3x3 matrices in closed form (torch.linalg.inv checks for singularity: a host sync)."""
    import torch

    a, b_, c = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    d, e, f = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    det = a * e - b_ * d
    row0 = torch.stack([e, -b_, b_ * f - c * e], 1) / det[:, None]
    row1 = torch.stack([-d, a, c * d - a * f], 1) / det[:, None]
    row2 = torch.tensor([0.0, 0.0, 1.0], device=m.device).expand_as(row0)
    return torch.stack([row0, row1, row2], 1)


def _place_boxes(labels: Any, counts: Any, offsets: Any, used: Any, canvas: Any) -> tuple[Any, Any]:
    """Every tile's boxes moved onto the canvas and clipped to it, as one padded (B, T*L, 5) tensor and a mask."""
    import torch

    b, t, n = labels.shape[:3]
    valid = (torch.arange(n, device=labels.device) < counts[..., None]) & used[..., None]
    shift = offsets.repeat(1, 1, 2).unsqueeze(2)  # (B, T, 1, 4): x, y, x, y
    xyxy = torch.minimum((labels[..., 1:] + shift).clamp_min(0), canvas.view(b, 1, 1, 1))
    boxes = torch.cat([labels[..., :1], xyxy], -1).view(b, t * n, 5)
    return boxes, valid.view(b, t * n)


def warp_boxes(boxes: Any, mask: Any, m: Any, scale: Any, size: int) -> tuple[Any, Any]:
    """Transform, clip and filter the boxes with their images: the four corners through M, their enclosing box,
    then Ultralytics' box_candidates rule against the box before, scaled (the mask drops the rejected)."""
    import torch

    x1, y1, x2, y2 = boxes[..., 1], boxes[..., 2], boxes[..., 3], boxes[..., 4]
    corners = torch.stack(
        [torch.stack([x1, y1], -1), torch.stack([x2, y1], -1), torch.stack([x1, y2], -1), torch.stack([x2, y2], -1)], 2
    )  # (B, N, 4, 2)
    ones = torch.ones_like(corners[..., :1])
    pts = torch.cat([corners, ones], -1) @ m[:, None].transpose(-1, -2)  # (B, N, 4, 3)
    xy = pts[..., :2]
    new = torch.cat([xy.min(2).values, xy.max(2).values], -1).clamp(0, size)
    keep = box_candidates(boxes[..., 1:] * scale.view(-1, 1, 1), new)
    return torch.cat([boxes[..., :1], new], -1), mask & keep


def box_candidates(before: Any, after: Any) -> Any:
    """Ultralytics' rule: keep boxes over 2 px wide and high, with >10% of their scaled area and aspect < 100."""
    eps = 1e-16
    w1, h1 = before[..., 2] - before[..., 0], before[..., 3] - before[..., 1]
    w2, h2 = after[..., 2] - after[..., 0], after[..., 3] - after[..., 1]
    ar = (w2 / (h2 + eps)).maximum(h2 / (w2 + eps))
    return (w2 > WH_THR) & (h2 > WH_THR) & (w2 * h2 / (w1 * h1 + eps) > AREA_THR) & (ar < AR_THR)


def hsv(imgs: Any, hyp: Hyp, rand: Any) -> Any:
    """Ultralytics' RandomHSV on RGB 0-255 tensors: hue shifted by r_h of a turn, saturation and value scaled."""
    import torch

    if not (hyp.hsv_h or hyp.hsv_s or hyp.hsv_v):  # decided from the settings, never from a device value
        return imgs
    n = imgs.shape[0]
    gains = torch.tensor([hyp.hsv_h, hyp.hsv_s, hyp.hsv_v], device=imgs.device)
    r = (rand(n, 3) * 2 - 1) * gains
    x = imgs / 255
    mx, argmx = x.max(1)
    mn = x.min(1).values
    d = mx - mn
    red, green, blue = x[:, 0], x[:, 1], x[:, 2]
    safe = d.clamp_min(1e-8)
    hue = torch.where(
        argmx == 0,
        ((green - blue) / safe) % 6,
        torch.where(argmx == 1, (blue - red) / safe + 2, (red - green) / safe + 4),
    )
    hue = torch.where(d > 0, hue / 6, torch.zeros_like(hue))
    sat = torch.where(mx > 0, d / mx.clamp_min(1e-8), torch.zeros_like(mx))
    hue = (hue + r[:, 0, None, None]) % 1.0
    sat = (sat * (1 + r[:, 1, None, None])).clamp(0, 1)
    val = (mx * (1 + r[:, 2, None, None])).clamp(0, 1)
    h6 = hue * 6
    k = torch.stack([(5 + h6) % 6, (3 + h6) % 6, (1 + h6) % 6], 1)
    rgb = val[:, None] - val[:, None] * sat[:, None] * (k.minimum(4 - k).clamp(0, 1))
    return rgb * 255


def flips(imgs: Any, boxes: Any, hyp: Hyp, rand: Any) -> tuple[Any, Any]:
    """Horizontal (fliplr) and vertical (flipud) flips per image, boxes mirrored with them, by whole-batch selects."""
    import torch

    n, s = imgs.shape[0], imgs.shape[-1]
    ud = rand(n) < hyp.flipud
    lr = rand(n) < hyp.fliplr
    imgs = torch.where(ud.view(n, 1, 1, 1), imgs.flip(-2), imgs)
    imgs = torch.where(lr.view(n, 1, 1, 1), imgs.flip(-1), imgs)
    c, x1, y1, x2, y2 = boxes.unbind(-1)
    y1, y2 = torch.where(ud[:, None], s - y2, y1), torch.where(ud[:, None], s - y1, y2)
    x1, x2 = torch.where(lr[:, None], s - x2, x1), torch.where(lr[:, None], s - x1, x2)
    return imgs, torch.stack([c, x1, y1, x2, y2], -1)


def to_ultralytics(out: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """Padded targets to Ultralytics' flat format (normalised xywh, batch_idx): the one host sync of a batch
    (boolean indexing must learn how many boxes survived)."""
    import torch

    s = out["img"].shape[-1]
    where = out["mask"].nonzero()  # (K, 2): image, slot of every kept box; the sync
    rows = out["boxes"][where[:, 0], where[:, 1]]
    idx = where[:, 0].float()
    xyxy = rows[:, 1:] / s
    xywh = torch.stack(
        [
            (xyxy[:, 0] + xyxy[:, 2]) / 2,
            (xyxy[:, 1] + xyxy[:, 3]) / 2,
            xyxy[:, 2] - xyxy[:, 0],
            xyxy[:, 3] - xyxy[:, 1],
        ],
        1,
    )
    return {
        "img": out["img"].clamp(0, 1),
        "cls": rows[:, :1],
        "bboxes": xywh,
        "batch_idx": idx,
        "im_file": files,
        "ori_shape": [(s, s)] * len(files),
        "resized_shape": [(s, s)] * len(files),
    }


# --- plugging into Ultralytics ---------------------------------------------------------------------------------


class StoreDataset:
    """What Ultralytics' trainer reads from its training dataset: length, labels, the mosaic switch."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.mosaic = True
        s = store.imgsz
        self.labels = []
        for (h, w), rows in zip(store.hw, store.labels, strict=True):
            xyxy = rows[:, 1:] / s
            xywh = np.stack(
                [
                    (xyxy[:, 0] + xyxy[:, 2]) / 2,
                    (xyxy[:, 1] + xyxy[:, 3]) / 2,
                    xyxy[:, 2] - xyxy[:, 0],
                    xyxy[:, 3] - xyxy[:, 1],
                ],
                1,
            )
            self.labels.append({"cls": rows[:, :1], "bboxes": xywh, "shape": (int(h), int(w))})

    def __len__(self) -> int:
        return len(self.store)

    def close_mosaic(self, hyp: Any) -> None:
        self.mosaic = False  # close_mosaic: the last epochs train on single images


class _ShardSampler:
    """Shuffled indices for one rank, reshuffled per epoch (DDP calls set_epoch; single-process runs count).

    Like torch's DistributedSampler, the order is padded by repeating its start until it divides by the world
    size, so every rank gets as many indices, and as many batches: a rank with one batch fewer would leave the
    others waiting in a collective until the timeout.
    """

    def __init__(self, n: int, seed: int, rank: int, world: int) -> None:
        self.n, self.seed, self.rank, self.world, self.epoch = n, seed, max(rank, 0), max(world, 1), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        import torch

        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        total = len(self) * self.world
        order = (order * (total // max(self.n, 1) + 1))[:total]
        return order[self.rank :: self.world]

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)


PREFETCH = 2  # batches gathered (and copied to the GPU) ahead of the one training


class StoreLoader:
    """Batches from the store, gathered ahead by a background thread while the model trains.

    The thread gathers each batch's tiles into pinned memory (torch's index ops release the GIL) and copies them
    to the GPU on a side CUDA stream (YOLOX's data_prefetcher pattern), so the step never waits for a read or a
    copy that could have happened during the previous step. FastDetectionTrainer.preprocess_batch augments them.
    """

    num_workers = 0
    drop_last = False

    def __init__(
        self,
        store: Store,
        batch_size: int,
        seed: int,
        hyp: Hyp,
        device: Any = "cpu",
        rank: int = -1,
        world: int = 1,
        resident: bool = False,
    ) -> None:
        import torch

        self.dataset = StoreDataset(store)
        self.tensors = StoreTensors.of(store, resident)
        self.batch_size = batch_size
        self.sampler = _ShardSampler(len(store), seed, rank, world)
        self.hyp = hyp
        self.device = torch.device(device)
        self.gen = torch.Generator().manual_seed(seed + max(rank, 0))  # host-side choices: partners, mosaic flags
        self._single = rank == -1
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Any:

        order = self.sampler.indices()
        if self._single:
            self.sampler.epoch += 1
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        mosaic = self.dataset.mosaic  # close_mosaic flips it between epochs
        with ThreadPoolExecutor(1, thread_name_prefix="speedtrain-gather") as pool:  # one thread: batches in order
            pending = [pool.submit(self._load, c, mosaic) for c in chunks[:PREFETCH]]
            for k in range(len(chunks)):
                batch = pending.pop(0).result()
                if k + PREFETCH < len(chunks):
                    pending.append(pool.submit(self._load, chunks[k + PREFETCH], mosaic))
                yield batch

    def _load(self, chunk: list[int], mosaic: bool) -> dict[str, Any]:
        import torch

        host = gather(self.tensors, chunk, self.hyp, mosaic, self.gen, pin=self._cuda)
        if not self._cuda:
            return {"fast": host, "chunk": chunk}
        with torch.cuda.stream(self._stream):
            moved = to_device(host, self.device)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return {"fast": moved, "chunk": chunk, "ready": ready}

    def reset(self) -> None:  # the mosaic switch is read when the next epoch's iteration starts
        pass

    def close(self) -> None:
        pass


def take(batch: dict[str, Any]) -> dict[str, Any]:
    """The loader's device tensors, made safe to use on the current stream (waits for their copy, no host sync)."""
    ready = batch.get("ready")
    if ready is None:
        return batch["fast"]
    import torch

    stream = torch.cuda.current_stream()
    stream.wait_event(ready)
    for t in batch["fast"].values():
        t.record_stream(stream)  # the allocator must not reuse their memory before this stream is done with it
    return batch["fast"]


def keep_resident(store: Store, ram_available_gb: float, world: int) -> bool:
    """Read the store into RAM when it fits the planner's RAM-cache rule on one process; several ranks share
    the memory map through the page cache instead (one copy per node)."""

    return world <= 1 and store.size_gb * RAM_CACHE_FACTOR + RAM_RESERVE_GB <= ram_available_gb
