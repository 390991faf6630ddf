"""Probe the machine (GPUs, RAM, CPU cores, disk) into a HardwareSnapshot; save and load snapshots."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from speedtrain.errors import HardwareError

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    name: str
    total_vram_gb: float
    free_vram_gb: float


@dataclass(frozen=True, slots=True)
class HardwareSnapshot:
    gpus: tuple[Gpu, ...]
    ram_total_gb: float
    ram_available_gb: float
    cpu_cores_logical: int
    cpu_cores_physical: int
    disk_free_gb: float
    swap_total_gb: float = 0.0
    swap_free_gb: float = 0.0
    gpu_backend: str = "none"  # "nvml", "torch" or "none": where the GPU figures came from
    source: str = "probed"  # "probed", or the snapshot file it was loaded from
    notes: tuple[str, ...] = field(default=())

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)


def probe(path: str | Path = ".") -> HardwareSnapshot:
    """Probe this machine; never raises for missing GPUs, NVML or drivers (the snapshot says CPU-only)."""
    gpus, backend, notes = _probe_gpus()
    mem, swap = psutil.virtual_memory(), psutil.swap_memory()
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    return HardwareSnapshot(
        gpus=gpus,
        ram_total_gb=_gb(mem.total),
        ram_available_gb=_gb(mem.available),
        cpu_cores_logical=logical,
        cpu_cores_physical=physical,
        disk_free_gb=_gb(shutil.disk_usage(_existing_parent(Path(path))).free),
        swap_total_gb=_gb(swap.total),
        swap_free_gb=_gb(swap.free),
        gpu_backend=backend,
        notes=tuple(notes),
    )


def _probe_gpus() -> tuple[tuple[Gpu, ...], str, list[str]]:
    """Ask NVML first (no torch import); fall back to torch only where a GPU may exist without NVML."""
    notes: list[str] = []
    try:
        return _filter_visible(_probe_nvml()), "nvml", notes
    except Exception as exc:  # NVML raises its own error family, or the library is absent
        notes.append(f"NVML unavailable ({_one_line(exc)})")
    if not _gpu_may_exist_without_nvml():
        notes.append("no GPU device found; planning for CPU")
        return (), "none", notes
    try:
        gpus = _probe_torch()
    except Exception as exc:  # a broken driver makes torch.cuda raise at first use
        notes.append(f"torch could not query GPUs ({_one_line(exc)}); planning for CPU")
        return (), "none", notes
    if not gpus:
        notes.append("torch sees no CUDA GPU; planning for CPU")
    return gpus, ("torch" if gpus else "none"), notes


def _probe_nvml() -> tuple[tuple[str, Gpu], ...]:
    """Return (uuid, Gpu) for every device NVML sees."""
    import pynvml  # provided by nvidia-ml-py

    pynvml.nvmlInit()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            gpus.append((_text(uuid), Gpu(i, _text(name), _gb(mem.total), _gb(mem.free))))
    finally:
        pynvml.nvmlShutdown()
    return tuple(gpus)


def _filter_visible(devices: tuple[tuple[str, Gpu], ...]) -> tuple[Gpu, ...]:
    """Keep the GPUs CUDA_VISIBLE_DEVICES exposes, renumbered as torch numbers them (NVML ignores the variable)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return tuple(gpu for _, gpu in devices)
    picked = []
    for token in (t.strip() for t in visible.split(",") if t.strip()):
        if token.isdigit():
            match = [gpu for _, gpu in devices if gpu.index == int(token)]
        else:
            match = [gpu for uuid, gpu in devices if uuid.startswith((token, f"GPU-{token}"))]
        if not match:
            break  # CUDA stops at the first invalid entry
        picked.append(match[0])
    return tuple(replace(g, index=i) for i, g in enumerate(picked))


def _gpu_may_exist_without_nvml() -> bool:
    """True on macOS (Apple GPUs) and where a CUDA/ROCm device node exists; importing torch costs seconds."""
    if sys.platform == "darwin":
        return True
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def _probe_torch() -> tuple[Gpu, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(Gpu(i, torch.cuda.get_device_name(i), _gb(total), _gb(free)))
    return tuple(gpus)


def to_dict(snapshot: HardwareSnapshot) -> dict[str, Any]:
    """Return the snapshot as JSON-ready data (the documented hardware snapshot format)."""
    data = asdict(snapshot)
    data["gpus"] = [asdict(g) for g in snapshot.gpus]
    data["notes"] = list(snapshot.notes)
    return data


def from_dict(data: Any, source: str = "dict") -> HardwareSnapshot:
    """Validate snapshot data once, at the boundary; extra keys are ignored."""
    if not isinstance(data, dict):
        raise HardwareError(f"{source}: a hardware snapshot must be a JSON object")
    try:
        gpus = tuple(
            Gpu(int(g["index"]), str(g["name"]), float(g["total_vram_gb"]), float(g["free_vram_gb"]))
            for g in data.get("gpus", [])
        )
        ram_total = float(data["ram_total_gb"])
        logical = int(data["cpu_cores_logical"])
        snapshot = HardwareSnapshot(
            gpus=gpus,
            ram_total_gb=ram_total,
            ram_available_gb=float(data.get("ram_available_gb", ram_total)),
            cpu_cores_logical=logical,
            cpu_cores_physical=int(data.get("cpu_cores_physical", logical)),
            disk_free_gb=float(data.get("disk_free_gb", 100.0)),
            swap_total_gb=float(data.get("swap_total_gb", 0.0)),
            swap_free_gb=float(data.get("swap_free_gb", 0.0)),
            gpu_backend=str(data.get("gpu_backend", "nvml" if gpus else "none")),
            source=source,
            notes=tuple(str(n) for n in data.get("notes", [])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise HardwareError(f"{source}: not a valid hardware snapshot ({_one_line(exc)} is missing or wrong)") from None
    if snapshot.ram_total_gb <= 0 or snapshot.cpu_cores_logical <= 0:
        raise HardwareError(f"{source}: RAM and CPU cores must be positive")
    return snapshot


def save(snapshot: HardwareSnapshot, path: str | Path) -> Path:
    """Write the snapshot as JSON."""
    path = Path(path)
    path.write_text(json.dumps(to_dict(snapshot), indent=2) + "\n", encoding="utf-8")
    return path


def load(path: str | Path) -> HardwareSnapshot:
    """Read a snapshot written by `speedtrain probe --json` (or by hand, for another machine)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HardwareError(f"hardware snapshot not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HardwareError(f"{path}: cannot read hardware snapshot ({_one_line(exc)})") from None
    return from_dict(data, source=str(path))


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gb(n_bytes: float) -> float:
    return round(n_bytes / GIB, 2)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
