"""What this machine can honour: the upper bounds of numeric options.

``--workers 100000`` forked for minutes and ended in SIGKILL; ``--batch-size
99999999999999999999`` was accepted (issue 23). Options are checked against these bounds
before anything starts (``histohub.features.check_options``, the command line's parsers):

- processes and threads: at most ``2 x`` the CPUs this process may run on;
- a batch of patches: at most what half the machine's memory holds at ``PATCH_BYTES``
  each;
- counts without a machine cost (``--max-patches``): at most ``MAX_COUNT``.

Torch-free: the command line's parsers use it.
"""

from __future__ import annotations

import functools
import os

#: Memory counted for one patch in a batch: 224 px as float32 (0.6 MB) plus the first
#: layers' activations of a ResNet (a few MB): 4 MiB.
PATCH_BYTES = 4 << 20
#: The largest count an option takes where the machine sets no bound (an int64 attribute).
MAX_COUNT = 2**31 - 1


@functools.cache
def cpu_count() -> int:
    """CPUs this process may run on (its affinity, else the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@functools.cache
def memory_bytes() -> int:
    """The machine's physical memory (8 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 8 << 30


def max_workers() -> int:
    """The most worker processes or threads an option may ask for."""
    return 2 * cpu_count()


def max_batch_size() -> int:
    """The most patches a batch may hold: half the memory at ``PATCH_BYTES`` a patch."""
    return max(64, memory_bytes() // 2 // PATCH_BYTES)
