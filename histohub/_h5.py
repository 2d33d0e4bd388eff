"""HDF5 feature files in the layout CLAM and TRIDENT users read, written incrementally.

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
        slide_path, slide_name, slide_width, slide_height (level 0)
        slide_mpp, mpp_source ("openslide.mpp", "tiff.resolution" or "user")
        target_mpp, patch_size (px fed to the model), level, level_downsample,
        read_size (px read at level), patch_size_level0
        mask_method ("hsv" or "otsu"), min_foreground, n_grid (patches in the tissue grid),
        grid_sha256 (of the grid's coords: identifies the grid for resuming)
        n_patches, n_failed, n_nonfinite
        next_index         grid positions processed so far (the resume point)

Writing goes to ``<name>.h5.partial``; each batch is appended (resizable, chunked datasets),
the counters are updated, and the file is flushed. A killed run resumes from the counters
of the last flushed batch (rows past them are cut off), so no patch is lost or written
twice. On completion ``completed`` is set and the file is renamed to ``<name>.h5``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import require

log = logging.getLogger(__name__)

FORMAT = "histohub-features"
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
#: Attributes that must agree for a partial file to be resumed (else it is started over).
IDENTITY_ATTRS = ("format_version", "model_name", "model_sha256", "arch", "feature_dim",
                  "slide_width", "slide_height", "slide_mpp", "target_mpp", "patch_size",
                  "level", "read_size", "patch_size_level0", "mask_method", "min_foreground",
                  "n_grid", "grid_sha256")
_COORD_DATASETS = ("coords", "failed_coords", "nonfinite_coords")


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


def read_features(path: str | os.PathLike) -> dict[str, Any]:
    """Everything in a feature file: ``features`` (N, D), ``coords`` (N, 2), the failed and
    non-finite coords, and ``attrs`` (a dict)."""
    with _h5py().File(path, "r") as f:
        out = {name: f[name][()] for name in ("features", *_COORD_DATASETS) if name in f}
        out["attrs"] = {k: _plain(v) for k, v in f.attrs.items()}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


class FeatureWriter:
    """Appends batches of features to ``<path>.partial``; ``finish()`` renames it to ``path``.

    ``attrs``: the root attributes (see the module docstring); must include the
    ``IDENTITY_ATTRS``. With ``resume=True`` a matching partial file is continued from its
    last flushed batch: ``next_index`` tells the caller which grid position to start at.
    """

    def __init__(self, path: str | os.PathLike, *, attrs: dict[str, Any], feature_dim: int,
                 coords_attrs: dict[str, Any] | None = None, resume: bool = True,
                 chunk_rows: int = 256) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.feature_dim = feature_dim
        self._file = None
        if resume and self.partial.exists():
            self._file = self._reopen(attrs)
        if self._file is None:
            self._file = self._create(attrs, coords_attrs or {}, chunk_rows)

    # -- opening

    def _create(self, attrs: dict[str, Any], coords_attrs: dict[str, Any], chunk_rows: int):
        h5py = _h5py()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.partial, "w")
        f.create_dataset("features", shape=(0, self.feature_dim), maxshape=(None, self.feature_dim),
                         dtype=np.float32, chunks=(chunk_rows, self.feature_dim))
        for name in _COORD_DATASETS:
            f.create_dataset(name, shape=(0, 2), maxshape=(None, 2), dtype=np.int64,
                             chunks=(chunk_rows if name == "coords" else 64, 2))
        for key, value in coords_attrs.items():
            f["coords"].attrs[key] = value
        for key, value in {**attrs, "format": FORMAT, "format_version": FORMAT_VERSION,
                           "completed": False, "n_patches": 0, "n_failed": 0,
                           "n_nonfinite": 0, "next_index": 0}.items():
            f.attrs[key] = value
        f.flush()
        self.next_index = 0
        self.resumed = False
        return f

    def _reopen(self, attrs: dict[str, Any]):
        """Open a partial file to continue it, or None (deleted) when it cannot be resumed."""
        h5py = _h5py()
        try:
            f = h5py.File(self.partial, "a")
        except OSError as error:  # killed mid-write: the file is unreadable
            log.warning("%s cannot be read (%s); starting this slide over", self.partial, error)
            self.partial.unlink()
            return None
        expected = {**attrs, "format_version": FORMAT_VERSION}
        mismatched = [k for k in IDENTITY_ATTRS if _plain(f.attrs.get(k)) != expected.get(k)]
        if mismatched or f.attrs.get("format") != FORMAT:
            log.warning("%s was made with other settings (%s differ); starting over",
                        self.partial, ", ".join(mismatched) or "format")
            f.close()
            self.partial.unlink()
            return None
        counts = {"features": int(f.attrs["n_patches"]), "coords": int(f.attrs["n_patches"]),
                  "failed_coords": int(f.attrs["n_failed"]),
                  "nonfinite_coords": int(f.attrs["n_nonfinite"])}
        for name, rows in counts.items():  # cut rows written after the last flush
            if f[name].shape[0] != rows:
                f[name].resize(rows, axis=0)
        self.next_index = int(f.attrs["next_index"])
        self.resumed = True
        log.info("%s: resuming at patch %d (%d rows kept)", self.partial.name, self.next_index,
                 counts["features"])
        return f

    # -- writing

    @property
    def n_patches(self) -> int:
        return int(self._file.attrs["n_patches"])

    @property
    def n_failed(self) -> int:
        return int(self._file.attrs["n_failed"])

    @property
    def n_nonfinite(self) -> int:
        return int(self._file.attrs["n_nonfinite"])

    def append(self, features: np.ndarray, coords: np.ndarray, *, next_index: int,
               failed_coords: np.ndarray | None = None,
               nonfinite_coords: np.ndarray | None = None) -> None:
        """Append one batch: ``features`` float32 (b, D), ``coords`` int (b, 2); then record
        that grid positions up to ``next_index`` are done and flush."""
        f = self._file
        if features.shape != (len(coords), self.feature_dim):
            raise ValueError(f"features {features.shape} do not match coords {coords.shape} "
                             f"and feature_dim {self.feature_dim}")
        _extend(f["features"], np.asarray(features, np.float32))
        _extend(f["coords"], np.asarray(coords, np.int64).reshape(-1, 2))
        for name, rows in (("failed_coords", failed_coords),
                           ("nonfinite_coords", nonfinite_coords)):
            if rows is not None and len(rows):
                _extend(f[name], np.asarray(rows, np.int64).reshape(-1, 2))
        f.attrs["n_patches"] = f["features"].shape[0]
        f.attrs["n_failed"] = f["failed_coords"].shape[0]
        f.attrs["n_nonfinite"] = f["nonfinite_coords"].shape[0]
        f.attrs["next_index"] = next_index
        f.flush()
        self.next_index = next_index

    def finish(self) -> Path:
        """Mark the file complete, close it, and rename ``.partial`` to the final name."""
        self._file.attrs["completed"] = True
        self._file.flush()
        self._file.close()
        self._file = None
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without finishing (the partial file stays, to be resumed)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _extend(dataset, rows: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize(start + len(rows), axis=0)
    dataset[start:] = rows
