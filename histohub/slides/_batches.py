"""A tile grid's patches read in batches for the slide pipeline: uint8 ``(b, S, S, 3)``.

- ``batch_ranges`` cuts grid positions into batches aligned to the batch size (so a
  resumed run forms the same batches).
- ``BatchReader`` reads them in a thread (one OpenSlide handle per reader);
  ``ChunkReader`` in DataLoader worker processes, one ``ChunkRead`` item at a time.

An undecodable tile is logged and listed, never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from histohub.slides._reader import PatchReader, Slide, TileReadError

from histohub.slides._tiling import TileGrid

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
        return self.read_at(positions, self.grid.coords[np.asarray(positions, np.int64)])

    def read_at(self, positions: Sequence[int], coords: np.ndarray) -> ReadBatch:
        """The patches at level-0 ``coords`` ``(n, 2)``, known by their grid ``positions``."""
        size = self.grid.patch_size
        pixels = self._allocate((len(positions), size, size, 3))
        ok: list[int] = []
        failed: list[int] = []
        for index, (x, y) in zip(positions, coords.tolist()):
            try:
                pixels[len(ok)] = self._reader.read_at(x, y)
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


@dataclass(frozen=True)
class ChunkRead:
    """One DataLoader item: the grid ``positions`` ``(n,)`` of job ``slot``, at level-0
    ``coords`` ``(n, 2)``, to read with ``grid``'s reading parameters (a copy without its
    coords and mask, so an item pickles small); ``grid=None``: a job with nothing to read."""

    slot: int
    grid: TileGrid | None
    positions: np.ndarray
    coords: np.ndarray

    @classmethod
    def of(cls, slot: int, grid: TileGrid, positions: np.ndarray) -> ChunkRead:
        empty = np.zeros(0, np.float32)
        light = replace(grid, coords=np.zeros((0, 2), np.int64), foreground=empty,
                        mask=np.zeros((0, 0), bool))
        return cls(slot, light, positions, grid.coords[positions])


class ChunkReader:
    """A map-style dataset for DataLoader worker processes, over ``ChunkRead`` items:
    item -> ``(uint8 tensor (b, S, S, 3), positions read, positions failed)``, or None
    for a job with nothing to read. A worker keeps its current job's slide open and opens
    the next job's when its first item comes (a worker gets items in the jobs' order)."""

    def __init__(self, interpolation: str = "bilinear") -> None:
        self.interpolation = interpolation
        self._slot: int | None = None
        self._reader: BatchReader | None = None

    def __getitem__(self, item: ChunkRead):
        import torch

        if item.grid is None:
            return None
        if item.slot != self._slot or self._reader is None:
            self.close()
            self._reader = BatchReader(item.grid, interpolation=self.interpolation)
            self._slot = item.slot
        pixels, ok, failed = self._reader.read_at(item.positions, item.coords)
        return torch.from_numpy(pixels), ok, failed

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def as_is(item: Any) -> Any:
    """DataLoader's ``collate_fn`` for items already batched (``ChunkReader``'s)."""
    return item
