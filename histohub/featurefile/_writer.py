"""Writing a feature file (layout: ``_layout``) batch by batch: ``FeatureWriter``.

Writing goes to ``<name>.h5.partial``; each batch is appended (resizable, chunked datasets),
the counters are updated, and the file is flushed. A killed run resumes from the counters
of the last flushed batch (rows past them are cut off), so no patch is lost or written
twice; a partial file that cannot be resumed (other settings, damaged) is started over. On
completion ``completed`` is set and the file is renamed to ``<name>.h5``, never over a
file histohub did not write.

A full disk raises ``DiskFullError``: the partial file is deleted (after a failed write the
HDF5 library cannot be trusted with it) and its space given back. Data bypass HDF5's chunk
cache, so a write fails where it happens rather than at a later flush or close.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from histohub.featurefile._layout import (_COORD_DATASETS, FORMAT, FORMAT_VERSION, IDENTITY_ATTRS,
                                          NAME_ATTRS, _h5py, _plain, disk_full_error, foreign,
                                          is_disk_full, partial_path, same_value)
from histohub.errors import OutputExistsError

log = logging.getLogger(__name__)


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
            for key in NAME_ATTRS:  # the slide as this call names it, not as the killed one did
                if key in attrs:
                    f.attrs[key] = attrs[key]
                elif key in f.attrs:
                    del f.attrs[key]
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
