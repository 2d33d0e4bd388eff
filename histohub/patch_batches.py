"""A tile grid's patches read in batches for the slide pipeline: uint8 ``(b, S, S, 3)``.

- ``batch_ranges`` cuts grid positions into batches aligned to the batch size (so a
  resumed run forms the same batches).
- ``BatchReader`` reads them in a thread (one OpenSlide handle per reader);
  ``SlidePatches`` + ``stack_patches`` in DataLoader worker processes.

An undecodable tile is logged and listed, never fatal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .wsi import PatchReader, Slide, TileGrid, TileReadError

log = logging.getLogger(__name__)


def batch_ranges(start: int, stop: int, batch_size: int) -> list[range]:
    """Grid positions ``start..stop`` in batches aligned to multiples of ``batch_size`` (so
    a resumed run forms the same batches as an uninterrupted one)."""
    first = min(stop, (start // batch_size + 1) * batch_size)
    ranges = [range(start, first)] if first > start else []
    ranges += [range(i, min(i + batch_size, stop)) for i in range(first, stop, batch_size)]
    return ranges


def pinned(shape: tuple[int, ...]) -> np.ndarray:
    """A page-locked uint8 host array: the copy to the GPU runs asynchronously from it."""
    import torch

    return torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy()


#: One batch as read: uint8 ``(b, S, S, 3)`` pixels of the patches read, their grid
#: positions ``(b,)``, and the positions whose tiles could not be decoded.
ReadBatch = tuple[np.ndarray, np.ndarray, np.ndarray]


class BatchReader:
    """Reads batches of a grid's patches into uint8 ``(b, S, S, 3)`` arrays.

    ``allocate(shape)`` gives the array to fill (default ``np.empty``; pinned host memory
    for a GPU). One reader per thread (it holds its own OpenSlide handle, or takes over
    ``slide``: see ``PatchReader``); ``close()`` releases it. Undecodable tiles are logged
    and listed, never fatal.
    """

    def __init__(self, grid: TileGrid, *, interpolation: str = "bilinear",
                 allocate: Callable[[tuple[int, ...]], np.ndarray] | None = None,
                 slide: Slide | None = None) -> None:
        self.grid = grid
        self._reader = PatchReader(grid, interpolation=interpolation, slide=slide)
        self._allocate = allocate or (lambda shape: np.empty(shape, np.uint8))

    def read(self, positions: Sequence[int]) -> ReadBatch:
        size = self.grid.patch_size
        pixels = self._allocate((len(positions), size, size, 3))
        ok: list[int] = []
        failed: list[int] = []
        for index in positions:
            try:
                pixels[len(ok)] = self._reader.read(index)
                ok.append(index)
            except TileReadError as error:
                log.warning("%s: %s; skipped", Path(self.grid.slide_path).name, error)
                failed.append(index)
        return pixels[:len(ok)], np.asarray(ok, np.int64), np.asarray(failed, np.int64)

    def read_all(self, ranges: Sequence[range]):
        """Each of ``ranges`` in turn (a generator: run it in a thread), then close."""
        try:
            for positions in ranges:
                yield self.read(positions)
        finally:
            self.close()

    def close(self) -> None:
        self._reader.close()


class SlidePatches:
    """Patches of a ``TileGrid`` as a map-style dataset for DataLoader worker processes:
    item -> ``(uint8 (S, S, 3), ok)``; an undecodable tile gives zeros and ``ok=False``.

    Each worker process opens its own slide handle on first use. Batch with
    ``stack_patches``.
    """

    def __init__(self, grid: TileGrid, interpolation: str = "bilinear") -> None:
        self.grid, self.interpolation = grid, interpolation
        self._reader: PatchReader | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, index: int) -> tuple[np.ndarray, bool]:
        if self._reader is None or self._pid != os.getpid():
            self._reader = PatchReader(self.grid, interpolation=self.interpolation)
            self._pid = os.getpid()
        try:
            return self._reader.read(index), True
        except TileReadError as error:
            log.warning("%s: %s; skipped", Path(self.grid.slide_path).name, error)
            size = self.grid.patch_size
            return np.zeros((size, size, 3), np.uint8), False


def stack_patches(items: list[tuple[np.ndarray, bool]]):
    """DataLoader collate for ``SlidePatches``: ``(uint8 tensor (b, S, S, 3) of the patches
    read, bool array of which items were read)``."""
    import torch

    ok = np.array([flag for _, flag in items], bool)
    kept = [pixels for pixels, flag in items if flag]
    if not kept:
        return torch.empty((0, *items[0][0].shape), dtype=torch.uint8), ok
    return torch.from_numpy(np.stack(kept)), ok
