"""GPU load read through NVML, for the worker's metrics.

NVML's Python binding is the module ``pynvml``, which the ``nvidia-ml-py`` package
provides in the GPU image. It is imported only here and only when asked for: without it
(CPU machines, this dev image) or without a driver, there are simply no GPU readings.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("genmesh.worker")


@dataclass(frozen=True, slots=True)
class GpuSample:
    index: int  # NVML's device index (all GPUs the process can see, not CUDA's numbering)
    utilization_perc: float  # 0..1: share of NVML's last sample period a kernel ran
    memory_used_bytes: int
    memory_total_bytes: int


class Nvml:
    """An initialized NVML and the handles of its devices; the only user of ``pynvml``."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def open(cls) -> Nvml | None:
        """NVML with at least one GPU, or None (no binding, no driver, no device)."""
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            return None
        try:
            nvml.nvmlInit()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i)
                       for i in range(nvml.nvmlDeviceGetCount())]
        except Exception:  # pynvml.NVMLError and its many subclasses: no usable driver
            log.warning("NVML is installed but not usable; no GPU metrics", exc_info=True)
            return None
        if not handles:
            nvml.nvmlShutdown()
            return None
        return cls(nvml, handles)

    @property
    def num_gpus(self) -> int:
        return len(self._handles)

    def sample(self) -> list[GpuSample]:
        """One reading per GPU (each call is a few driver queries, well under a ms)."""
        samples = []
        for index, handle in enumerate(self._handles):
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            samples.append(GpuSample(index=index, utilization_perc=utilization.gpu / 100,
                                     memory_used_bytes=int(memory.used),
                                     memory_total_bytes=int(memory.total)))
        return samples

    def close(self) -> None:
        self._nvml.nvmlShutdown()
