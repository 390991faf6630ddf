"""`--pipeline fast`: decode every training image once into a memory-mapped store, augment batches with torch.

Ultralytics' CPU pipeline decodes, mosaics, warps and colour-jitters each image in worker processes every epoch.
Here each epoch reads raw pixels from a uint8 store and the augmentation runs batched on the training device:
mosaic (4 images), random affine (degrees, translate, scale, shear as Ultralytics' RandomPerspective defines
them), HSV jitter and flips, with boxes transformed, clipped and filtered by Ultralytics' own box_candidates rule.
It is written with plain torch ops (affine_grid/grid_sample) rather than kornia or DALI: neither is installed
with Ultralytics, kornia's box handling does not apply Ultralytics' candidate filter, and DALI needs CUDA, while
this code must also run on CPU tensors for the tests. Losses, validation (Ultralytics' own loader), checkpoints,
EMA, AMP, resume and DDP stay Ultralytics' own: FastDetectionTrainer only replaces the training loader and the
per-batch preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from speedtrain.dataset import label_path, list_images
from speedtrain.parallel import pmap
from speedtrain.prepare import write_atomic

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
    """Decode the training images once into root/.pipeline/<key>/ (reused while nothing changes)."""
    sources = train_source if isinstance(train_source, list) else [train_source]
    files = list(list_images([Path(s) for s in sources]))
    folder = root / STORE_DIR / f"{store_key(files, imgsz)}-{imgsz}"
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        _check_room(root, len(files) * imgsz * imgsz * 3)
        folder.mkdir(parents=True, exist_ok=True)
        data_path = folder / "images.u8"
        np.lib.format.open_memmap(data_path, mode="w+", dtype=np.uint8, shape=(len(files), imgsz, imgsz, 3)).flush()
        jobs = [(i, f, imgsz, str(data_path)) for i, f in enumerate(files)]
        hw = np.zeros((len(files), 2), dtype=np.int32)
        for i, h, w in pmap(_decode_into, jobs, workers):
            hw[i] = (h, w)
        labels = [_labels_for(f, int(h), int(w)) for f, (h, w) in zip(files, hw, strict=True)]
        np.savez(folder / "labels.npz", hw=hw, counts=np.array([len(x) for x in labels]),
                 rows=np.concatenate(labels) if labels else np.zeros((0, 5), np.float32))  # fmt: skip
        write_atomic(meta_path, json.dumps({"files": files, "imgsz": imgsz}).encode())  # written last: complete
    return load_store(folder)


def _check_room(root: Path, nbytes: int) -> None:
    """The store is written once, in full: refuse before writing when the disk cannot hold it."""
    import shutil

    from speedtrain.errors import DiskSpaceError

    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if nbytes * 1.05 + 2**28 > free:
        raise DiskSpaceError(
            f"{root}: the fast pipeline's decoded store needs {nbytes / 1024**3:.1f} GB, {free / 1024**3:.1f} GB "
            f"free; free space, lower --img-size, or use --pipeline ultralytics"
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
    im = cv2.imread(path)  # applies EXIF orientation, as Ultralytics' loader does
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


def make_batch(store: Store, indices: list[int], hyp: Hyp, mosaic_on: bool, gen: Any, device: Any) -> dict[str, Any]:
    """Augment the given store images into a training batch in Ultralytics' format (img 0-1, normalised xywh)."""
    import torch

    s = store.imgsz
    raw = torch.from_numpy(np.ascontiguousarray(store.images[indices])).to(device, non_blocking=True)
    imgs = raw.permute(0, 3, 1, 2).float()
    use_mosaic = (torch.rand(len(indices), generator=gen) < hyp.mosaic) & torch.tensor(mosaic_on)
    out = torch.empty(len(indices), 3, s, s, device=device)
    boxes: list[Any] = [None] * len(indices)
    for flag in (True, False):
        rows = [i for i in range(len(indices)) if bool(use_mosaic[i]) is flag]
        if not rows:
            continue
        if flag:
            partners = torch.randint(0, len(store), (len(rows), 3), generator=gen).tolist()
            canvas, canvas_boxes = mosaic4(store, [indices[r] for r in rows], partners, imgs[rows], gen, device)
        else:
            canvas, canvas_boxes = letterbox(store, [indices[r] for r in rows], imgs[rows], device)
        warped, warped_boxes = random_affine(canvas, canvas_boxes, hyp, s, gen)
        out[rows] = warped
        for k, r in enumerate(rows):
            boxes[r] = warped_boxes[k]
    out = hsv(out, hyp, gen)
    out, boxes = flips(out, boxes, hyp, gen)
    return _to_targets(out, boxes, s, [store.files[i] for i in indices])


