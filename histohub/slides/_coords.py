"""Patches another tool chose: a CLAM or TRIDENT coordinates h5 -> a ``TileGrid`` of exactly
those patches, so histohub's features line up with that tool's.

CLAM (``create_patches_fp.py``) writes ``coords`` (N, 2) level-0 top-left corners with
attributes ``patch_size`` and ``patch_level`` (and ``downsample``); TRIDENT writes
``coords`` with ``patch_size_level0`` and ``level0_width``/``level0_height``. histohub's
own feature files carry ``patch_size_level0`` too. The patch side in level-0 px is
``patch_size_level0``, else ``patch_size`` times ``downsample`` at ``patch_level``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from histohub.errors import RoiError, require

log = logging.getLogger(__name__)

COORDS_SUFFIXES = (".h5", ".hdf5")


def find_coords(coords: str | os.PathLike, slide: str | os.PathLike) -> Path:
    """``coords`` itself, or ``<coords>/<slide stem>.h5`` (also ``<stem>_patches.h5``)."""
    coords, stem = Path(coords), Path(slide).stem
    if coords.is_file():
        return coords
    if coords.is_dir():
        for name in (stem, f"{stem}_patches"):
            for suffix in COORDS_SUFFIXES:
                if (coords / f"{name}{suffix}").is_file():
                    return coords / f"{name}{suffix}"
        raise RoiError(f"{coords}: no {stem}.h5 for the slide {Path(slide).name}")
    raise RoiError(f"--coords {coords}: no such file or folder")


def read_coords(path: str | os.PathLike, *, slide_size: tuple[int, int]
                ) -> tuple[np.ndarray, int, str]:
    """``(coords (N, 2) int64, patch side in level-0 px, sha256 of both)`` from an h5.

    Raises:
        RoiError: no ``coords`` (N, 2) dataset or patch size, or patches that fall outside
            a slide of ``slide_size`` (coordinates of another slide).
    """
    h5py = require("h5py", extra="wsi", purpose="Reading a coordinates file (--coords)")
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise RoiError(f"{path}: no 'coords' dataset (a CLAM or TRIDENT patch file "
                               "has one)")
            dataset = f["coords"]
            coords = np.asarray(dataset[()])
            attrs = {**dict(f.attrs), **dict(dataset.attrs)}
    except OSError as error:
        raise RoiError(f"{path}: not a readable HDF5 file ({error})") from None
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.number):
        raise RoiError(f"{path}: 'coords' has shape {coords.shape}; expected (N, 2)")
    size0 = _patch_size_level0(path, attrs)
    coords = coords.astype(np.int64)
    _check_slide(path, attrs, coords, size0, slide_size)
    digest = hashlib.sha256(coords.tobytes() + str(size0).encode()).hexdigest()
    return coords, size0, digest


def _patch_size_level0(path: Path, attrs: dict) -> int:
    if "patch_size_level0" in attrs:
        size0 = float(np.asarray(attrs["patch_size_level0"]).ravel()[0])
    elif "patch_size" in attrs:
        downsample = np.asarray(attrs.get("downsample", 1.0), np.float64).ravel()
        size0 = float(np.asarray(attrs["patch_size"]).ravel()[0]) * float(downsample[0])
    else:
        raise RoiError(f"{path}: 'coords' has no patch_size_level0 or patch_size attribute; "
                       "cannot tell how large its patches are")
    if not size0 >= 1:
        raise RoiError(f"{path}: patch size {size0:g} px is not a size")
    return int(round(size0))


def _check_slide(path: Path, attrs: dict, coords: np.ndarray, size0: int,
                 slide_size: tuple[int, int]) -> None:
    width, height = slide_size
    made_for = (attrs.get("level0_width"), attrs.get("level0_height"))
    if None not in made_for and (int(made_for[0]), int(made_for[1])) != (width, height):
        raise RoiError(f"{path}: made for a slide of {int(made_for[0])} x {int(made_for[1])} "
                       f"px, this one is {width} x {height}: coordinates of another slide?")
    if len(coords) == 0:
        raise RoiError(f"{path}: 'coords' is empty; nothing to extract")
    outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] + size0 > width) | (
        coords[:, 1] + size0 > height)
    if outside.any():
        x, y = coords[outside][0].tolist()
        raise RoiError(f"{path}: {int(outside.sum())} of {len(coords)} patches ({size0} px) "
                       f"reach outside the slide ({width} x {height} px), e.g. at ({x}, {y}): "
                       "coordinates of another slide?")


def coords_grid(slide, coords: np.ndarray, size0: int, *, patch_size: int, method: str,
                mpp_override: float | None = None):
    """A ``TileGrid`` of exactly ``coords`` (level-0 (N, 2)), each ``size0`` level-0 px read
    and resized to ``patch_size`` px; the tissue mask (``method``) only measures each
    patch's ``foreground``. Its ``target_mpp`` is what ``size0`` makes of the slide's."""
    from histohub.slides._tiling import _box_fractions, _slide_mpp, tile_grid

    slide_mpp, _ = _slide_mpp(slide, mpp_override)
    target = slide_mpp * size0 / patch_size
    grid = tile_grid(slide, target_mpp=target, patch_size=patch_size, min_foreground=0.0,
                     method=method, mpp_override=mpp_override)
    fractions = _box_fractions(grid.mask, coords, size0, grid.mask_downsample)
    return replace(grid, coords=np.ascontiguousarray(coords, np.int64),
                   foreground=fractions.astype(np.float32), patch_size_level0=size0,
                   min_foreground=0.0)
