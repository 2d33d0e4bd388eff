"""HDF5 feature files in the layout CLAM and TRIDENT users read: the layout, its attributes,
and reading it (``histohub.featurefile._writer.FeatureWriter`` writes it, batch by batch).

Layout of ``<slide stem>.h5`` (one file per slide)::

    /features          float32 (N, D)  one row per patch (D = the model's feature_dim)
    /coords            int64   (N, 2)  level-0 (x, y) of each patch's top-left corner,
                                       row i of coords is row i of features
        attrs (as CLAM / TRIDENT write them on coords):
            patch_size          px read at patch_level (CLAM's meaning)
            patch_level         pyramid level read
            patch_size_level0   level-0 px one patch covers (TRIDENT's name)
            target_mpp          um/px of the patches fed to the model
    /failed_coords     int64   (M, 2)  patches that could not be read or decoded: skipped
    /nonfinite_coords  int64   (K, 2)  patches whose features held NaN or inf: reported and
                                       kept out of /features

    root attrs (the file describes itself):
        format = "histohub-features", format_version = 1, histohub_version
        completed          True once every patch of the grid was processed
        model_name, model_sha256 ("" when unknown), arch, feature_dim
        slide_path, slide_name, slide_width, slide_height (level 0): the path and name
            the slide was given, a link's own (``histohub.slides._names``)
        slide_resolved_path  only when asked for: the file behind the links
        slide_mpp, mpp_source ("openslide.mpp", "tiff.resolution" or "user")
        target_mpp, patch_size (px fed to the model), level, level_downsample,
        read_size (px read at level), patch_size_level0
        mask_method ("contours", "hsv" or "otsu"), min_foreground, n_grid (patches in the grid
        written), roi and coords_from (sha256 of the --roi region, of the --coords file; ""),
        grid_sha256 (of the grid's coords: identifies the grid for resuming)
        n_tissue (patches with tissue), max_patches (0: no limit), truncated (n_grid < n_tissue)
        model_fingerprint  sha256 of the model's weights (its state dict), whatever their source
        norm_mean, norm_std, interpolation   the preprocessing
        slide_size, slide_fingerprint        bytes, and sha256 of the size, first and last MiB
        n_patches, n_failed, n_nonfinite
        next_index         grid positions processed so far (the resume point)

A file being written is ``<name>.h5.partial`` (``partial_path``) until it is complete.
``is_disk_full`` / ``disk_full_error`` turn a full disk, however HDF5 reports it, into one
``DiskFullError``.

The attributes are built here (``feature_attrs``, ``coords_attrs``) and compared with a new
request here (``find_done``): a complete file counts as done only for the same
``REQUEST_ATTRS`` (slide contents, model weights, preprocessing, tiling).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histohub._version import __version__
from histohub.errors import (DiskFullError, FeatureFileError, OutputExistsError, existing_file,
                             require)

if TYPE_CHECKING:
    from histohub.slides._tiling import TileGrid

log = logging.getLogger(__name__)

FORMAT = "histohub-features"
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
#: Attributes that must agree for a partial file to be resumed (else it is started over).
IDENTITY_ATTRS = ("format_version", "model_name", "model_sha256", "arch", "feature_dim",
                  "slide_width", "slide_height", "slide_mpp", "target_mpp", "patch_size",
                  "level", "read_size", "patch_size_level0", "mask_method", "min_foreground",
                  "n_grid", "grid_sha256", "model_fingerprint", "norm_mean", "norm_std",
                  "interpolation", "slide_size", "slide_fingerprint")
#: The attributes naming the slide: the call that writes a file names it, also on resume.
NAME_ATTRS = ("slide_path", "slide_name", "slide_resolved_path")
MODEL_ATTRS = ("model_name", "arch", "model_fingerprint", "norm_mean", "norm_std",
               "interpolation")
SLIDE_ATTRS = ("slide_size", "slide_fingerprint", "slide_width", "slide_height")
#: What a complete feature file must share with a request to count as done for it.
REQUEST_ATTRS = (*MODEL_ATTRS, *SLIDE_ATTRS, "slide_mpp", "target_mpp", "patch_size",
                 "mask_method", "min_foreground", "roi", "coords_from")
#: Request attributes added since format 1; a file without them was made without them.
_ADDED_REQUEST_ATTRS = {"roi": "", "coords_from": ""}
_COORD_DATASETS = ("coords", "failed_coords", "nonfinite_coords")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _h5py():
    return require("h5py", extra="wsi", purpose="Writing features to HDF5")



def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` is a finished histohub feature file."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with _h5py().File(path, "r") as f:
            return bool(f.attrs.get("completed", False)) and f.attrs.get("format") == FORMAT
    except OSError:
        return False


def read_attrs(path: str | os.PathLike) -> dict[str, Any] | None:
    """The root attributes of a histohub feature file, or None when ``path`` is anything
    else (another tool's HDF5, not HDF5, unreadable)."""
    try:
        with _h5py().File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                return None
            return {k: _plain(v) for k, v in f.attrs.items()}
    except (OSError, RuntimeError):
        return None


def foreign(path: str | os.PathLike) -> bool:
    """True when ``path`` exists and histohub did not write it, so it must not be replaced.

    A final ``.h5`` counts as histohub's only when it carries histohub's attributes. A
    ``.partial`` is histohub's unless it is a readable HDF5 file without them: one left
    unreadable by a crash or a full disk is histohub's own, to be discarded.
    """
    path = Path(path)
    if not path.exists():
        return False
    if read_attrs(path) is not None:
        return False
    if not path.name.endswith(PARTIAL_SUFFIX):
        return True
    try:
        with _h5py().File(path, "r"):
            return True  # readable, not ours
    except (OSError, RuntimeError):
        return False


def same_value(a: Any, b: Any) -> bool:
    """Attribute equality that also compares arrays (h5py returns arrays for sequences)."""
    if isinstance(a, (np.ndarray, list, tuple)) or isinstance(b, (np.ndarray, list, tuple)):
        if a is None or b is None:
            return False
        return np.asarray(a).shape == np.asarray(b).shape and bool(np.all(np.asarray(a) ==
                                                                            np.asarray(b)))
    return a == b


def is_disk_full(error: BaseException) -> bool:
    """True for "no space left on device" / "disk quota exceeded", also as HDF5 reports
    them (a RuntimeError or an OSError whose message holds ``errno = 28``)."""
    if getattr(error, "errno", None) in _DISK_FULL:
        return True
    text = str(error)
    return any(f"errno = {number}," in text or os.strerror(number) in text
               for number in _DISK_FULL)


def disk_full_error(path: Path, error: BaseException) -> DiskFullError:
    """A one-line ``DiskFullError`` for a write under ``path``'s folder that failed."""
    message = (f"no space left on device at {path.parent} (writing {path.name}); its "
               "unfinished file was removed. Free some space or choose another output folder, "
               "then run again: finished slides are kept")
    full = DiskFullError(message)
    full.errno = getattr(error, "errno", None) or errno.ENOSPC
    return full


# --------------------------------------------------------------------------- attributes

def grid_sha256(coords: np.ndarray) -> str:
    """sha256 of a grid's int64 ``(N, 2)`` coords: identifies the grid for resuming."""
    return hashlib.sha256(np.ascontiguousarray(coords, np.int64).tobytes()).hexdigest()


def feature_attrs(request: dict[str, Any], grid: TileGrid, *, names: dict[str, str],
                  model_sha256: str, feature_dim: int, n_tissue: int, max_patches: int | None
                  ) -> dict[str, Any]:
    """The root attributes of a feature file (module docstring) for ``request`` (its
    ``REQUEST_ATTRS``), the slide's ``names`` (its ``NAME_ATTRS``, as the slides wing
    gives them: ``slides._outputs.name_attrs``) and the ``grid`` written (possibly the first
    ``max_patches`` of ``n_tissue`` patches)."""
    return {
        **request, "histohub_version": __version__, "model_sha256": model_sha256,
        "feature_dim": feature_dim, **names,
        "slide_width": grid.slide_dimensions[0], "slide_height": grid.slide_dimensions[1],
        "slide_mpp": grid.slide_mpp, "mpp_source": grid.mpp_source,
        "target_mpp": grid.target_mpp, "patch_size": grid.patch_size, "level": grid.level,
        "level_downsample": grid.level_downsample, "read_size": grid.read_size,
        "patch_size_level0": grid.patch_size_level0, "mask_method": grid.mask_method,
        "min_foreground": grid.min_foreground, "n_grid": len(grid),
        "grid_sha256": grid_sha256(grid.coords), "n_tissue": n_tissue,
        "max_patches": max_patches or 0, "truncated": len(grid) < n_tissue,
    }


def coords_attrs(grid: TileGrid) -> dict[str, Any]:
    """The attributes CLAM and TRIDENT put on ``coords``."""
    return {"patch_size": grid.read_size, "patch_level": grid.level,
            "patch_size_level0": grid.patch_size_level0, "target_mpp": grid.target_mpp,
            "level_dim": np.asarray(grid.slide_dimensions, np.int64)}


def refuse_foreign(path: str | os.PathLike) -> None:
    """``OutputExistsError`` when ``path`` or its partial file is not histohub's."""
    for candidate in (Path(path), partial_path(path)):
        if foreign(candidate):
            raise OutputExistsError(
                f"{candidate} exists and was not written by histohub; it is left as is. Pass "
                "--overwrite (overwrite=True) to replace it, or choose another output folder")


def find_done(path: str | os.PathLike, request: dict[str, Any], *, max_patches: int | None,
              say_trial: bool = True) -> dict[str, Any] | None:
    """The attributes of ``path`` when it is complete and made for ``request`` (reuse it);
    None when it is to be made (absent, unfinished, or a shorter ``max_patches`` trial,
    which a warning says unless not ``say_trial``: said once per slide);
    ``OutputExistsError`` when replacing it would lose features of another request."""
    path = Path(path)
    attrs = read_attrs(path) if path.exists() else None
    if attrs is None or not attrs.get("completed"):
        return None
    keep = "it is kept. Pass --overwrite (overwrite=True) to replace it, or choose another " \
           "output folder"
    attrs = {**_ADDED_REQUEST_ATTRS, **attrs}
    missing = [k for k in (*REQUEST_ATTRS, "n_tissue") if k not in attrs]
    if missing:
        raise OutputExistsError(
            f"{path} was made by histohub {attrs.get('histohub_version', '?')}, which did not "
            f"record {', '.join(missing)}, so whether it matches this request is unknown; {keep}")
    differing = [k for k in REQUEST_ATTRS if not same_value(attrs[k], request[k])]
    if differing:
        raise OutputExistsError(f"{path} holds features made for another request "
                                f"({_differences(attrs, request, differing)}); {keep}")
    have, total = int(attrs["n_grid"]), int(attrs["n_tissue"])
    want = total if max_patches is None else min(max_patches, total)
    if want > have:
        if say_trial:
            log.warning("%s: a trial of %d of %d patches (max_patches=%d); extracting %d now",
                        path, have, total, attrs.get("max_patches", 0), want)
        return None
    if want < have:
        raise OutputExistsError(f"{path} holds {have} patches of this slide, more than the "
                                f"{want} asked for (max_patches={max_patches}); {keep}")
    return attrs


def _differences(attrs: dict[str, Any], request: dict[str, Any], keys: list[str]) -> str:
    """``another slide (slide_size, slide_fingerprint differ; the file's: /a/s.svs);
    min_foreground 0.5 in the file, 0.2 now``."""
    parts = []
    for what, group, source in (("another slide", SLIDE_ATTRS, "slide_path"),
                                ("another model", MODEL_ATTRS, "model_name")):
        if differing := [k for k in keys if k in group]:
            parts.append(f"{what} ({', '.join(differing)} differ; the file's: "
                         f"{attrs.get(source)})")
    parts += [f"{k} {_short(attrs[k])} in the file, {_short(request[k])} now" for k in keys
              if k not in SLIDE_ATTRS + MODEL_ATTRS]
    return "; ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) > 16:
        return value[:12] + "..."
    if isinstance(value, (np.ndarray, tuple, list)):
        return str([round(float(v), 4) for v in value])
    return repr(value)


# --------------------------------------------------------------------------- reading

def read_features(path: str | os.PathLike) -> dict[str, Any]:
    """Everything in a feature file: ``features`` (N, D), ``coords`` (N, 2), the failed and
    non-finite coords, and ``attrs`` (a dict)."""
    with _h5py().File(path, "r") as f:
        out = {name: f[name][()] for name in ("features", *_COORD_DATASETS) if name in f}
        out["attrs"] = {k: _plain(v) for k, v in f.attrs.items()}
    return out


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` holds the CLAM/TRIDENT layout (written by histohub or another
    tool): ``features`` (N, D) floating point with D >= 1, ``coords`` (N, 2) numbers.

    Returns ``{"n": N, "dim": D, "attrs": {...}, "coords_attrs": {...}}`` (root and
    ``coords`` attributes as plain values); no features are read. Raises
    ``InputNotFoundError`` for a missing path or a folder, ``FeatureFileError`` naming the
    problem for anything else.
    """
    h5py = _h5py()
    path = existing_file(path, what="feature",
                         folder_hint="give the .h5 files in it (the command line takes "
                                     "folders and globs)")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise FeatureFileError(
            f"{str(path)!r} is not an HDF5 file ({error}). Pass the .h5 files written by "
            "`histohub extract` (datasets 'features' and 'coords').") from error
    with handle:
        missing = [name for name in ("features", "coords") if name not in handle]
        if missing:
            raise FeatureFileError(
                f"{str(path)!r} has no dataset {' or '.join(repr(m) for m in missing)} "
                f"(it holds: {', '.join(sorted(handle.keys())) or 'nothing'}). Expected the "
                "CLAM/TRIDENT layout `histohub extract` writes: 'features' (N, D), "
                "'coords' (N, 2).")
        features, coords = handle["features"], handle["coords"]
        for name, item in (("features", features), ("coords", coords)):
            if not isinstance(item, h5py.Dataset):
                raise FeatureFileError(f"{str(path)!r}: {name!r} must be a dataset, got a "
                                       f"{type(item).__name__}.")
        if features.ndim != 2:
            raise FeatureFileError(
                f"{str(path)!r}: 'features' must be 2-D (N, D), got shape {features.shape}.")
        if features.shape[1] == 0:
            raise FeatureFileError(f"{str(path)!r}: 'features' has no features per patch "
                                   f"(shape {features.shape}).")
        if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != features.shape[0]:
            raise FeatureFileError(
                f"{str(path)!r}: 'coords' must have shape ({features.shape[0]}, 2) to match "
                f"'features' {features.shape}, got {coords.shape}.")
        if not np.issubdtype(features.dtype, np.floating):
            raise FeatureFileError(
                f"{str(path)!r}: 'features' must be floating point, got {features.dtype}.")
        if not np.issubdtype(coords.dtype, np.number):
            raise FeatureFileError(
                f"{str(path)!r}: 'coords' must be numbers (level-0 x, y), got {coords.dtype}.")
        for name, item in (("features", features), ("coords", coords)):
            _check_backed(path, name, item)
        return {"n": int(features.shape[0]), "dim": int(features.shape[1]),
                "attrs": {k: _plain(v) for k, v in handle.attrs.items()},
                "coords_attrs": {k: _plain(v) for k, v in coords.attrs.items()}}


#: The most a filter shrinks data (deflate's limit is about 1032:1): a compressed dataset
#: declaring more than this many times its stored bytes holds chunks never written.
MAX_COMPRESSION = 1100


def _check_backed(path: Path, name: str, dataset) -> None:
    """``FeatureFileError`` unless the file holds the bytes ``dataset``'s shape declares
    (all of them uncompressed, ``1 / MAX_COMPRESSION`` of them compressed): a shape of
    (1e9, 1e6) over a few kB of file would be read (fill values) for ever."""
    declared = int(np.prod(dataset.shape, dtype=object)) * dataset.dtype.itemsize
    stored = dataset.id.get_storage_size()
    compressed = bool(dataset.compression or dataset.scaleoffset is not None)
    if declared > (stored * MAX_COMPRESSION if compressed else stored):
        raise FeatureFileError(
            f"{str(path)!r}: {name!r} declares shape {tuple(dataset.shape)} {dataset.dtype} "
            f"({declared} bytes) but the file holds {stored} bytes of it "
            f"({path.stat().st_size}-byte file): damaged or crafted; extract it again.")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
