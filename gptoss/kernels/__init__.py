"""Fast CPU kernels, compiled from C++ on first use with torch's cpp_extension (g++ and ninja needed).

`cpu_kernels()` returns the compiled module, or None where it cannot be built, in which case the
model keeps its pure-PyTorch reference path. Set GPTOSS_KERNELS=0 to force the reference path.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

NAME = "gptoss_cpu_kernels"
SOURCES = [Path(__file__).with_name(name) for name in ("moe.cpp", "gemv.cpp", "attention.cpp", "module.cpp")]


@functools.cache
def cpu_kernels():
    if os.environ.get("GPTOSS_KERNELS", "1") == "0":
        return None
    try:
        print("gptoss: compiling CPU kernels (first use only)...", file=sys.stderr) if not _built(NAME) else None
        return build(NAME, march="native")
    except Exception as e:  # no compiler, no headers, an unsupported platform: keep the reference path
        warnings.warn(f"gptoss: CPU kernels unavailable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                      f"using the reference path")
        return None


def build(name: str, march: str):
    """Compile the kernels for `march` (g++'s -march: "native" for this CPU, "x86-64-v3" for the AVX2
    paths a CPU without AVX-512 takes, which the tests build on every x86 machine) as module `name`."""
    from torch.utils.cpp_extension import load

    return load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=["-O3", f"-march={march}", "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False)


def _built(name: str) -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
