"""The matrix-multiply probe of training's benchmarks: taken before and after a measurement,
it tells whether the (shared) machine was in a slow spell, about 170 GFLOP/s at 1024^3 on
two idle threads here. The scripts of this folder import it as a sibling (``python
training/benchmarks/<script>.py`` puts this folder first on the import path)."""

from __future__ import annotations

import time


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of ``repeats`` fp32 ``size`` x ``size`` matrix multiplies (after one warm-up)
    at torch's current thread count."""
    import torch

    a, b = torch.rand(size, size), torch.rand(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * size ** 3 / (time.perf_counter() - start) / 1e9
