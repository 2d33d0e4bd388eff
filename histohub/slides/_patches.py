"""Slides' tissue patches as uint8 batches, read ahead by histohub's readers, for a model
histohub does not run (your own, on your GPU, with your own preprocessing) or to look at
the patches: ``extract_slide``'s reading without its model and its feature file.

>>> for batch in histohub.slide_patches("slide.svs", target_mpp=0.5):  # doctest: +SKIP
...     x = batch.pixels.cuda(non_blocking=True).permute(0, 3, 1, 2).float() / 255
...     features.append(my_model(normalize(x)).cpu())
...     coords.append(batch.coords)

``cohort_patches(slides)`` does the same for many slides in one stream, each slide tiled
while the one before is read (as ``SlideExtractor.extract_many`` does): slide after slide,
the tiling is off the readers' path. Slides are tiled as ``extract_slide`` tiles them
(``histohub.slides._tiling.tile_grid``), and read by ``read_threads`` threads or ``num_workers``
DataLoader processes (``histohub.slides._stream``) while the caller works on earlier batches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histohub.errors import HistohubError, OptionError
from histohub._features import check_options
from histohub.slides._preview import grid_summary
from histohub.slides._batches import batch_ranges, pinned
from histohub.slides._stream import Schedule, reader_stream, worker_stream
from histohub.slides._reader import Slide, open_slide
from histohub.slides._tiling import TileGrid, tile_grid
from histohub.slides._tissue import DEFAULT_MASK

log = logging.getLogger(__name__)


@dataclass
class PatchBatch:
    """One batch of a slide's tissue patches, in grid order.

    ``pixels``: uint8 ``(b, S, S, 3)`` (pinned when asked). ``coords``: int64 ``(b, 2)``,
    level-0 ``(x, y)`` of each patch's top-left corner. ``failed``: int64 ``(f, 2)``, the
    patches of this batch whose tiles could not be decoded (logged; not in ``pixels``).
    ``slide``: the slide they come from; ``last``: whether this is its last batch.
    """

    pixels: torch.Tensor
    coords: np.ndarray
    failed: np.ndarray
    slide: Path
    last: bool


def slide_patches(slide_path: str | os.PathLike, *, target_mpp: float,
                  mpp: float | None = None, patch_size: int = 224, batch_size: int = 64,
                  read_threads: int = 1, num_workers: int = 0, mask: str = DEFAULT_MASK,
                  min_foreground: float = 0.5, interpolation: str = "bilinear",
                  pin_memory: bool = False) -> Iterator[PatchBatch]:
    """The tissue patches of a slide, ``patch_size`` px at ``target_mpp`` um/px with at
    least ``min_foreground`` tissue (``mask``: 'contours', the default; 'hsv', the paper's
    rule; or 'otsu'), as
    ``PatchBatch``es of up to ``batch_size``, read ahead by ``read_threads`` reader threads
    or ``num_workers`` DataLoader worker processes. ``mpp``: the slide's um/px when the file
    lacks it. ``pin_memory``: page-locked batches, for ``non_blocking`` copies to a GPU.

    Options are checked when called (``OptionError``), the slide when iteration starts
    (``SlideError``). Stopping early (``break``, ``close()``) stops the readers.
    """
    return cohort_patches([slide_path], target_mpp=target_mpp, mpp=mpp, patch_size=patch_size,
                          batch_size=batch_size, read_threads=read_threads,
                          num_workers=num_workers, mask=mask, min_foreground=min_foreground,
                          interpolation=interpolation, pin_memory=pin_memory)


def cohort_patches(slide_paths: Iterable[str | os.PathLike], *, target_mpp: float,
                   mpp: float | None = None, patch_size: int = 224, batch_size: int = 64,
                   read_threads: int = 1, num_workers: int = 0, mask: str = DEFAULT_MASK,
                   min_foreground: float = 0.5, interpolation: str = "bilinear",
                   pin_memory: bool = False, skip_unreadable: bool = False
                   ) -> Iterator[PatchBatch]:
    """``slide_patches`` for many slides, one stream in their order: each slide is tiled
    (in a background thread) while the one before is read, and a batch never mixes slides
    (``PatchBatch.slide``, ``.last``). ``mpp`` applies to every slide.

    A slide that cannot be opened or tiled (not a slide, no mpp) raises its ``SlideError``
    when its turn comes, or with ``skip_unreadable=True`` is logged and skipped. A slide
    with no tissue patch gives no batch (and a warning).
    """
    if isinstance(slide_paths, (str, os.PathLike)):
        raise OptionError("cohort_patches takes a list of slides; for one slide use "
                          "histohub.slide_patches(path, ...)")
    paths = [Path(p) for p in slide_paths]
    check_options(batch_size=batch_size, num_workers=num_workers, read_threads=read_threads,
                  mpp=mpp, target_mpp=target_mpp, mask=mask, min_foreground=min_foreground,
                  patch_size=patch_size, interpolation=interpolation)
    if pin_memory and not torch.cuda.is_available():
        raise OptionError("pin_memory=True: page-locked memory is for copies to a CUDA GPU, "
                          "and torch sees none; leave it False on a CPU")
    tiling = dict(target_mpp=target_mpp, patch_size=patch_size, min_foreground=min_foreground,
                  method=mask, mpp_override=mpp)
    return _batches(paths, tiling, batch_size=batch_size, read_threads=read_threads,
                    num_workers=num_workers, interpolation=interpolation,
                    pin_memory=pin_memory, skip_unreadable=skip_unreadable)


@dataclass
class _TiledSlide:
    """A slide tiled and ready to read: its ``grid``, the ``ranges`` of grid positions to
    read as batches, and the handle that tiled it, for the first reader thread to take
    over (``take_slide``) or ``release`` to close."""

    path: Path
    grid: TileGrid
    ranges: list[range]
    slide: Slide | None

    def take_slide(self) -> Slide | None:
        slide, self.slide = self.slide, None
        return slide

    def release(self) -> None:
        slide = self.take_slide()
        if slide is not None:
            slide.close()


def _tile(path: Path, tiling: dict, batch_size: int) -> _TiledSlide:
    slide = open_slide(path)
    try:
        grid = tile_grid(slide, **tiling)
    except BaseException:
        slide.close()
        raise
    log.info("%s: %s", path.name, grid_summary(grid))
    return _TiledSlide(path, grid, batch_ranges(0, len(grid), batch_size), slide)


def _batches(paths: list[Path], tiling: dict, *, batch_size: int, read_threads: int,
             num_workers: int, interpolation: str, pin_memory: bool, skip_unreadable: bool
             ) -> Iterator[PatchBatch]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histohub-tiling")
    schedule = Schedule(pool, paths, lambda path: _tile(path, tiling, batch_size),
                        release=_TiledSlide.release)
    if num_workers > 0:
        stream = worker_stream(schedule, num_workers=num_workers, interpolation=interpolation,
                               pin_memory=pin_memory)
    else:
        stream = reader_stream(schedule, threads=read_threads, interpolation=interpolation,
                               allocate=pinned if pin_memory else None)
    try:
        for batch in stream:
            unit = batch.unit
            if isinstance(unit, HistohubError):
                if not skip_unreadable:
                    raise unit
                log.warning("%s; skipped", unit)
            elif batch.positions is not None:
                grid = unit.grid
                yield PatchBatch(torch.as_tensor(batch.pixels), grid.coords[batch.ok],
                                 grid.coords[batch.failed], unit.path, batch.last)
            else:
                log.warning("%s: no patch has >= %.0f%% tissue (%s mask); no batches",
                            unit.path.name, 100 * tiling["min_foreground"], tiling["method"])
            if batch.last:
                schedule.finished(batch.slot)
    finally:
        stream.close()
        schedule.close()
        pool.shutdown(wait=True)
