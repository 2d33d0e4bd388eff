"""Tiling a slide: the patches of ``patch_size`` px at the model's microns per pixel that
hold enough tissue.

``tile_grid(slide, target_mpp=...)`` lays non-overlapping patches of ``patch_size`` px at
``target_mpp`` over the slide and keeps those whose foreground fraction (``_tissue``) is at
least ``min_foreground`` (Appendix B: 224 px, >= 50%). Memory stays bounded on any slide
size: the thumbnail used for the mask is read block by block and never exceeds
``MASK_MAX_SIDE`` pixels a side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from histohub.errors import SlideError, check_option
from histohub.slides._reader import MPP_RANGE, Slide
from histohub.slides._tissue import MASK_METHODS, tissue_mask

log = logging.getLogger(__name__)

#: The mask thumbnail's longest side is at most this many pixels (bounds memory).
MASK_MAX_SIDE = 4096
#: Mask pixels per patch side aimed for (finer is not needed for a foreground fraction).
MASK_PIXELS_PER_PATCH = 32
#: A level whose mpp exceeds the target by at most this fraction still counts as "<= target"
#: (0.499 vs 0.5 um/px, or 0.2527 x 2 vs 0.5): resizing by 1% only blurs.
_MPP_TOLERANCE = 0.02


@dataclass(frozen=True)
class TileGrid:
    """The patches to read from one slide, in row-major order (deterministic).

    ``coords``: int64 ``(N, 2)`` level-0 (x, y) of each patch's top-left corner.
    ``foreground``: float32 ``(N,)`` foreground fraction of each kept patch.
    Each patch covers ``patch_size_level0`` level-0 px; it is read as ``read_size`` px at
    pyramid ``level`` and resized to ``patch_size`` px (so it is at ``target_mpp``).
    ``mask`` is the tissue mask at ``mask_downsample`` level-0 px per mask px.
    """

    slide_path: str
    slide_dimensions: tuple[int, int]
    slide_mpp: float
    mpp_source: str
    target_mpp: float
    patch_size: int
    patch_size_level0: int
    level: int
    level_downsample: float
    read_size: int
    coords: np.ndarray
    foreground: np.ndarray
    mask_method: str
    min_foreground: float
    mask: np.ndarray
    mask_downsample: float
    n_candidates: int
    roi: str = ""

    def __len__(self) -> int:
        return len(self.coords)


def choose_level(slide: Slide, slide_mpp: float, target_mpp: float) -> int:
    """The coarsest pyramid level whose mpp is at most ``target_mpp`` (read, then resize down).

    When even level 0 is coarser than the target, level 0 is used (patches are upsampled)
    and a warning says so.
    """
    best = 0
    for level, downsample in enumerate(slide.level_downsamples):
        if slide_mpp * downsample <= target_mpp * (1 + _MPP_TOLERANCE):
            best = level if downsample > slide.level_downsamples[best] else best
    if slide_mpp > target_mpp * (1 + _MPP_TOLERANCE):
        log.warning("%s: scanned at %.3f um/px, coarser than the %.3f um/px the model expects; "
                    "patches are upsampled", slide.path.name, slide_mpp, target_mpp)
    return best


def tile_grid(slide: Slide, *, target_mpp: float, patch_size: int = 224,
              min_foreground: float = 0.5, method: str = "hsv",
              mpp_override: float | None = None, roi=None) -> TileGrid:
    """Non-overlapping ``patch_size`` px patches at ``target_mpp`` with enough tissue.

    ``mpp_override`` replaces the slide's microns per pixel (needed when the file has none).
    ``method``: one of ``histohub.slides.MASK_METHODS``; "hsv" (the paper's rule, which
    training samples with) unless given: extraction passes ``_tissue.DEFAULT_MASK``.
    ``roi``: a ``_qupath.Roi``; only tissue inside it counts (``TileGrid.roi``: its digest).
    Raises ``SlideError`` when the mpp is unknown.
    """
    check_option("target_mpp", target_mpp, low=MPP_RANGE[0], high=MPP_RANGE[1])
    check_option("patch_size", patch_size, integer=True, low=1)
    check_option("min_foreground", min_foreground, low=0, high=1)
    check_option("method", method, choices=MASK_METHODS)
    check_option("mpp_override", mpp_override, low=MPP_RANGE[0], high=MPP_RANGE[1],
                 optional=True)
    slide_mpp, source = _slide_mpp(slide, mpp_override)
    level = choose_level(slide, slide_mpp, target_mpp)
    level_ds = slide.level_downsamples[level]
    size0 = max(1, round(patch_size * target_mpp / slide_mpp))
    read_size = max(1, round(size0 / level_ds))
    width, height = slide.dimensions
    mask_ds = max(1.0, size0 / MASK_PIXELS_PER_PATCH, max(width, height) / MASK_MAX_SIDE)
    mask = tissue_mask(slide.thumbnail(mask_ds), method, mpp=slide_mpp * mask_ds)
    if roi is not None:
        mask &= roi.raster(mask.shape, mask_ds)
    ys, xs = np.mgrid[0:height // size0, 0:width // size0]
    candidates = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64) * size0
    fractions = _box_fractions(mask, candidates, size0, mask_ds)
    keep = fractions >= min_foreground if min_foreground > 0 else np.ones(len(fractions), bool)
    return TileGrid(
        slide_path=str(slide.path), slide_dimensions=tuple(slide.dimensions),
        slide_mpp=slide_mpp, mpp_source=source, target_mpp=float(target_mpp),
        patch_size=patch_size, patch_size_level0=size0, level=level,
        level_downsample=float(level_ds), read_size=read_size, coords=candidates[keep],
        foreground=fractions[keep].astype(np.float32), mask_method=method,
        min_foreground=float(min_foreground), mask=mask, mask_downsample=float(mask_ds),
        n_candidates=len(candidates), roi=roi.digest if roi is not None else "")


def _slide_mpp(slide: Slide, mpp_override: float | None) -> tuple[float, str]:
    if mpp_override is not None:
        if slide.mpp is not None and abs(slide.mpp - mpp_override) > 0.1 * slide.mpp:
            log.warning("%s: using mpp=%.4f given by the user; the slide says %.4f",
                        slide.path.name, mpp_override, slide.mpp)
        return float(mpp_override), "user"
    if slide.mpp is None:
        raise SlideError(
            f"{slide.path} does not record its microns per pixel, so patches cannot be cut at "
            "the model's resolution. Pass it yourself: --mpp 0.25 (40x) or --mpp 0.5 (20x) on "
            "the command line, mpp= in Python; check the scanner's report for the exact value.")
    return slide.mpp, slide.mpp_source or "slide"


def _box_fractions(mask: np.ndarray, coords: np.ndarray, size0: int, mask_ds: float
                   ) -> np.ndarray:
    """Fraction of True mask pixels under each level-0 box ``(x, y, size0, size0)``."""
    if len(coords) == 0:
        return np.zeros(0, np.float64)
    # int32 holds any count (the mask is at most MASK_MAX_SIDE a side); rows summed first,
    # then down the columns in place: half the time of two int64 passes
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int32)
    np.cumsum(mask, 1, dtype=np.int32, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], 0, out=integral[1:, 1:])
    x0 = np.clip(np.round(coords[:, 0] / mask_ds).astype(np.int64), 0, mask.shape[1])
    y0 = np.clip(np.round(coords[:, 1] / mask_ds).astype(np.int64), 0, mask.shape[0])
    x1 = np.clip(np.round((coords[:, 0] + size0) / mask_ds).astype(np.int64), 0, mask.shape[1])
    y1 = np.clip(np.round((coords[:, 1] + size0) / mask_ds).astype(np.int64), 0, mask.shape[0])
    x1, y1 = np.maximum(x1, x0 + 1).clip(max=mask.shape[1]), np.maximum(y1, y0 + 1).clip(
        max=mask.shape[0])
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return total / area
