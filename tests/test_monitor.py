"""The monitor samples the GPUs the run uses: CUDA indices mapped to NVML's devices, MIG slices included."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import fake_nvml, wait_for

from speedtrain.monitor import Monitor

DEVICES = [
    ("GPU-aaa", "NVIDIA H100 80GB HBM3", 80.0, 70.0, 5),  # NVML 0: someone else's job, 10 GB used, 5% busy
    ("GPU-bbb", "NVIDIA H100 80GB HBM3", 80.0, 50.0, 97),  # NVML 1: ours, 30 GB used, 97% busy
]


def _sampled(monitor_args: tuple[int, ...]) -> tuple[float | None, float | None]:
    with Monitor(monitor_args, interval=0.01) as monitor:
        assert wait_for(lambda: monitor.summary().samples >= 3, timeout=5)
    summary = monitor.summary()
    return summary.gpu_mem_peak_gb, summary.gpu_util_mean


def test_cuda_device_0_under_cuda_visible_devices_1_is_nvml_device_1(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(DEVICES))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # SLURM and shared servers hand out GPUs this way
    assert _sampled((0,)) == (30.0, 97.0)  # our GPU's figures, not NVML device 0's (10 GB, 5%)


@pytest.mark.parametrize(("visible", "expected"), [(None, (10.0, 5.0)), ("GPU-bbb", (30.0, 97.0))])
def test_mapping_by_uuid_and_without_remap(monkeypatch, visible, expected):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(DEVICES))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert _sampled((0,)) == expected


def test_a_mig_slice_reports_memory_without_utilisation(monkeypatch):
    slices = {1: [("MIG-1111", "", 19.5, 15.5)]}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(DEVICES, slices))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1111")
    assert _sampled((0,)) == (4.0, None)  # the slice's own 4 GB used; NVML has no utilisation for a slice


def test_no_nvml_keeps_cpu_figures(monkeypatch):
    import types

    broken = types.ModuleType("pynvml")
    broken.nvmlInit = lambda: (_ for _ in ()).throw(RuntimeError("NVML Shared Library Not Found"))
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    with Monitor((0,), interval=0.01) as monitor:
        time.sleep(0.05)
    summary = monitor.summary()
    assert (summary.gpu_mem_peak_gb, summary.gpu_util_mean) == (None, None)
    assert summary.samples >= 1
