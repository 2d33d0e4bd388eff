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
        mask_method ("hsv" or "otsu"), min_foreground, n_grid (patches in the grid written),
        grid_sha256 (of the grid's coords: identifies the grid for resuming)
        n_tissue (patches with tissue), max_patches (0: no limit), truncated (n_grid < n_tissue)
        model_fingerprint  sha256 of the model's weights (its state dict), whatever their source
        norm_mean, norm_std, interpolation   the preprocessing
        slide_size, slide_fingerprint        bytes, and sha256 of the size, first and last MiB
        n_patches, n_failed, n_nonfinite
        next_index         grid positions processed so far (the resume point)

Writing goes to ``<name>.h5.partial``; each batch is appended (resizable, chunked datasets),
the counters are updated, and the file is flushed. A killed run resumes from the counters
of the last flushed batch (rows past them are cut off), so no patch is lost or written
twice; a partial file that cannot be resumed (other settings, damaged) is started over. On
completion ``completed`` is set and the file is renamed to ``<name>.h5``, never over a
file histohub did not write.

A full disk raises ``DiskFullError``: the partial file is deleted (after a failed write the
HDF5 library cannot be trusted with it) and its space given back. Data bypass HDF5's chunk
cache, so a write fails where it happens rather than at a later flush or close.

The attributes are built here (``feature_attrs``, ``coords_attrs``) and compared with a new
request here (``find_done``): a complete file counts as done only for the same
``REQUEST_ATTRS`` (slide contents, model weights, preprocessing, tiling).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._version import __version__
from .errors import (DiskFullError, FeatureFileError, InputNotFoundError, OutputExistsError,
                     require)

if TYPE_CHECKING:
    from .wsi import TileGrid

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
MODEL_ATTRS = ("model_name", "arch", "model_fingerprint", "norm_mean", "norm_std",
               "interpolation")
SLIDE_ATTRS = ("slide_size", "slide_fingerprint", "slide_width", "slide_height")
#: What a complete feature file must share with a request to count as done for it.
REQUEST_ATTRS = (*MODEL_ATTRS, *SLIDE_ATTRS, "slide_mpp", "target_mpp", "patch_size",
                 "mask_method", "min_foreground")
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


def feature_attrs(request: dict[str, Any], grid: TileGrid, *, model_sha256: str,
                  feature_dim: int, n_tissue: int, max_patches: int | None
                  ) -> dict[str, Any]:
    """The root attributes of a feature file (module docstring) for ``request`` (its
    ``REQUEST_ATTRS``) and the ``grid`` written (possibly the first ``max_patches`` of
    ``n_tissue`` patches)."""
    return {
        **request, "histohub_version": __version__, "model_sha256": model_sha256,
        "feature_dim": feature_dim,
        "slide_path": str(Path(grid.slide_path).resolve()),
        "slide_name": Path(grid.slide_path).name,
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


def find_done(path: str | os.PathLike, request: dict[str, Any], *, max_patches: int | None
              ) -> dict[str, Any] | None:
    """The attributes of ``path`` when it is complete and made for ``request`` (reuse it);
    None when it is to be made (absent, unfinished, or a shorter ``max_patches`` trial);
    ``OutputExistsError`` when replacing it would lose features of another request."""
    path = Path(path)
    attrs = read_attrs(path) if path.exists() else None
    if attrs is None or not attrs.get("completed"):
        return None
    keep = "it is kept. Pass --overwrite (overwrite=True) to replace it, or choose another " \
           "output folder"
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
    path = Path(path)
    if path.is_dir():
        raise InputNotFoundError(f"{str(path)!r} is a folder; give the .h5 files in it (the "
                                 "command line takes folders and globs).")
    if not path.is_file():
        raise InputNotFoundError(f"Feature file {str(path)!r} does not exist.")
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
        return {"n": int(features.shape[0]), "dim": int(features.shape[1]),
                "attrs": {k: _plain(v) for k, v in handle.attrs.items()},
                "coords_attrs": {k: _plain(v) for k, v in coords.attrs.items()}}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------- writing

class FeatureWriter:
    """Appends batches of features to ``<path>.partial``; ``finish()`` renames it to ``path``.

    ``attrs``: the root attributes (see the module docstring); must include the
    ``IDENTITY_ATTRS``. With ``resume=True`` a matching partial file is continued from its
    last flushed batch: ``next_index`` tells the caller which grid position to start at.
    A write that fails for lack of space deletes the partial file and raises
    ``DiskFullError``.
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
            with self._writing():
                self._create(attrs, coords_attrs or {}, chunk_rows)

    # -- opening

    def _open(self, mode: str):
        # no chunk cache: data reach the file at each write, so a full disk fails that
        # write instead of leaving unwritable data for flush() and close()
        return _h5py().File(self.partial, mode, rdcc_nbytes=0)

    def _create(self, attrs: dict[str, Any], coords_attrs: dict[str, Any], chunk_rows: int
                ) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self._file = self._open("w")
        f.create_dataset("features", shape=(0, self.feature_dim), maxshape=(None, self.feature_dim),
                         dtype=np.float32, chunks=(chunk_rows, self.feature_dim))
        for name in _COORD_DATASETS:
            f.create_dataset(name, shape=(0, 2), maxshape=(None, 2), dtype=np.int64,
                             chunks=(chunk_rows if name == "coords" else min(chunk_rows, 64), 2))
        for key, value in coords_attrs.items():
            f["coords"].attrs[key] = value
        for key, value in {**attrs, "format": FORMAT, "format_version": FORMAT_VERSION,
                           "completed": False, "n_patches": 0, "n_failed": 0,
                           "n_nonfinite": 0, "next_index": 0}.items():
            f.attrs[key] = value
        f.flush()
        self.next_index = 0
        self.resumed = False

    def _reopen(self, attrs: dict[str, Any]):
        """Open a partial file to continue it, or None (deleted) when it cannot be resumed:
        made with other settings, unreadable, or damaged (killed mid-write, full disk)."""
        try:
            self._file = f = self._open("a")
        except (OSError, RuntimeError) as error:
            log.warning("%s cannot be resumed (%s); starting this slide over", self.partial,
                        _first_line(error))
            self._discard()
            return None
        try:
            expected = {**attrs, "format_version": FORMAT_VERSION}
            mismatched = [k for k in IDENTITY_ATTRS
                          if not same_value(_plain(f.attrs.get(k)), expected.get(k))]
            if mismatched or f.attrs.get("format") != FORMAT:
                log.warning("%s was made with other settings (differing: %s); starting over",
                            self.partial, ", ".join(mismatched) or "format")
                self._discard()
                return None
            counts = {"features": int(f.attrs["n_patches"]), "coords": int(f.attrs["n_patches"]),
                      "failed_coords": int(f.attrs["n_failed"]),
                      "nonfinite_coords": int(f.attrs["n_nonfinite"])}
            _check_intact(f, os.path.getsize(self.partial))
            for name, rows in counts.items():  # cut rows written after the last flush
                if f[name].shape[0] != rows:
                    f[name].resize(rows, axis=0)
            f.flush()
        except (OSError, RuntimeError, KeyError, ValueError) as error:
            if is_disk_full(error):
                self._discard()
                raise disk_full_error(self.partial, error) from error
            log.warning("%s cannot be resumed (%s); starting this slide over", self.partial,
                        _first_line(error))
            self._discard()
            return None
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
        if features.shape != (len(coords), self.feature_dim):
            raise ValueError(f"features {features.shape} do not match coords {coords.shape} "
                             f"and feature_dim {self.feature_dim}")
        with self._writing():
            f = self._file
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

    def finish(self, *, overwrite: bool = False) -> Path:
        """Mark the file complete, close it, and rename ``.partial`` to the final name.

        A file at the final name that histohub did not write is replaced only when
        ``overwrite`` (it may have appeared while this one was written)."""
        with self._writing():
            self._file.attrs["completed"] = True
            self._file.flush()
            self._file.close()
        self._file = None
        if not overwrite and foreign(self.path):
            raise OutputExistsError(
                f"{self.path} appeared while it was being written and was not written by "
                f"histohub; it is left as is (the features are in {self.partial}). Pass "
                "--overwrite (overwrite=True) to replace it")
        _rename_into(self.partial, self.path, replace=self.path.exists())
        return self.path

    def close(self) -> None:
        """Close without finishing (the partial file stays, to be resumed)."""
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            f.close()
        except (OSError, RuntimeError) as error:  # never hide the error that got us here
            log.warning("%s could not be closed cleanly (%s)", self.partial, _first_line(error))

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- failures

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn a full disk into ``DiskFullError``, deleting the partial file."""
        try:
            yield
        except (OSError, RuntimeError) as error:
            if not is_disk_full(error):
                raise
            self._discard()
            raise disk_full_error(self.partial, error) from error

    def _discard(self) -> None:
        """Delete the partial file, also when HDF5 is left holding data it cannot write.

        After a failed write, closing an HDF5 file retries the write and fails again, and a
        file left open crashes the interpreter at exit. So the file's descriptor is first
        pointed at an anonymous in-memory file (/dev/null where there is none), where HDF5's
        last writes succeed; the space on disk is given back.
        """
        f, self._file = self._file, None
        self.partial.unlink(missing_ok=True)
        if f is None:
            return
        try:
            if hasattr(os, "memfd_create"):
                scratch = os.memfd_create("histohub-discarded")
            else:
                scratch = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(scratch, f.id.get_vfd_handle())
            finally:
                os.close(scratch)
        except (OSError, RuntimeError, ValueError) as error:
            log.debug("%s: descriptor not redirected (%s)", self.partial, error)
        try:
            f.close()
        except (OSError, RuntimeError) as error:
            log.debug("%s: closed with %s", self.partial, _first_line(error))


def _check_intact(f, file_size: int) -> None:
    """Raise ValueError when a dataset's chunk lies past the end of the file: what a write
    that failed (full disk, kill -9) leaves, and what makes HDF5 fail later with
    "addr overflow"."""
    for name in ("features", *_COORD_DATASETS):
        dataset = f[name]
        for index in range(dataset.id.get_num_chunks()):
            chunk = dataset.id.get_chunk_info(index)
            if chunk.byte_offset + chunk.size > file_size:
                raise ValueError(f"{name} chunk {index} ends at byte "
                                 f"{chunk.byte_offset + chunk.size}, past the end of the file "
                                 f"({file_size} bytes)")


def _rename_into(source: Path, target: Path, *, replace: bool) -> None:
    """Rename ``source`` to ``target``; unless ``replace``, never over a file that appears
    at ``target`` meanwhile (a hard link fails if it exists; plain rename where links are
    not supported)."""
    if replace:
        os.replace(source, target)
        return
    try:
        os.link(source, target)
    except FileExistsError:
        raise OutputExistsError(f"{target} appeared while it was being written; it is left "
                                f"as is (the features are in {source})") from None
    except OSError:  # no hard links on this file system
        os.replace(source, target)
        return
    source.unlink()


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _extend(dataset, rows: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize(start + len(rows), axis=0)
    dataset[start:] = rows