def letterbox(store: Store, indices: list[int], imgs: Any, device: Any) -> tuple[Any, list[Any]]:
    """Centre each resized image on a PAD-filled imgsz square (Ultralytics' LetterBox without upscaling)."""
    import torch

    s = store.imgsz
    out = torch.full((len(indices), 3, s, s), float(PAD), device=device)
    boxes = []
    for k, i in enumerate(indices):
        h, w = (int(v) for v in store.hw[i])
        top, left = (s - h) // 2, (s - w) // 2
        out[k, :, top : top + h, left : left + w] = imgs[k, :, :h, :w]
        b = torch.as_tensor(store.labels[i], device=device).clone()
        b[:, [1, 3]] += left
        b[:, [2, 4]] += top
        boxes.append(b)
    return out, boxes


def mosaic4(
    store: Store, indices: list[int], partners: list[list[int]], imgs: Any, gen: Any, device: Any
) -> tuple[Any, list[Any]]:
    """Ultralytics' 4-image mosaic on a 2*imgsz canvas around a random centre in [s/2, 3s/2]."""
    import torch

    s = store.imgsz
    canvas = torch.full((len(indices), 3, 2 * s, 2 * s), float(PAD), device=device)
    centres = (torch.rand(len(indices), 2, generator=gen) * s + s / 2).int().tolist()
    all_boxes = []
    for k, i in enumerate(indices):
        xc, yc = centres[k]
        tiles = [i, *partners[k]]
        tile_imgs = [imgs[k], *(_slot(store, j, device) for j in partners[k])]
        boxes = []
        for pos, (j, im) in enumerate(zip(tiles, tile_imgs, strict=True)):
            h, w = (int(v) for v in store.hw[j])
            if pos == 0:  # top left
                x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
                x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
            elif pos == 1:  # top right
                x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
                x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
            elif pos == 2:  # bottom left
                x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
                x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
            else:  # bottom right
                x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
                x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
            canvas[k, :, y1a:y2a, x1a:x2a] = im[:, y1b:y2b, x1b:x2b]
            b = torch.as_tensor(store.labels[j], device=device).clone()
            b[:, [1, 3]] += x1a - x1b
            b[:, [2, 4]] += y1a - y1b
            boxes.append(b)
        merged = torch.cat(boxes)
        merged[:, 1:] = merged[:, 1:].clamp(0, 2 * s)  # Ultralytics clips mosaic boxes to the canvas
        all_boxes.append(merged)
    return canvas, all_boxes


def _slot(store: Store, j: int, device: Any) -> Any:
    import torch

    return (
        torch.from_numpy(np.array(store.images[j])).to(device).permute(2, 0, 1).float()
    )  # a copy: memmaps are read-only


def affine_matrices(n: int, in_size: int, out_size: int, hyp: Hyp, gen: Any) -> Any:
    """Per-image 3x3 matrices M = T @ S @ R @ C exactly as Ultralytics' RandomPerspective (no perspective term)."""
    import torch

    u = lambda lo, hi: torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo  # noqa: E731
    eye = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    c, r, sh, t = eye.clone(), eye.clone(), eye.clone(), eye.clone()
    c[:, 0, 2] = c[:, 1, 2] = -in_size / 2
    a = u(-hyp.degrees, hyp.degrees) * math.pi / 180
    s = u(1 - hyp.scale, 1 + hyp.scale)
    # cv2.getRotationMatrix2D(angle=a, center=(0, 0), scale=s): [[s cos a, s sin a], [-s sin a, s cos a]]
    r[:, 0, 0], r[:, 0, 1], r[:, 1, 0], r[:, 1, 1] = s * a.cos(), s * a.sin(), -s * a.sin(), s * a.cos()
    sh[:, 0, 1] = torch.tan(u(-hyp.shear, hyp.shear) * math.pi / 180)
    sh[:, 1, 0] = torch.tan(u(-hyp.shear, hyp.shear) * math.pi / 180)
    t[:, 0, 2] = u(0.5 - hyp.translate, 0.5 + hyp.translate) * out_size
    t[:, 1, 2] = u(0.5 - hyp.translate, 0.5 + hyp.translate) * out_size
    return t @ sh @ r @ c, s


