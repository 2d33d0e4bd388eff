"""What the benchmarks in this folder read off the machine besides their own timings.

- ``matmul_gflops``: an fp32 matrix-multiply rate. Taken before and after a measurement,
  it tells whether the (shared) machine was in a slow spell: about 170 GFLOP/s at 1024^3
  on two idle threads here, 72-84 in a slow spell.
- ``probe``: the same, printed with the load average.
- ``memory_mib``: this process's peak (``VmHWM``) or current (``VmRSS``) resident memory.
- ``openslide_only``: histohub reads every pixel through OpenSlide meanwhile, as the naive
  loops the benchmarks compare with do (``HISTOHUB_JPEG_TILES=0``).

The scripts import it as a sibling (``python benchmarks/<script>.py`` puts this folder
first on the import path); the tests get the folder from pytest's ``pythonpath``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """GFLOP/s of ``repeats`` fp32 ``size`` x ``size`` matrix multiplies (after one warm-up)
    at torch's current thread count."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * size ** 3 / (time.perf_counter() - start) / 1e9


def probe(when: str) -> float:
    """``matmul_gflops()``, printed as ``matmul probe {when}: ...`` with the load average."""
    value = matmul_gflops()
    print(f"matmul probe {when}: {value:.0f} GFLOP/s (load average {os.getloadavg()[0]:.2f})",
          flush=True)
    return value


def memory_mib(field: str = "VmHWM") -> float:
    """``VmHWM`` (peak) or ``VmRSS`` of this process from /proc, in MiB. (Not ru_maxrss:
    a child inherits its parent's peak through fork.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


@contextlib.contextmanager
def openslide_only() -> Iterator[None]:
    """histohub's ``Slide`` reads every pixel through OpenSlide meanwhile: it decodes no JPEG
    tile itself (``HISTOHUB_JPEG_TILES=0``, read when a slide is opened)."""
    previous = os.environ.get("HISTOHUB_JPEG_TILES")
    os.environ["HISTOHUB_JPEG_TILES"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HISTOHUB_JPEG_TILES"]
        else:
            os.environ["HISTOHUB_JPEG_TILES"] = previous
