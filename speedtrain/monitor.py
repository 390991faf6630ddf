"""Sample GPU utilisation/memory (NVML) and CPU/RAM (psutil) in a background thread during training."""

from __future__ import annotations

import contextlib
import statistics
import threading
from dataclasses import dataclass
from typing import Any

import psutil

from speedtrain.hardware import visible_gpus


@dataclass(frozen=True, slots=True)
class MonitorSummary:
    samples: int
    gpu_util_mean: float | None  # percent, mean over samples and GPUs; None without NVML
    gpu_mem_peak_gb: float | None  # NVML's used memory, all processes on the watched GPUs
    cpu_util_mean: float
    ram_used_peak_gb: float


class Monitor:
    """Context manager: samples every `interval` seconds until it exits; never blocks or fails training."""

    def __init__(self, gpu_indices: tuple[int, ...] = (), interval: float = 0.5) -> None:
        """`gpu_indices` are CUDA indices (as in --device); they are mapped to NVML's devices here."""
        self._indices = gpu_indices
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpu_util: list[float] = []
        self._gpu_mem: list[float] = []
        self._cpu: list[float] = []
        self._ram: list[float] = []
        self._nvml: Any = None
        self._handles: list[Any] = []

    def __enter__(self) -> Monitor:
        self._open_nvml()
        psutil.cpu_percent(None)  # the first call only sets the reference point
        self._thread = threading.Thread(target=self._loop, name="speedtrain-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._nvml is not None:
            # shutting down a half-broken driver must not mask the training result
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()

    def summary(self) -> MonitorSummary:
        return MonitorSummary(
            samples=len(self._cpu),
            gpu_util_mean=round(statistics.fmean(self._gpu_util), 1) if self._gpu_util else None,
            gpu_mem_peak_gb=round(max(self._gpu_mem), 2) if self._gpu_mem else None,
            cpu_util_mean=round(statistics.fmean(self._cpu), 1) if self._cpu else 0.0,
            ram_used_peak_gb=round(max(self._ram), 2) if self._ram else 0.0,
        )

    def _open_nvml(self) -> None:
        if not self._indices:
            return
        try:
            import pynvml

            # CUDA index -> NVML device: under CUDA_VISIBLE_DEVICES=1 (SLURM, shared servers) CUDA's device 0 is
            # NVML's device 1; a MIG slice is a handle below its GPU's.
            by_cuda = {g.index: g for g in visible_gpus()}
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [_handle(pynvml, by_cuda[i]) for i in self._indices if i in by_cuda]
        except Exception:  # no NVML: GPU figures stay None, CPU/RAM are still sampled
            self._nvml, self._handles = None, []

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self) -> None:
        self._cpu.append(psutil.cpu_percent(None))
        self._ram.append(psutil.virtual_memory().used / 1024**3)
        if not self._handles:
            return
        # Each figure on its own: a MIG slice reports memory but no utilisation (NVML: NOT_SUPPORTED), and a GPU
        # that stops answering mid-run loses its samples, not the run.
        with contextlib.suppress(Exception):
            self._gpu_mem.append(max(self._nvml.nvmlDeviceGetMemoryInfo(h).used / 1024**3 for h in self._handles))
        with contextlib.suppress(Exception):
            utils = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
            self._gpu_util.append(statistics.fmean(utils))


def _handle(pynvml: Any, gpu: Any) -> Any:
    """The NVML handle of a visible GPU or MIG slice."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(gpu.nvml_index)
    if gpu.mig_index is not None:
        handle = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, gpu.mig_index)
    return handle