def random_affine(imgs: Any, boxes: list[Any], hyp: Hyp, out_size: int, gen: Any) -> tuple[Any, list[Any]]:
    """Warp each image by its matrix (bilinear, PAD fill) and transform, clip and filter its boxes."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    n, in_size = imgs.shape[0], imgs.shape[-1]
    m, scale = affine_matrices(n, in_size, out_size, hyp, gen)
    inv = torch.linalg.inv(m)
    # pixel <-> normalised coordinates (align_corners=False: pixel centres at (2p + 1) / size - 1), as cv2 maps them
    to_pix_out = torch.tensor([[out_size / 2, 0, out_size / 2 - 0.5], [0, out_size / 2, out_size / 2 - 0.5], [0, 0, 1]],
                              dtype=torch.float64)  # fmt: skip
    to_norm_in = torch.tensor([[2 / in_size, 0, 1 / in_size - 1], [0, 2 / in_size, 1 / in_size - 1], [0, 0, 1]],
                              dtype=torch.float64)  # fmt: skip
    theta = (to_norm_in @ inv @ to_pix_out)[:, :2].to(imgs.device, torch.float32)
    grid = F.affine_grid(theta, [n, 3, out_size, out_size], align_corners=False)
    warped = F.grid_sample(imgs - PAD, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + PAD
    out_boxes = [
        _warp_boxes(b, m[k].to(b.device, torch.float32), float(scale[k]), out_size) for k, b in enumerate(boxes)
    ]
    return warped, out_boxes


def _warp_boxes(b: Any, m: Any, scale: float, size: int) -> Any:
    import torch

    if not len(b):
        return b
    x1, y1, x2, y2 = b[:, 1], b[:, 2], b[:, 3], b[:, 4]
    corners = torch.stack([torch.stack([x1, y1]), torch.stack([x2, y1]), torch.stack([x1, y2]), torch.stack([x2, y2])])
    pts = torch.cat([corners.permute(2, 0, 1), torch.ones(len(b), 4, 1, device=b.device)], -1) @ m.T
    xy = pts[..., :2]
    new = torch.cat([xy.min(1).values, xy.max(1).values], 1).clamp(0, size)
    keep = box_candidates(b[:, 1:] * scale, new)
    return torch.cat([b[keep, :1], new[keep]], 1)


def box_candidates(before: Any, after: Any) -> Any:
    """Ultralytics' rule: keep boxes over 2 px wide and high, with >10% of their scaled area and aspect < 100."""
    eps = 1e-16
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    ar = (w2 / (h2 + eps)).maximum(h2 / (w2 + eps))
    return (w2 > WH_THR) & (h2 > WH_THR) & (w2 * h2 / (w1 * h1 + eps) > AREA_THR) & (ar < AR_THR)


def hsv(imgs: Any, hyp: Hyp, gen: Any) -> Any:
    """Ultralytics' RandomHSV on RGB 0-255 tensors: hue shifted by r_h of a turn, saturation and value scaled."""
    import torch

    n = imgs.shape[0]
    r = (torch.rand(n, 3, generator=gen) * 2 - 1) * torch.tensor([hyp.hsv_h, hyp.hsv_s, hyp.hsv_v])
    if not r.abs().sum():
        return imgs
    r = r.to(imgs.device)
    x = imgs / 255
    mx, argmx = x.max(1)
    mn = x.min(1).values
    d = mx - mn
    red, green, blue = x[:, 0], x[:, 1], x[:, 2]
    hue = torch.zeros_like(mx)
    safe = d.clamp_min(1e-8)
    hue = torch.where(argmx == 0, ((green - blue) / safe) % 6, hue)
    hue = torch.where(argmx == 1, (blue - red) / safe + 2, hue)
    hue = torch.where(argmx == 2, (red - green) / safe + 4, hue)
    hue = torch.where(d > 0, hue / 6, torch.zeros_like(hue))
    sat = torch.where(mx > 0, d / mx.clamp_min(1e-8), torch.zeros_like(mx))
    hue = (hue + r[:, 0, None, None]) % 1.0
    sat = (sat * (1 + r[:, 1, None, None])).clamp(0, 1)
    val = (mx * (1 + r[:, 2, None, None])).clamp(0, 1)
    # back to RGB
    h6 = hue * 6
    k = torch.stack([(5 + h6) % 6, (3 + h6) % 6, (1 + h6) % 6], 1)
    rgb = val[:, None] - val[:, None] * sat[:, None] * (k.minimum(4 - k).clamp(0, 1))
    return rgb * 255


def flips(imgs: Any, boxes: list[Any], hyp: Hyp, gen: Any) -> tuple[Any, list[Any]]:
    """Horizontal (fliplr) and vertical (flipud) flips per image, boxes mirrored with them."""
    import torch

    n, s = imgs.shape[0], imgs.shape[-1]
    ud = (torch.rand(n, generator=gen) < hyp.flipud).tolist()
    lr = (torch.rand(n, generator=gen) < hyp.fliplr).tolist()
    imgs = imgs.clone()
    out = []
    for k, b in enumerate(boxes):
        b = b.clone()
        if ud[k]:
            imgs[k] = imgs[k].flip(-2)
            b[:, [2, 4]] = s - b[:, [4, 2]]
        if lr[k]:
            imgs[k] = imgs[k].flip(-1)
            b[:, [1, 3]] = s - b[:, [3, 1]]
        out.append(b)
    return imgs, out


