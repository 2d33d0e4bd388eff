"""Feature files as one (N, D) float32 matrix, in memory or streamed in blocks.

Feature files are read through :mod:`histohub.featurefile` (``read_header`` checks the CLAM/TRIDENT
layout); when the features of all files together exceed ``max_memory_bytes`` they are
never loaded at once: :class:`FeatureStore` yields them block by block.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histohub.featurefile import _layout as _h5
from histohub.errors import FeatureFileError, require

logger = logging.getLogger(__name__)

BLOCK_BYTES = 32 << 20              # features read from a file at a time: 32 MiB
BLOCK_ROWS: int | None = None        # or a fixed number of rows (tests)


@dataclass(frozen=True)
class FeatureFile:
    """One HDF5 feature file: ``n`` patches with ``dim`` features each."""

    path: Path
    n: int
    dim: int
    slide_path: str | None = None
    patch_size_level0: int | None = None
    model_name: str | None = None


def _text(value: Any) -> str | None:
    """An attribute as text (``_h5`` has decoded bytes already), None when absent."""
    return None if value is None else str(value)


def _read_one(path: Path) -> FeatureFile:
    header = _h5.read_header(path)
    attrs = header["attrs"]
    if attrs.get("completed") is not None and not attrs["completed"]:
        logger.warning("%s is marked incomplete (an extraction still running or "
                       "killed?): clustering the patches it holds", path)
    # histohub and TRIDENT keep the patch side in level-0 px on the root or on coords.
    patch = attrs.get("patch_size_level0", header["coords_attrs"].get("patch_size_level0"))
    return FeatureFile(
        path=path, n=header["n"], dim=header["dim"], slide_path=_text(attrs.get("slide_path")),
        patch_size_level0=None if patch is None else int(round(float(patch))),
        model_name=_text(attrs.get("model_name")))


def read_feature_files(paths: Iterable[str | os.PathLike]) -> tuple[FeatureFile, ...]:
    """Read the headers of feature files and check they can be clustered together.

    Files with no patches (a slide without tissue) are skipped with a warning. Raises
    :class:`FeatureFileError` for a file that is not in the expected layout, for feature
    dimensions or encoders that differ between files, or when no patch is left.
    """
    files = []
    for path in paths:
        info = _read_one(Path(path))
        if info.n == 0:
            logger.warning("%s holds no patches (no tissue?): skipped", info.path)
            continue
        files.append(info)
    if not files:
        raise FeatureFileError("No patches to cluster: every feature file given is empty "
                               "(or none was given).")
    dims = {f.dim for f in files}
    if len(dims) > 1:
        listing = "; ".join(f"{f.path.name}: D={f.dim}" for f in files)
        raise FeatureFileError(
            f"Feature dimensions differ between files ({listing}). Cluster files extracted "
            "with the same model only.")
    models = {f.model_name for f in files if f.model_name}
    if len(models) > 1:
        raise FeatureFileError(
            f"The files were extracted with different models ({', '.join(sorted(models))}); "
            "their features are not comparable. Cluster files from one model at a time.")
    return tuple(files)


def as_files(files) -> tuple[FeatureFile, ...]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = tuple(files)
    if files and all(isinstance(f, FeatureFile) for f in files):
        return files
    return read_feature_files(files)


class FeatureStore:
    """All rows of several files as one (N, D) float32 matrix, in memory or streamed."""

    def __init__(self, files: Sequence[FeatureFile], *, max_memory_bytes: int) -> None:
        self.files = tuple(files)
        self.offsets = np.cumsum([0] + [f.n for f in self.files])
        self.n = int(self.offsets[-1])
        self.dim = self.files[0].dim
        self.block_rows = BLOCK_ROWS or max(256, BLOCK_BYTES // (4 * self.dim))
        self.in_memory = self.n * self.dim * 4 <= max_memory_bytes
        self.array = None
        if self.in_memory:
            array = np.empty((self.n, self.dim), np.float32)
            for start, block in self._read_blocks(self.block_rows, None):
                array[start:start + len(block)] = block
            self.array = array

    def _read_blocks(self, rows: int, rng: np.random.Generator | None):
        h5py = require("h5py", extra="cluster", purpose="reading feature files")
        spans = [(i, start) for i, f in enumerate(self.files) for start in range(0, f.n, rows)]
        if rng is not None:
            spans = [spans[j] for j in rng.permutation(len(spans))]
        handles: dict[int, object] = {}
        try:
            for i, start in spans:
                if i not in handles:
                    handles[i] = h5py.File(self.files[i].path, "r")
                block = handles[i]["features"][start:start + rows]
                yield int(self.offsets[i]) + start, np.asarray(block, dtype=np.float32)
        finally:
            for handle in handles.values():
                handle.close()

    def blocks(self, rows: int | None = None, *, rng: np.random.Generator | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first global row, block (b, D) float32)``; blocks in random order with rng."""
        rows = rows or self.block_rows
        if self.array is None:
            yield from self._read_blocks(rows, rng)
            return
        starts = np.arange(0, self.n, rows)
        if rng is not None:
            starts = rng.permutation(starts)
        for start in starts:
            yield int(start), self.array[start:start + rows]

    def locate(self, row: int) -> tuple[FeatureFile, int]:
        """The file holding global ``row`` and the row's index inside it."""
        i = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return self.files[i], row - int(self.offsets[i])

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` distinct random rows, (count, D) float32."""
        if self.array is not None:
            return self.array[np.sort(rng.choice(self.n, size=count, replace=False))]
        h5py = require("h5py", extra="cluster", purpose="reading feature files")
        rows = np.sort(rng.choice(self.n, size=count, replace=False))
        parts = []
        for i, f in enumerate(self.files):
            local = rows[(rows >= self.offsets[i]) & (rows < self.offsets[i + 1])] - self.offsets[i]
            if local.size:
                with h5py.File(f.path, "r") as handle:
                    parts.append(np.asarray(handle["features"][local], dtype=np.float32))
        return np.concatenate(parts)

    def coords(self) -> np.ndarray:
        """Level-0 x, y of every row, (N, 2) int64."""
        h5py = require("h5py", extra="cluster", purpose="reading feature files")
        out = np.empty((self.n, 2), dtype=np.int64)
        for i, f in enumerate(self.files):
            with h5py.File(f.path, "r") as handle:
                out[self.offsets[i]:self.offsets[i + 1]] = handle["coords"][:]
        return out


def total_sum_of_squares(store: FeatureStore) -> float:
    """sum_i ||x_i - mean||^2 over all rows, in one streaming pass (Chan et al.'s pairwise
    update of count, mean and M2, in float64). Raises on NaN or inf features."""
    count, mean, m2 = 0, np.zeros(store.dim), 0.0
    for start, block in store.blocks():
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            f, row = store.locate(start + int(np.argmin(finite)))
            raise FeatureFileError(
                f"{str(f.path)!r}: features of patch {row} (and {int((~finite).sum()) - 1} "
                "more in the same block) are NaN or infinite. Re-extract that slide.")
        for begin in range(0, len(block), 4096):  # float64 copies of 4096 rows at most
            part = block[begin:begin + 4096].astype(np.float64)
            p_mean = part.mean(axis=0)
            p_m2 = float(((part - p_mean) ** 2).sum())
            total = count + len(part)
            delta = p_mean - mean
            m2 += p_m2 + float(delta @ delta) * count * len(part) / total
            mean += delta * len(part) / total
            count = total
    return m2
