"""Shared fixtures: offline Ultralytics in a temporary config dir, fake machines, real COCO images in tmp dirs."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import time
import types
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from speedtrain.dataset import DatasetStats, ImageSizes, Split
from speedtrain.hardware import Gpu, HardwareSnapshot

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "datasets" / "coco128"
SAMPLE = REPO / "speedtrain" / "sample"


def pytest_configure(config: pytest.Config) -> None:
    # Before anything imports ultralytics: no network, and settings written to a throwaway folder.
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="speedtrain-yolo-cfg-"))
    os.environ["YOLO_VERBOSE"] = "False"
    # Started in the background by a non-interactive shell (`cmd &`, nohup), a process ignores SIGINT and so would
    # every child it starts: the Ctrl-C tests need children that take Ctrl-C as a terminal delivers it.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Say how to run what the default selection left out."""
    deselected = len(terminalreporter.stats.get("deselected", []))
    if deselected and config.getoption("markexpr") == "not slow":
        terminalreporter.write_line(
            f"{deselected} slow tests not run (real CPU trainings, benchmark smoke runs; about 27 minutes on 2 cores): "
            "python -m pytest -m slow"
        )


def coco_images() -> list[tuple[Path, Path]]:
    """(image, label path) of real COCO photos: shared COCO128 (128) where present, else the embedded sample (32)."""
    if (COCO128 / "images" / "train2017").is_dir():
        folders = [(COCO128 / "images" / "train2017", COCO128 / "labels" / "train2017")]
    else:
        folders = [(SAMPLE / "images" / s, SAMPLE / "labels" / s) for s in ("train", "val")]
    return [(img, labels / f"{img.stem}.txt") for images, labels in folders for img in sorted(images.glob("*.jpg"))]


def names_80() -> list[str]:
    import yaml

    return list(yaml.safe_load((SAMPLE / "data.yaml").read_text())["names"].values())


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Copy `n` real COCO images (and labels) into tmp_path/name as images/{train,val} + data.yaml."""

    def make(n: int = 8, n_val: int = 4, name: str = "ds", start: int = 0) -> Path:
        files = coco_images()[start : start + n + n_val]
        assert len(files) == n + n_val, f"only {len(files)} COCO images available"
        root = tmp_path / name
        for i, (img, label) in enumerate(files):
            split = "train" if i < n else "val"
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            shutil.copy2(img, root / "images" / split / img.name)
            if label.exists():
                shutil.copy2(label, root / "labels" / split / label.name)
        import yaml

        data = {"train": "images/train", "val": "images/val", "names": dict(enumerate(names_80()))}
        (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        return root

    return make


def tree_hash(root: Path) -> str:
    """Hash of every file's relative path and bytes under root: equal before and after means untouched."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` every 10 ms until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def run_benchmark(name: str, tmp_path: Path, *args: str) -> str:
    """Run benchmarks/<name> with --tiny (a smoke run) and return the markdown table it wrote."""
    import subprocess
    import sys

    out = tmp_path / f"{Path(name).stem}.md"
    cmd = [sys.executable, str(REPO / "benchmarks" / name), "--tiny", "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out.read_text()


def table_rows(text: str, *starts: str) -> list[list[str]]:
    """The cells of a markdown table's rows whose first cell starts with one of `starts`."""
    rows = [ln for ln in text.splitlines() if ln.startswith(tuple(f"| {s}" for s in starts))]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]


def snapshot(
    vram: tuple[float, ...] = (),
    ram: float = 32.0,
    cores: int = 16,
    free_ratio: float = 0.95,
    disk: float = 500.0,
    ram_available: float | None = None,
    physical: int | None = None,
    libc: str = "glibc 2.36",
) -> HardwareSnapshot:
    """A fake machine: one GPU per entry in `vram` (total GB), `free_ratio` of it free; physical cores default
    to half the logical ones (two hardware threads per core); Linux's C library unless `libc` says otherwise."""
    gpus = tuple(Gpu(i, f"Fake GPU {v:g}GB", v, round(v * free_ratio, 2)) for i, v in enumerate(vram))
    return HardwareSnapshot(
        gpus=gpus,
        ram_total_gb=ram,
        ram_available_gb=ram if ram_available is None else ram_available,
        cpu_cores_logical=cores,
        cpu_cores_physical=physical or max(1, cores // 2),
        disk_free_gb=disk,
        gpu_backend="nvml" if gpus else "none",
        source="fake",
        libc=libc,
    )


def fake_stats(train: int = 1000, val: int = 200, size: tuple[int, int] = (640, 480)) -> DatasetStats:
    """Dataset stats as a scan would return them for `train` + `val` images of one size."""
    imgs = tuple(f"/d/images/train/{i}.jpg" for i in range(train))
    vals = tuple(f"/d/images/val/{i}.jpg" for i in range(val))
    return DatasetStats(
        yaml_path="/d/data.yaml",
        root="/d",
        names=tuple(f"c{i}" for i in range(80)),
        splits=(
            Split("train", ("/d/images/train",), imgs, imgs, train, 0, train * 3),
            Split("val", ("/d/images/val",), vals, vals, val, 0, val * 3),
        ),
        image_sizes=ImageSizes(tuple([size] * min(train, 100)), train),
    )


# The message torch prints for a real CUDA OOM (torch/csrc/CUDACachingAllocator), shortened.
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
    "1.06 GiB is free. Of the allocated memory 76.02 GiB is allocated by PyTorch."
)


