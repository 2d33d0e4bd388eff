"""Bit-identical reruns: what a run fixes so that the same seed gives the same weights.

A run's random draws are already functions of the seed: the pool (``data.build_pool``), the
model's initialisation (``seed_everything``), the data order and every augmentation
(``data.EpochBatchSampler``: a seed per (seed, epoch, step, rank), ``augment.BatchAugment``
with its own generator). What else decides the bits of the weights, and what this module
does about it:

- **Thread count**: oneDNN convolutions and BLAS matrix products split their sums over the
  threads, and a different split rounds differently (1 vs 2 threads: conv1 16% apart after
  4 epochs, training/README.md). ``threads`` fixes it (``torch.set_num_threads``) and the
  run records it (``checkpoint.pt``, the manifest's recipe).
- **MKL's code path**: MKL may pick kernels by memory alignment and CPU; ``MKL_CBWR=AUTO``
  (conditional numerical reproducibility) fixes the path for one CPU type at a fixed
  thread count. Set before the first matrix product.
- **Nondeterministic kernels**: ``torch.use_deterministic_algorithms`` (with
  ``warn_only``: an op without a deterministic version warns instead of failing); on GPUs
  also cuDNN's deterministic mode, no autotuning, and ``CUBLAS_WORKSPACE_CONFIG``.
- **DataLoader workers**: the loader gets its own seeded generator (its workers' base seed
  no longer comes from the global generator) and each worker seeds ``random`` / NumPy from
  it; the augmentations never read those states (they take the batch's seed).

What this cannot fix, and so is recorded (``environment``) rather than promised: another
CPU instruction set (``torch.backends.cpu.get_cpu_capability``: AVX2 vs AVX-512 kernels sum
in other orders), another torch / oneDNN / MKL / Pillow version (kernels, image decoding
and resizing of the pool), several processes (DDP's all-reduce order) and GPU atomics in
the few ops without a deterministic version. A rerun that differs in any of them diverges
like another seed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
from collections.abc import Iterator

import numpy as np
import torch

#: MKL's conditional numerical reproducibility: the same code path on the same CPU type.
MKL_CBWR = "AUTO"


@contextlib.contextmanager
def reproducible(*, threads: int | None, deterministic: bool,
                 device: torch.device) -> Iterator[int]:
    """Fix threads and deterministic kernels for the ``with`` block; yields the thread
    count in use. Torch's previous settings are restored on exit (tests run many trainings
    in one process)."""
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[3:]


def loader_generator(seed: int, rank: int = 0) -> torch.Generator:
    """The DataLoader's own generator: its workers' base seed follows the run's seed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + rank)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random`` and NumPy in a DataLoader worker from the base
    seed torch gave it (PyTorch's recipe for reproducible workers)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def environment(threads: int) -> dict:
    """What a bit-identical rerun must match, recorded in the checkpoint and the manifest."""
    return {"threads": threads, "torch": str(torch.__version__),
            "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "machine": platform.machine(), "mkl_cbwr": os.environ.get("MKL_CBWR"),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
