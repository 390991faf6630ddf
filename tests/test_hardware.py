"""The probe degrades to CPU-only without NVML or a driver; snapshots round-trip through JSON."""

from __future__ import annotations

import json
import sys
import types

import pytest
from conftest import GIB, FakeNVMLError, fake_nvml

from speedtrain import hardware
from speedtrain.errors import HardwareError


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
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)  # both cores usable
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
        ("{not json", "cannot read a hardware snapshot"),
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


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000", 16),  # no quota: the affinity mask (here all 16) counts
        ("200000 100000", 2),  # docker --cpus 2
        ("150000 100000", 2),  # docker --cpus 1.5: a second core is partly usable
        ("50000 100000", 1),  # docker --cpus 0.5 still has one core to run on
    ],
)
def test_usable_cores_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch, cpu_max, expected):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert hardware.usable_cores(32, tmp_path / "cpu.max") == expected


def test_usable_cores_follow_a_narrow_affinity_mask(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda _pid: {0, 1, 2}, raising=False)  # taskset -c 0-2
    assert hardware.usable_cores(32, tmp_path / "absent") == 3


def test_a_mig_slice_is_probed_with_its_own_memory(monkeypatch, small_machine):
    # GPU 0 whole; GPU 1 an A100 in MIG mode with two slices (slot 1 empty); CUDA_VISIBLE_DEVICES names a slice
    devices = [("GPU-aaa", "NVIDIA A100-SXM4-80GB", 80.0, 79.0), ("GPU-bbb", "NVIDIA A100-SXM4-80GB", 80.0, 80.0)]
    slices = {1: [("MIG-1111", "", 19.5, 19.0), None, ("MIG-2222", "", 9.75, 9.5)]}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices, slices))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-2222")
    snap = hardware.probe()
    assert [(g.index, g.total_vram_gb, g.free_vram_gb) for g in snap.gpus] == [(0, 9.75, 9.5)]
    assert (snap.gpus[0].nvml_index, snap.gpus[0].mig_index, snap.gpus[0].uuid) == (1, 2, "MIG-2222")
    assert "MIG" in snap.gpus[0].name
    # unset: the whole GPU and the first slice (a CUDA process sees one MIG slice)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [g.uuid for g in hardware.probe().gpus] == ["GPU-aaa", "MIG-1111"]
    # a plan for the slice sizes the batch from the slice's 9.5 GB, not the whole GPU's 80
    from conftest import fake_stats

    from speedtrain import planner

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-2222")
    assert "of 9.5 GB free VRAM" in planner.plan(hardware.probe(), fake_stats()).reason("batch")


def test_snapshot_keeps_the_nvml_mapping_through_json(monkeypatch, small_machine, tmp_path):
    devices = [("GPU-aaa", "A", 80.0, 79.0), ("GPU-bbb", "B", 80.0, 40.5)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    snap = hardware.probe(tmp_path)
    assert hardware.load(hardware.save(snap, tmp_path / "hw.json")).gpus == snap.gpus
    assert (snap.gpus[0].index, snap.gpus[0].nvml_index, snap.gpus[0].uuid) == (0, 1, "GPU-bbb")


def test_without_nvml_torch_is_asked_in_a_child_process(tmp_path):
    """The fallback probe must not open CUDA contexts in the training process: torch is asked in a child."""
    import subprocess

    code = (
        "import sys\n"
        "from speedtrain import hardware\n"
        "hardware._probe_nvml = lambda: (_ for _ in ()).throw(RuntimeError('NVML Shared Library Not Found'))\n"
        "hardware._gpu_may_exist_without_nvml = lambda: True\n"
        "snap = hardware.probe()\n"
        "print(snap.gpu_backend, 'torch' in sys.modules, '|'.join(snap.notes))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    backend, imported, notes = done.stdout.strip().split(" ", 2)
    assert imported == "False"  # this process never imported torch; the child did and exited
    assert backend == "none"  # no CUDA on this machine: the child found no GPU
    assert "torch sees no CUDA GPU" in notes


def test_a_torch_probe_that_fails_in_the_child_is_one_note(monkeypatch, small_machine):
    monkeypatch.setitem(sys.modules, "pynvml", broken_nvml())
    monkeypatch.setattr(hardware, "_gpu_may_exist_without_nvml", lambda: True)
    monkeypatch.setattr(hardware, "_TORCH_PROBE", "raise RuntimeError('CUDA driver initialization failed')")
    snap = hardware.probe()
    assert snap.gpus == ()
    assert any("torch could not query GPUs (RuntimeError: CUDA driver initialization failed)" in n for n in snap.notes)


def test_shm_free_space_is_probed(tmp_path):
    assert hardware.shm_free_gb(tmp_path) > 0
    assert hardware.shm_free_gb(tmp_path / "absent") is None


def test_a_run_across_nodes_is_planned_for_the_weakest_node():
    from conftest import snapshot

    from speedtrain.hardware import weakest

    big, small = snapshot((80, 80), ram=512, cores=64), snapshot((24, 24), ram=64, cores=16, disk=100)
    merged = weakest([big, small])
    assert [g.free_vram_gb for g in merged.gpus] == [small.gpus[0].free_vram_gb] * 2
    assert (merged.ram_available_gb, merged.cpu_cores_logical, merged.disk_free_gb) == (64, 16, 100)
    assert "2 nodes: planned for the least free VRAM" in merged.notes[-1]
    assert weakest([big]) is big


def test_the_probe_records_the_software_a_run_trains_with_and_a_snapshot_keeps_it():
    import platform
    from importlib import metadata

    snap = hardware.probe()
    versions = dict(snap.versions)
    assert versions["python"] == platform.python_version()
    assert versions["ultralytics"] == metadata.version("ultralytics")
    assert versions["torch"] == metadata.version("torch")
    assert hardware.from_dict(hardware.to_dict(snap), "x").versions == snap.versions