@dataclass
class FakeOom:
    """Settings and record of the fake: OOM when batch > max_batch from epoch from_epoch (0-based) on."""

    max_batch: int = 4
    from_epoch: int = 0
    tried: list[int] = field(default_factory=list)  # the batch of each training attempt (a new trainer each)
    epochs_started: list[tuple[int, int]] = field(default_factory=list)  # (epoch, batch) of each epoch begun


@pytest.fixture
def fake_cuda_oom(monkeypatch) -> FakeOom:
    """Make Ultralytics' training step raise a real-looking CUDA OOM (torch.OutOfMemoryError, CUDA's message)."""
    import torch
    from ultralytics.models.yolo.detect import DetectionTrainer

    fake = FakeOom()
    original = DetectionTrainer.preprocess_batch

    def step(self, batch):
        if not getattr(self, "_seen_by_test", False):
            self._seen_by_test = True
            fake.tried.append(self.batch_size)
        if getattr(self, "_epoch_seen_by_test", None) != self.epoch:
            self._epoch_seen_by_test = self.epoch
            fake.epochs_started.append((self.epoch, self.batch_size))
        if self.epoch >= fake.from_epoch and self.batch_size > fake.max_batch:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return original(self, batch)

    monkeypatch.setattr(DetectionTrainer, "preprocess_batch", step)
    return fake


# A fake NVML for machines without an NVIDIA driver (every test machine): the calls the probe and monitor use.
Mem = namedtuple("Mem", "total free used")
GIB = 1024**3


class FakeNVMLError(Exception):
    pass


def fake_nvml(devices: list[tuple], migs: dict[int, list[tuple]] | None = None) -> types.ModuleType:
    """A stand-in for pynvml with the calls the probe and the monitor use: (uuid, name, total GB, free GB[, util %])
    per device, and the MIG slices of devices in MIG mode. Like the real library, a GPU without MIG answers
    nvmlDeviceGetMigMode with NVMLError (NOT_SUPPORTED), an empty MIG slot with NVMLError (NOT_FOUND), and a MIG
    slice's utilisation with NVMLError (NOT_SUPPORTED)."""
    migs = migs or {}
    mod = types.ModuleType("pynvml")
    mod.NVMLError = FakeNVMLError
    mod.NVML_DEVICE_MIG_ENABLE = 1
    mod.nvmlInit = lambda: None
    mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetCount = lambda: len(devices)
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i, devices[i])
    mod.nvmlDeviceGetName = lambda h: h[2][1]
    mod.nvmlDeviceGetUUID = lambda h: h[2][0]
    mod.nvmlDeviceGetMemoryInfo = lambda h: Mem(int(h[2][2] * GIB), int(h[2][3] * GIB), int((h[2][2] - h[2][3]) * GIB))

    def mig_mode(h):
        if h[1] not in migs:
            raise FakeNVMLError("Not Supported")
        return (1, 1)

    def mig_handle(h, m):
        slots = migs[h[1]]
        if m >= len(slots) or slots[m] is None:
            raise FakeNVMLError("Not Found")
        return ("mig", h[1], slots[m])

    def utilization(h):
        if h[0] == "mig":
            raise FakeNVMLError("Not Supported")
        return types.SimpleNamespace(gpu=h[2][4] if len(h[2]) > 4 else 0, memory=0)

    mod.nvmlDeviceGetMigMode = mig_mode
    mod.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7
    mod.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    mod.nvmlDeviceGetUtilizationRates = utilization
    return mod


@pytest.fixture
def scripted(monkeypatch):
    """Ultralytics behind speedtrain's door replaced by a script (tests/scripted_ultra.py): every training path in
    milliseconds, with what was asked recorded."""
    from scripted_ultra import Script

    from speedtrain import ultra

    script = Script()
    monkeypatch.setattr(ultra, "train", script.train)
    monkeypatch.setattr(ultra, "validate", script.validate)
    monkeypatch.setattr(ultra, "latency_ms", script.latency_ms)
    return script
