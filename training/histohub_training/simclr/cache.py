"""Decode a run's pool once into one uint8 array, instead of every image at every step.

On a CPU, decoding and resizing the pool's files took 17% of a training step (issue 8's
profile); a pool of a few thousand images is a few hundred MB as uint8 ``(N, 3, S, S)``,
so it is decoded once, into ``<run>/pool_cache.npy``, and memory-mapped afterwards (every
DataLoader worker and every resumed run shares the same pages).

The file is written under a temporary name and renamed, and a sidecar
``pool_cache.json`` records what it holds (the pool file's sha256, the side ``S``, the
count): a cache that does not match its pool is rebuilt, never trusted. Unreadable images
are replaced by the next readable one, as :class:`~simclr.data.PoolDataset` does, and
reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from histohub.files import atomic_path, write_text_atomic

from .data import Pool, PoolDataset

log = logging.getLogger(__name__)

CACHE_NAME = "pool_cache.npy"


def _fingerprint(pool_path: Path, size: int, count: int) -> dict:
    digest = hashlib.sha256(pool_path.read_bytes()).hexdigest()
    return {"pool_sha256": digest, "size": size, "count": count, "format": "uint8 NCHW"}


def load_or_build_cache(pool: Pool, pool_path: Path, size: int, *, progress: bool = True
                        ) -> tuple[torch.Tensor, dict[str, str]]:
    """``(images uint8 (N, 3, size, size), skipped {item: reason})`` for ``pool``.

    Built next to ``pool_path`` on first use (atomically), memory-mapped when it is there
    and matches the pool. ``skipped``: unreadable items replaced while building (empty
    when the cache was reused; they were reported when it was built).
    """
    folder = pool_path.parent
    path, meta_path = folder / CACHE_NAME, folder / "pool_cache.json"
    expected = _fingerprint(pool_path, size, len(pool))
    if path.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text(encoding="utf-8")) == expected:
                array = np.load(path, mmap_mode="c")
                if array.shape == (len(pool), 3, size, size) and array.dtype == np.uint8:
                    return torch.from_numpy(np.asarray(array)), {}
        except (OSError, ValueError) as error:
            log.warning("rebuilding %s: %s", path, error)
        log.info("%s does not match %s: rebuilding it", path, pool_path)
    skipped = _build(pool, path, size, progress=progress)
    write_text_atomic(meta_path, json.dumps(expected, indent=1))
    return torch.from_numpy(np.asarray(np.load(path, mmap_mode="c"))), skipped


def _build(pool: Pool, path: Path, size: int, *, progress: bool) -> dict[str, str]:
    from tqdm.auto import tqdm

    dataset = PoolDataset(pool.items, size)
    skipped: dict[str, str] = {}
    with atomic_path(path) as temporary:
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8,
                                          shape=(len(pool), 3, size, size))
        for index in tqdm(range(len(pool)), desc="decoding the pool once", unit="img",
                          disable=not progress):
            image, _, failures = dataset[index]
            array[index] = image.numpy()
            skipped.update(failures)
        array.flush()
        del array
    return skipped


class CachedPool(torch.utils.data.Dataset):
    """``dataset[(index, batch_seed)]`` -> (uint8 (3, S, S), batch_seed, []): the
    in-memory twin of :class:`~simclr.data.PoolDataset`."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index, batch_seed = key if isinstance(key, tuple) else (key, None)
        return self.images[index], batch_seed, []
