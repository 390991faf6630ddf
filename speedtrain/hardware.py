"""Probe the machine (GPUs, RAM, CPU cores, disk) into a HardwareSnapshot; save and load snapshots."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from speedtrain.errors import HardwareError
from speedtrain.util import existing_parent, first_line, read_json

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int  # the CUDA index, as torch and Ultralytics' --device number it (after CUDA_VISIBLE_DEVICES)
    name: str
    total_vram_gb: float
    free_vram_gb: float
    uuid: str = ""  # NVML's GPU-... or MIG-... identifier
    nvml_index: int | None = None  # NVML's index of the physical GPU (NVML ignores CUDA_VISIBLE_DEVICES)
    mig_index: int | None = None  # the MIG slice's index on that GPU; None for a whole GPU


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
    shm_free_gb: float | None = None  # free space in /dev/shm, where DataLoader workers hand batches over; None: none
    gpu_backend: str = "none"  # "nvml", "torch" or "none": where the GPU figures came from
    source: str = "probed"  # "probed", or the snapshot file it was loaded from
    notes: tuple[str, ...] = field(default=())
    # what trains here: python, torch, torchvision, ultralytics, speedtrain (installed versions, read without import)
    versions: tuple[tuple[str, str], ...] = field(default=())
    libc: str = ""  # "glibc 2.36": the C library, whose allocator decides what a RAM cache's fill holds; "" unknown

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)


def probe(path: str | Path = ".") -> HardwareSnapshot:
    """Probe this machine; never raises for missing GPUs, NVML or drivers (the snapshot says CPU-only)."""
    gpus, backend, notes = _probe_gpus()
    mem, swap = psutil.virtual_memory(), psutil.swap_memory()
    logical = usable_cores(psutil.cpu_count(logical=True) or os.cpu_count() or 1)
    physical = min(psutil.cpu_count(logical=False) or logical, logical)
    return HardwareSnapshot(
        gpus=gpus,
        ram_total_gb=_gb(mem.total),
        ram_available_gb=_gb(mem.available),
        cpu_cores_logical=logical,
        cpu_cores_physical=physical,
        disk_free_gb=_gb(shutil.disk_usage(existing_parent(Path(path))).free),
        swap_total_gb=_gb(swap.total),
        swap_free_gb=_gb(swap.free),
        shm_free_gb=shm_free_gb(),
        gpu_backend=backend,
        notes=tuple(notes),
        versions=software_versions(),
        libc=" ".join(platform.libc_ver()).strip(),
    )


SOFTWARE = ("torch", "torchvision", "ultralytics", "speedtrain")


def software_versions() -> tuple[tuple[str, str], ...]:
    """The Python and package versions a run trains with, from the installed metadata (nothing is imported)."""

    found = [("python", platform.python_version())]
    for name in SOFTWARE:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            found.append((name, "not installed"))
    return tuple(found)


def shm_free_gb(path: Path = Path("/dev/shm")) -> float | None:
    """Free space in /dev/shm (Docker's default is 64 MB); None where there is none (macOS, Windows)."""
    try:
        return _gb(shutil.disk_usage(path).free)
    except OSError:
        return None


def usable_cores(logical: int, cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The logical cores this process may run on: the CPU affinity mask (taskset, SLURM's cgroups, docker
    --cpuset-cpus) and a cgroup v2 CPU quota (docker --cpus, Kubernetes limits) both count."""
    cores = logical
    with contextlib.suppress(AttributeError, OSError):  # no affinity call on macOS and Windows
        cores = min(cores, len(os.sched_getaffinity(0)))
    with contextlib.suppress(OSError, ValueError):
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cores)


def _probe_gpus() -> tuple[tuple[Gpu, ...], str, list[str]]:
    """Ask NVML first (no torch import); fall back to torch only where a GPU may exist without NVML."""
    notes: list[str] = []
    try:
        return _filter_visible(_probe_nvml()), "nvml", notes
    except Exception as exc:  # NVML raises its own error family, or the library is absent
        notes.append(f"NVML unavailable ({first_line(exc)})")
    if not _gpu_may_exist_without_nvml():
        notes.append("no GPU device found; planning for CPU")
        return (), "none", notes
    try:
        gpus = _probe_torch()
    except Exception as exc:  # a broken driver makes torch.cuda raise at first use
        notes.append(f"torch could not query GPUs ({first_line(exc)}); planning for CPU")
        return (), "none", notes
    if not gpus:
        notes.append("torch sees no CUDA GPU; planning for CPU")
    return gpus, ("torch" if gpus else "none"), notes


def _probe_nvml() -> tuple[Gpu, ...]:
    """Every device NVML sees: whole GPUs, and the MIG slices of GPUs in MIG mode, each with its own memory."""
    import pynvml  # provided by nvidia-ml-py

    pynvml.nvmlInit()
    try:
        gpus: list[Gpu] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            slices = _mig_slices(pynvml, handle, i, name)
            if slices:
                gpus += slices
                continue
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            gpus.append(Gpu(i, name, _gb(mem.total), _gb(mem.free), uuid=uuid, nvml_index=i))
    finally:
        pynvml.nvmlShutdown()
    return tuple(gpus)


def _mig_slices(pynvml: Any, handle: Any, index: int, name: str) -> list[Gpu]:
    """The MIG slices of a GPU in MIG mode (empty for a whole GPU, or where the driver has no MIG)."""
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
        if current != getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1):
            return []
        count = pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)
    except pynvml.NVMLError:  # NOT_SUPPORTED on GPUs without MIG
        return []
    slices = []
    for m in range(count):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, m)
        except pynvml.NVMLError:  # NOT_FOUND: an empty slot
            continue
        mem = pynvml.nvmlDeviceGetMemoryInfo(mig)
        uuid = _text(pynvml.nvmlDeviceGetUUID(mig))
        label = f"{name} MIG {round(mem.total / GIB)}GB slice {m}"
        slices.append(Gpu(index, label, _gb(mem.total), _gb(mem.free), uuid=uuid, nvml_index=index, mig_index=m))
    return slices


def _filter_visible(devices: tuple[Gpu, ...]) -> tuple[Gpu, ...]:
    """Keep the devices CUDA_VISIBLE_DEVICES exposes, renumbered as torch numbers them (NVML ignores the
    variable). Entries are NVML indices of whole GPUs, GPU-... UUIDs (or unique prefixes) or MIG-... UUIDs; CUDA
    stops at the first invalid entry. Unset, every whole GPU is visible, and the first MIG slice (a CUDA process
    sees one MIG slice). CUDA's default device order is fastest first; NVML's is PCI bus order: they agree on
    machines with identical GPUs, and exactly with CUDA_DEVICE_ORDER=PCI_BUS_ID."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        whole = [g for g in devices if g.mig_index is None]
        migs = [g for g in devices if g.mig_index is not None]
        picked = whole + migs[:1]
    else:
        picked = []
        for token in (t.strip() for t in visible.split(",") if t.strip()):
            match = [g for g in devices if _matches(g, token)]
            if not match:
                break
            picked.append(match[0])
    return tuple(replace(g, index=i) for i, g in enumerate(picked))


def _matches(gpu: Gpu, token: str) -> bool:
    if token.isdigit():
        return gpu.mig_index is None and gpu.nvml_index == int(token)
    if token.startswith("MIG-"):
        return gpu.mig_index is not None and gpu.uuid.startswith(token)
    return gpu.mig_index is None and gpu.uuid.startswith(token if token.startswith("GPU-") else f"GPU-{token}")


def visible_gpus() -> tuple[Gpu, ...]:
    """The GPUs this process's CUDA sees, by CUDA index, with their NVML location; () without NVML."""
    try:
        return _filter_visible(_probe_nvml())
    except Exception:  # no NVML: nothing to map
        return ()


def _gpu_may_exist_without_nvml() -> bool:
    """True on macOS (Apple GPUs) and where a CUDA/ROCm device node exists; importing torch costs seconds."""
    if sys.platform == "darwin":
        return True
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


# Run in a short-lived child process: asking torch.cuda for memory opens a CUDA context (hundreds of MB) on every
# GPU, which would otherwise stay open in the training process for the whole run.
_TORCH_PROBE = """
import json, torch
gpus = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append([i, torch.cuda.get_device_name(i), total, free])
print(json.dumps(gpus))
"""
TORCH_PROBE_TIMEOUT_S = 120


def _probe_torch() -> tuple[Gpu, ...]:
    """GPUs as torch sees them, asked in a child process that exits (and frees its CUDA contexts) at once."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=TORCH_PROBE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"torch did not answer within {TORCH_PROBE_TIMEOUT_S} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"the torch probe exited with {done.returncode}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return tuple(Gpu(int(i), str(name), _gb(total), _gb(free)) for i, name, total, free in rows)


def to_dict(snapshot: HardwareSnapshot) -> dict[str, Any]:
    """Return the snapshot as JSON-ready data (the documented hardware snapshot format)."""
    data = asdict(snapshot)
    data["gpus"] = [asdict(g) for g in snapshot.gpus]
    data["notes"] = list(snapshot.notes)
    data["versions"] = dict(snapshot.versions)
    return data


def from_dict(data: Any, source: str = "dict") -> HardwareSnapshot:
    """Validate snapshot data once, at the boundary; extra keys are ignored."""
    if not isinstance(data, dict):
        raise HardwareError(f"{source}: a hardware snapshot must be a JSON object")
    try:
        gpus = tuple(
            Gpu(
                int(g["index"]),
                str(g["name"]),
                float(g["total_vram_gb"]),
                float(g["free_vram_gb"]),
                uuid=str(g.get("uuid", "")),
                nvml_index=None if g.get("nvml_index") is None else int(g["nvml_index"]),
                mig_index=None if g.get("mig_index") is None else int(g["mig_index"]),
            )
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
            shm_free_gb=None if data.get("shm_free_gb") is None else float(data["shm_free_gb"]),
            gpu_backend=str(data.get("gpu_backend", "nvml" if gpus else "none")),
            source=source,
            notes=tuple(str(n) for n in data.get("notes", [])),
            versions=tuple((str(k), str(v)) for k, v in (data.get("versions") or {}).items()),
            libc=str(data.get("libc", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HardwareError(
            f"{source}: not a valid hardware snapshot ({first_line(exc)} is missing or wrong)"
        ) from None
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
    data = read_json(path, "a hardware snapshot", HardwareError, f"hardware snapshot not found: {path}")
    return from_dict(data, source=str(path))


def _gb(n_bytes: float) -> float:
    return round(n_bytes / GIB, 2)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def weakest(snapshots: list[HardwareSnapshot]) -> HardwareSnapshot:
    """One snapshot for a run across nodes: the first node's, with the least free VRAM, RAM, cores, disk and
    /dev/shm that any node has (every node runs the same per-rank batch, workers and cache), and a note saying so.
    A single snapshot comes back unchanged."""
    first = snapshots[0]
    if len(snapshots) == 1:
        return first
    all_gpus = [g for s in snapshots for g in s.gpus]
    free = min((g.free_vram_gb for g in all_gpus), default=0.0)
    total = min((g.total_vram_gb for g in all_gpus), default=0.0)
    gpus = tuple(
        replace(g, free_vram_gb=min(g.free_vram_gb, free), total_vram_gb=min(g.total_vram_gb, total))
        for g in first.gpus
    )
    shm = [s.shm_free_gb for s in snapshots if s.shm_free_gb is not None]
    return replace(
        first,
        gpus=gpus,
        ram_total_gb=min(s.ram_total_gb for s in snapshots),
        ram_available_gb=min(s.ram_available_gb for s in snapshots),
        cpu_cores_logical=min(s.cpu_cores_logical for s in snapshots),
        cpu_cores_physical=min(s.cpu_cores_physical for s in snapshots),
        disk_free_gb=min(s.disk_free_gb for s in snapshots),
        shm_free_gb=min(shm) if shm else None,
        notes=(*first.notes, f"{len(snapshots)} nodes: planned for the least free VRAM, RAM, cores and disk of any"),
    )
