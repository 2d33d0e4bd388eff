"""A slide's tissue patches as uint8 batches, read ahead by histohub's readers, for a model
histohub does not run (your own, on your GPU, with your own preprocessing) or to look at
the patches: ``extract_slide``'s reading without its model and its feature file.

>>> for batch in histohub.slide_patches("slide.svs", target_mpp=0.5):  # doctest: +SKIP
...     x = batch.pixels.cuda(non_blocking=True).permute(0, 3, 1, 2).float() / 255
...     features.append(my_model(normalize(x)).cpu())
...     coords.append(batch.coords)

The slide is tiled as ``extract_slide`` tiles it (``histohub.wsi.tile_grid``), and its
batches are read by ``read_threads`` threads or ``num_workers`` DataLoader processes
(``histohub.slide_stream``) while the caller works on the previous ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from .errors import OptionError
from .features import check_options
from .patch_batches import batch_ranges, pinned
from .slide_stream import Schedule, reader_stream, worker_stream
from .wsi import open_slide, tile_grid


@dataclass
class PatchBatch:
    """One batch of a slide's tissue patches, in grid order.

    ``pixels``: uint8 ``(b, S, S, 3)`` (pinned when asked). ``coords``: int64 ``(b, 2)``,
    level-0 ``(x, y)`` of each patch's top-left corner. ``failed``: int64 ``(f, 2)``, the
    patches of this batch whose tiles could not be decoded (logged; not in ``pixels``).
    """

    pixels: torch.Tensor
    coords: np.ndarray
    failed: np.ndarray


def slide_patches(slide_path: str | os.PathLike, *, target_mpp: float,
                  mpp: float | None = None, patch_size: int = 224, batch_size: int = 64,
                  read_threads: int = 1, num_workers: int = 0, mask: str = "hsv",
                  min_foreground: float = 0.5, interpolation: str = "bilinear",
                  pin_memory: bool = False) -> Iterator[PatchBatch]:
    """The tissue patches of a slide, ``patch_size`` px at ``target_mpp`` um/px with at
    least ``min_foreground`` tissue (``mask``: 'hsv', the paper's rule, or 'otsu'), as
    ``PatchBatch``es of up to ``batch_size``, read ahead by ``read_threads`` reader threads
    or ``num_workers`` DataLoader worker processes. ``mpp``: the slide's um/px when the file
    lacks it. ``pin_memory``: page-locked batches, for ``non_blocking`` copies to a GPU.

    Options are checked when called (``OptionError``), the slide when iteration starts
    (``SlideError``). Stopping early (``break``, ``close()``) stops the readers.
    """
    check_options(batch_size=batch_size, num_workers=num_workers, read_threads=read_threads,
                  mpp=mpp, target_mpp=target_mpp, mask=mask, min_foreground=min_foreground)
    if pin_memory and not torch.cuda.is_available():
        raise OptionError("pin_memory=True: page-locked memory is for copies to a CUDA GPU, "
                          "and torch sees none; leave it False on a CPU")
    return _batches(slide_path, dict(target_mpp=target_mpp, patch_size=patch_size,
                                     min_foreground=min_foreground, method=mask,
                                     mpp_override=mpp),
                    batch_size=batch_size, read_threads=read_threads, num_workers=num_workers,
                    interpolation=interpolation, pin_memory=pin_memory)


def _batches(slide_path: str | os.PathLike, tiling: dict, *, batch_size: int,
             read_threads: int, num_workers: int, interpolation: str, pin_memory: bool
             ) -> Iterator[PatchBatch]:
    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, **tiling)
    unit = SimpleNamespace(grid=grid, ranges=batch_ranges(0, len(grid), batch_size))
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histohub-patches")
    schedule = Schedule(pool, [unit], prepare=lambda job: job, release=lambda job: None)
    if num_workers > 0:
        stream = worker_stream(schedule, num_workers=num_workers, interpolation=interpolation,
                               pin_memory=pin_memory)
    else:
        stream = reader_stream(schedule, threads=read_threads, interpolation=interpolation,
                               allocate=pinned if pin_memory else None)
    try:
        for batch in stream:
            if batch.positions is not None:
                yield PatchBatch(torch.as_tensor(batch.pixels), grid.coords[batch.ok],
                                 grid.coords[batch.failed])
    finally:
        stream.close()
        schedule.close()
        pool.shutdown(wait=True)
