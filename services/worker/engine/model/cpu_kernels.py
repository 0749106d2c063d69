"""Optional CPU kernels (cpu_kernels.cpp), compiled on first use and cached by torch.

Used only on CPUs with AVX512-BF16; if the build fails the engine falls back to plain
PyTorch ops, which give the same results more slowly.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


def cpu_supports_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags


@functools.cache
def load() -> ModuleType | None:
    """The compiled module, or None where it cannot be used or built."""
    if not cpu_supports_avx512_bf16():
        return None
    try:
        from torch.utils.cpp_extension import load as load_extension

        return load_extension(
            name="genmesh_cpu_kernels",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                          "-fopenmp", "-ffast-math"],
            verbose=False,
        )
    except Exception as exc:  # a missing compiler must not stop the engine
        log.warning("CPU kernels unavailable (%s); using plain PyTorch ops", exc)
        return None
