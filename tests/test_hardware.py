"""The probe degrades to CPU-only without NVML or a driver; snapshots round-trip through JSON."""

from __future__ import annotations

import json
import sys
import types
from collections import namedtuple

import pytest

from speedtrain import hardware
from speedtrain.errors import HardwareError

Mem = namedtuple("Mem", "total free used")
GIB = 1024**3


class FakeNVMLError(Exception):
    pass


def fake_nvml(devices: list[tuple[str, str, float, float]]) -> types.ModuleType:
    """A stand-in for pynvml with the calls the probe uses: (uuid, name, total GB, free GB) per device."""
    mod = types.ModuleType("pynvml")
    mod.NVMLError = FakeNVMLError
    mod.nvmlInit = lambda: None
    mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetCount = lambda: len(devices)
    mod.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    mod.nvmlDeviceGetName = lambda h: h[1]
    mod.nvmlDeviceGetUUID = lambda h: h[0]
    mod.nvmlDeviceGetMemoryInfo = lambda h: Mem(int(h[2] * GIB), int(h[3] * GIB), int((h[2] - h[3]) * GIB))
    return mod


def broken_nvml() -> types.ModuleType:
    mod = fake_nvml([])

    def fail():
        raise FakeNVMLError("NVML Shared Library Not Found")

    mod.nvmlInit = fail
    return mod


@pytest.fixture
def small_machine(monkeypatch):
    """psutil reports a 4 GB, 2-core machine without swap."""
    vm = types.SimpleNamespace(total=4 * GIB, available=3 * GIB, used=1 * GIB)
    monkeypatch.setattr(hardware.psutil, "virtual_memory", lambda: vm)
    monkeypatch.setattr(hardware.psutil, "swap_memory", lambda: types.SimpleNamespace(total=0, free=0))
    monkeypatch.setattr(hardware.psutil, "cpu_count", lambda logical=True: 2 if logical else 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_no_nvml_and_no_device_node_is_cpu_only(monkeypatch, small_machine):
    monkeypatch.setitem(sys.modules, "pynvml", broken_nvml())
    monkeypatch.setattr(hardware, "_gpu_may_exist_without_nvml", lambda: False)
    snap = hardware.probe()
    assert snap.gpus == ()
    assert snap.gpu_backend == "none"
    assert (snap.ram_total_gb, snap.ram_available_gb, snap.cpu_cores_logical, snap.cpu_cores_physical) == (4, 3, 2, 1)
    assert any("NVML unavailable" in n for n in snap.notes)
    assert snap.disk_free_gb > 0


def test_broken_driver_falls_back_to_cpu(monkeypatch, small_machine):
    monkeypatch.setitem(sys.modules, "pynvml", broken_nvml())
    monkeypatch.setattr(hardware, "_gpu_may_exist_without_nvml", lambda: True)

    def torch_fails():
        raise RuntimeError("CUDA driver initialization failed, you might not have a CUDA gpu.")

    monkeypatch.setattr(hardware, "_probe_torch", torch_fails)
    snap = hardware.probe()
    assert snap.gpus == ()
    assert any("torch could not query GPUs" in n for n in snap.notes)


def test_nvml_lists_every_gpu(monkeypatch, small_machine):
    devices = [("GPU-aaa", "NVIDIA H100 80GB HBM3", 80.0, 79.0), ("GPU-bbb", "NVIDIA H100 80GB HBM3", 80.0, 40.5)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices))
    snap = hardware.probe()
    assert [(g.index, g.total_vram_gb, g.free_vram_gb) for g in snap.gpus] == [(0, 80.0, 79.0), (1, 80.0, 40.5)]
    assert snap.gpu_backend == "nvml"


@pytest.mark.parametrize(("visible", "expected"), [("1", [40.5]), ("GPU-bbb,0", [40.5, 79.0]), ("", []), ("5", [])])
def test_cuda_visible_devices_is_respected(monkeypatch, small_machine, visible, expected):
    devices = [("GPU-aaa", "A", 80.0, 79.0), ("GPU-bbb", "B", 80.0, 40.5)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    snap = hardware.probe()
    assert [g.free_vram_gb for g in snap.gpus] == expected
    assert [g.index for g in snap.gpus] == list(range(len(expected)))  # renumbered as torch numbers them


def test_snapshot_round_trips_through_json(tmp_path):
    snap = hardware.probe(tmp_path)
    path = hardware.save(snap, tmp_path / "hw.json")
    loaded = hardware.load(path)
    assert hardware.to_dict(loaded) | {"source": "probed"} == hardware.to_dict(snap)
    doc = json.loads(path.read_text())
    assert {
        "gpus",
        "ram_total_gb",
        "ram_available_gb",
        "cpu_cores_logical",
        "cpu_cores_physical",
        "disk_free_gb",
    } <= set(doc)


def test_minimal_hand_written_snapshot_loads(tmp_path):
    path = tmp_path / "box.json"
    gpu = {"index": 0, "name": "RTX 4090", "total_vram_gb": 24, "free_vram_gb": 23}
    path.write_text(json.dumps({"gpus": [gpu], "ram_total_gb": 64, "cpu_cores_logical": 32, "extra": 1}))
    snap = hardware.load(path)
    assert snap.gpus[0].name == "RTX 4090"
    assert snap.ram_available_gb == 64
    assert snap.cpu_cores_physical == 32


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read hardware snapshot"),
        ("[1, 2]", "must be a JSON object"),
        ('{"gpus": []}', "not a valid hardware snapshot"),
        ('{"gpus": [{"index": 0}], "ram_total_gb": 8, "cpu_cores_logical": 4}', "not a valid hardware snapshot"),
        ('{"ram_total_gb": 0, "cpu_cores_logical": 4}', "must be positive"),
    ],
)
def test_bad_snapshot_files(tmp_path, content, message):
    path = tmp_path / "hw.json"
    path.write_text(content)
    with pytest.raises(HardwareError) as err:
        hardware.load(path)
    assert message in str(err.value)


def test_missing_snapshot_file(tmp_path):
    with pytest.raises(HardwareError) as err:
        hardware.load(tmp_path / "nope.json")
    assert "not found" in str(err.value)
