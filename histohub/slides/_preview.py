"""A tile grid shown: ``preview`` draws the tissue mask and the kept patches over a
thumbnail (a PNG, PIL only); ``grid_summary`` describes the grid in one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from histohub.files import atomic_path
from histohub.slides._reader import Slide
from histohub.slides._tiling import TileGrid


def preview(slide: Slide, grid: TileGrid, path: str | os.PathLike, *, max_side: int = 1200
            ) -> Path:
    """Write a PNG: thumbnail, tissue mask tinted green, kept patches outlined in blue.

    Returns the path written. Uses PIL only.
    """
    from PIL import Image, ImageDraw

    width, height = slide.dimensions
    downsample = max(1.0, max(width, height) / max_side)
    thumb = slide.thumbnail(downsample)
    mask = np.asarray(Image.fromarray(grid.mask).resize((thumb.shape[1], thumb.shape[0]),
                                                        Image.Resampling.NEAREST))
    tinted = thumb.astype(np.float32)
    tinted[mask] = 0.55 * tinted[mask] + 0.45 * np.array([40, 200, 60], np.float32)
    image = Image.fromarray(tinted.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    side = grid.patch_size_level0 / downsample
    for x, y in grid.coords:
        x0, y0 = x / downsample, y / downsample
        draw.rectangle([x0, y0, x0 + side, y0 + side], outline=(30, 60, 220), width=1)
    path = Path(path)
    with atomic_path(path, mkdir=False) as temporary:
        image.save(temporary, format="PNG")
    return path


def grid_summary(grid: TileGrid) -> str:
    """One line describing a grid, for logs."""
    return (f"{len(grid)} of {grid.n_candidates} patches with >= {grid.min_foreground:.0%} "
            f"tissue ({grid.mask_method}); level {grid.level} (x{grid.level_downsample:g}), "
            f"read {grid.read_size} px -> {grid.patch_size} px at {grid.target_mpp:g} um/px "
            f"(slide {grid.slide_mpp:.4g} um/px from {grid.mpp_source})")
