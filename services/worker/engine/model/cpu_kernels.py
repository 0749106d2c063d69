"""Optional CPU kernels (cpu_kernels.cpp), compiled on first use and cached.

Used only on CPUs with AVX512-BF16 and AVX512-VNNI (the int8 kernel's integer dot
products); if the build fails the engine falls back to plain
PyTorch ops, which compute the same function more slowly.

The build lives in ``~/.cache/genmesh/kernels/<hash of source and flags>/``, so every
checkout with the same source shares one build and a changed source gets a new one.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
CACHE_ROOT = Path.home() / ".cache" / "genmesh" / "kernels"
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni",
          "-mf16c", "-fopenmp", "-ffast-math"]


def cpu_supports_avx512_bf16() -> bool:
    """AVX512-BF16, and AVX512-VNNI beside it (every CPU with the first has the second)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags and "avx512_vnni" in flags


@functools.cache
def load() -> ModuleType | None:
    """The compiled module, or None where it cannot be used or built."""
    if not cpu_supports_avx512_bf16():
        return None
    try:
        import torch
        from torch.utils.cpp_extension import load as load_extension

        source = SOURCE.read_bytes()
        digest = hashlib.sha256(source + " ".join(CFLAGS).encode()
                                + torch.__version__.encode()).hexdigest()[:12]
        build_dir = CACHE_ROOT / digest
        build_dir.mkdir(parents=True, exist_ok=True)
        src = build_dir / SOURCE.name
        if not src.exists():  # write-then-rename: a concurrent reader never sees half a file
            tmp = build_dir / f".{SOURCE.name}.{os.getpid()}"
            tmp.write_bytes(source)
            tmp.rename(src)
        name = f"genmesh_cpu_kernels_{digest}"
        if not (build_dir / f"{name}.so").exists():
            log.warning("building genmesh's CPU kernels (once per source version, ~30 s)")
        return load_extension(name=name, sources=[str(src)], build_directory=str(build_dir),
                              extra_cflags=CFLAGS, verbose=False)
    except Exception as exc:  # a missing compiler must not stop the engine
        log.warning("CPU kernels unavailable (%s); using plain PyTorch ops", exc)
        return None