def _to_targets(imgs: Any, boxes: list[Any], s: int, files: list[str]) -> dict[str, Any]:
    import torch

    device = imgs.device
    idx = torch.cat([torch.full((len(b),), k, dtype=torch.float32, device=device) for k, b in enumerate(boxes)])
    rows = torch.cat(boxes) if boxes else torch.zeros(0, 5, device=device)
    xyxy = rows[:, 1:] / s
    xywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                        xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1)  # fmt: skip
    return {
        "img": (imgs / 255).clamp(0, 1),
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
            xywh = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                             xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1)  # fmt: skip
            self.labels.append({"cls": rows[:, :1], "bboxes": xywh, "shape": (int(h), int(w))})

    def __len__(self) -> int:
        return len(self.store)

    def close_mosaic(self, hyp: Any) -> None:
        self.mosaic = False  # close_mosaic: the last epochs train on single images


class _ShardSampler:
    """Shuffled indices for one rank, reshuffled per epoch (DDP calls set_epoch; single-process runs count)."""

    def __init__(self, n: int, seed: int, rank: int, world: int) -> None:
        self.n, self.seed, self.rank, self.world, self.epoch = n, seed, max(rank, 0), max(world, 1), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        import torch

        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        return order[self.rank :: self.world]

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class StoreLoader:
    """Yields {"indices": [...]} batches; FastDetectionTrainer.preprocess_batch turns them into images."""

    num_workers = 0
    drop_last = False

    def __init__(self, store: Store, batch_size: int, seed: int, rank: int = -1, world: int = 1) -> None:
        self.dataset = StoreDataset(store)
        self.batch_size = batch_size
        self.sampler = _ShardSampler(len(store), seed, rank, world)
        self._single = rank == -1

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Any:
        order = self.sampler.indices()
        if self._single:
            self.sampler.epoch += 1
        for start in range(0, len(order), self.batch_size):
            yield {"indices": order[start : start + self.batch_size]}

    def reset(self) -> None:  # nothing is prefetched: the mosaic switch takes effect on the next batch
        pass

    def close(self) -> None:
        pass


_TRAINER: Any = None


def _trainer_class() -> Any:
    """FastDetectionTrainer, defined on first use so that importing speedtrain does not import ultralytics."""
    global _TRAINER
    if _TRAINER is not None:
        return _TRAINER
    import torch
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import LOGGER, RANK

    class FastDetectionTrainer(DetectionTrainer):
        """Ultralytics' DetectionTrainer with the training loader and batch augmentation of the fast pipeline."""

        def get_dataloader(self, dataset_path: Any, batch_size: int = 16, rank: int = 0, mode: str = "train") -> Any:
            if mode != "train":
                return super().get_dataloader(dataset_path, batch_size, rank, mode)  # validation stays Ultralytics'
            first = Path(dataset_path[0] if isinstance(dataset_path, list) else dataset_path)
            store = build_store(dataset_path, int(self.args.imgsz), first.parent.parent, self.args.workers or None)
            LOGGER.info(
                f"speedtrain fast pipeline: {len(store)} images decoded at {store.imgsz} px in {store.folder} "
                f"({store.size_gb:.2f} GB, memory-mapped; reused while the images and labels stay the same)"
            )
            self.fast_store, self.fast_hyp = store, Hyp.from_args(self.args)
            self.fast_gen = torch.Generator().manual_seed(int(self.args.seed) + max(RANK, 0))
            world = max(self.world_size, 1) if rank != -1 else 1
            return StoreLoader(store, batch_size, int(self.args.seed), rank if world > 1 else -1, world)

        def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
            if "indices" not in batch:
                return super().preprocess_batch(batch)
            mosaic = self.train_loader.dataset.mosaic
            return make_batch(self.fast_store, batch["indices"], self.fast_hyp, mosaic, self.fast_gen, self.device)

    FastDetectionTrainer.__module__ = __name__
    FastDetectionTrainer.__qualname__ = "FastDetectionTrainer"
    _TRAINER = FastDetectionTrainer
    return _TRAINER


def __getattr__(name: str) -> Any:  # PEP 562: `from speedtrain.pipeline import FastDetectionTrainer` (DDP does)
    if name == "FastDetectionTrainer":
        return _trainer_class()
    raise AttributeError(name)
