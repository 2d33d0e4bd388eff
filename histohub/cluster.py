"""Unsupervised clustering of extracted patch features (paper section 5.3, Figs. 5 and 6).

Ciga, Xu & Martel cluster 1.4 million ResNet18 features from 69 slides with mini-batch
K-means, choose the number of clusters with the elbow heuristic on the explained variance
(67.1% at k=2500, 83.3% at k=3000, 91% at k=5000), show the patches closest to each centre
(Fig. 5) and colour chosen clusters over whole slides (Fig. 6). This module does the same
for the HDF5 files ``histohub extract`` writes (the CLAM / TRIDENT layout):

- ``features`` (N, D) float, ``coords`` (N, 2) integer level-0 x, y;
- attributes ``slide_path`` and ``patch_size_level0`` (patch side in level-0 pixels, on the
  root or on ``coords`` as TRIDENT writes it), used for the montage and the overlays (files
  without ``slide_path`` find their slide as ``slide_dir/<file stem>.*``);
- attribute ``model_name``: files from different encoders are refused (their feature
  spaces are unrelated).

>>> from histohub.cluster import (elbow, fit_kmeans, read_feature_files, save_clusters,
...                               write_montage, write_overlays)
>>> files = read_feature_files(["out/slide1.h5", "out/slide2.h5"])
>>> curve = elbow(files, range(2, 21))            # explained variance for k = 2..20
>>> result = fit_kmeans(files, curve.chosen_k)    # ClusterResult: labels (N,), centers (k, D)
>>> save_clusters(result, "clusters/")            # clusters.h5 + assignments.csv
>>> write_montage(result, "clusters/montage.png") # Fig. 5
>>> write_overlays(result, "clusters/overlays")   # Fig. 6, one PNG per slide

Memory: when the features of all files together exceed ``max_memory_bytes`` they are never
loaded at once. The model is initialised on a random sample of rows, then refined with
``MiniBatchKMeans.partial_fit`` over shuffled blocks read from the files, and labels,
inertia and the total sum of squares are computed in further streaming passes. Only the
per-patch outputs (label, distance, file, index, coordinates: 36 bytes per patch) are kept
in memory.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import HistohubError, InputNotFoundError, require

logger = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_BYTES = 1 << 30  # features up to 1 GiB are clustered in memory
DEFAULT_BATCH_SIZE = 4096
BLOCK_BYTES = 32 << 20              # features read from a file at a time: 32 MiB
BLOCK_ROWS: int | None = None        # or a fixed number of rows (tests)
MAX_OVERLAY_COLOURS = 20             # tab20: beyond this, colours stop being distinct
DEFAULT_MONTAGE_ROWS = 32
SMALL_STEP = 1 << 26                 # mini-batch steps below this many multiply-adds: 1 thread
MAX_SEED = 2**32 - 1                 # scikit-learn's random_state range is [0, 2**32 - 1]
MAX_MONTAGE_PX = 1 << 15             # montage canvas side; matplotlib's PNG limit is 2**16
MONTAGE_PATCH_PX = 96                # side of each patch in the montage


class ClusteringError(HistohubError, ValueError):
    """Clustering cannot run as asked (k larger than the number of patches, unknown
    cluster ids, too few values of k for the elbow, ...)."""


class FeatureFileError(ClusteringError):
    """A feature file is not HDF5 or not in the layout ``histohub extract`` writes, or a set
    of files cannot be clustered together."""


# --------------------------------------------------------------------------- reading input


@dataclass(frozen=True)
class FeatureFile:
    """One HDF5 feature file: ``n`` patches with ``dim`` features each."""

    path: Path
    n: int
    dim: int
    slide_path: str | None = None
    patch_size_level0: int | None = None
    model_name: str | None = None


def _attr_str(attrs, name: str) -> str | None:
    value = attrs.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_one(path: Path) -> FeatureFile:
    h5py = require("h5py", extra="cluster", purpose="reading feature files")
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
        if handle.attrs.get("completed") is not None and not handle.attrs["completed"]:
            logger.warning("%s is marked incomplete (an extraction still running or "
                           "killed?): clustering the patches it holds", path)
        # histohub and TRIDENT keep the patch side in level-0 px on the root or on coords.
        patch = handle.attrs.get("patch_size_level0", coords.attrs.get("patch_size_level0"))
        return FeatureFile(
            path=path, n=int(features.shape[0]), dim=int(features.shape[1]),
            slide_path=_attr_str(handle.attrs, "slide_path"),
            patch_size_level0=None if patch is None else int(round(float(patch))),
            model_name=_attr_str(handle.attrs, "model_name"))


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


def _as_files(files) -> tuple[FeatureFile, ...]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = tuple(files)
    if files and all(isinstance(f, FeatureFile) for f in files):
        return files
    return read_feature_files(files)


class _FeatureStore:
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


def _total_sum_of_squares(store: _FeatureStore) -> float:
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


# --------------------------------------------------------------------------- k-means


def _check_options(*, seed: int, batch_size: int, passes: int, max_memory_bytes: int,
                   threads: int | None, min_explained: float | None = None) -> None:
    """Refuse option values k-means cannot use, naming each and its allowed range."""
    checks = [
        ("seed", seed, 0 <= seed <= MAX_SEED, f"0 to {MAX_SEED}"),
        ("batch_size", batch_size, batch_size >= 1, "at least 1"),
        ("passes", passes, passes >= 1, "at least 1"),
        ("max_memory_bytes", max_memory_bytes, max_memory_bytes >= 0, "at least 0"),
        ("threads", threads, threads is None or threads >= 1, "at least 1, or None"),
        ("min_explained", min_explained, min_explained is None or 0 < min_explained <= 1,
         "a fraction in (0, 1]"),
    ]
    bad = [f"{name}={value!r} ({allowed})" for name, value, ok, allowed in checks if not ok]
    if bad:
        raise ClusteringError(f"Invalid value: {'; '.join(bad)}.")


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ClusteringError(f"k={k} clusters is impossible with {n} patches in total: choose "
                         f"1 <= k <= {n} (add feature files, or lower k / the --k-range end).")


def _fit_centers(store: _FeatureStore, k: int, *, seed: int, batch_size: int, passes: int,
                 progress: bool) -> np.ndarray:
    """Mini-batch K-means centres, (k, D) float32 (scikit-learn ``MiniBatchKMeans``)."""
    cluster = require("sklearn.cluster", extra="cluster", purpose="k-means clustering")
    model = cluster.MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3,
                                    batch_size=batch_size, compute_labels=False)
    return _run_kmeans(model, store, k, seed=seed, batch_size=batch_size, passes=passes,
                       progress=progress)


def _thread_limit(threads: int | None, store: _FeatureStore, k_max: int, batch_size: int):
    """Limit BLAS and OpenMP to ``threads`` (None: 1 thread for small problems, else the
    libraries' defaults).

    Mini-batch steps of a few million multiply-adds are slower with threads than without:
    the threads spin waiting for each other, and on a busy machine that costs more than the
    work (measured on a loaded 2-core machine, 5000 x 512 features, k=20: 9x slower with
    the default 2 threads than with 1).
    """
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    if threads is None and min(store.n, batch_size) * k_max * store.dim < SMALL_STEP:
        threads = 1
    return contextlib.nullcontext() if threads is None else threadpool_limits(threads)


def _run_kmeans(model, store: _FeatureStore, k: int, *, seed: int, batch_size: int,
                passes: int, progress: bool) -> np.ndarray:
    if store.in_memory:
        model.fit(store.array)
        return model.cluster_centers_.astype(np.float32)
    rng = np.random.default_rng(seed)
    # Initialise (k-means++, 3 tries) and fit on a random sample of rows, then refine with
    # partial_fit on every row, in shuffled mini-batches, `passes` times.
    model.fit(store.sample(min(store.n, max(10 * k, 5 * batch_size)), rng))
    tqdm = _tqdm()
    with tqdm(total=passes * store.n, unit="patch", disable=not progress,
              desc=f"k-means k={k}", leave=False) as bar:
        for _ in range(passes):
            for _, block in store.blocks(rng=rng):
                block = block[rng.permutation(len(block))]
                for begin in range(0, len(block), batch_size):
                    model.partial_fit(block[begin:begin + batch_size])
                bar.update(len(block))
    return model.cluster_centers_.astype(np.float32)


def _assign(store: _FeatureStore, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of every row and the squared distance to it: (N,) int32, (N,) float32."""
    labels = np.empty(store.n, dtype=np.int32)
    distances = np.empty(store.n, dtype=np.float32)
    c_norm = (centers.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)
    rows = int(max(256, min(store.block_rows, (1 << 24) // len(centers))))  # (rows, k) <= 64 MiB
    for start, block in store.blocks():
        for begin in range(0, len(block), rows):
            x = block[begin:begin + rows]
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the first term does not change argmin.
            nearest = np.argmin(c_norm[None, :] - 2.0 * (x @ centers.T), axis=1)
            diff = x - centers[nearest]  # exact distance to the chosen centre
            at = start + begin
            labels[at:at + len(x)] = nearest
            distances[at:at + len(x)] = np.einsum("ij,ij->i", diff, diff)
    return labels, distances


@dataclass
class ClusterResult:
    """K-means over all patches of ``files`` (concatenated in order).

    Shapes: ``centers`` (k, D); ``labels``, ``distances`` (squared Euclidean to the own
    centre), ``file_index``, ``index`` (row inside its file) (N,); ``coords`` (N, 2) level-0.
    """

    files: tuple[FeatureFile, ...]
    centers: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    file_index: np.ndarray
    index: np.ndarray
    coords: np.ndarray
    total_sum_of_squares: float
    seed: int = 0

    @property
    def k(self) -> int:
        return int(len(self.centers))

    @property
    def inertia(self) -> float:
        """Sum of squared distances of every patch to its centre."""
        return float(self.distances.astype(np.float64).sum())

    @property
    def explained_variance(self) -> float:
        """1 - inertia / total sum of squares (the paper's elbow quantity)."""
        return _explained(self.inertia, self.total_sum_of_squares)

    @property
    def sizes(self) -> np.ndarray:
        """Patches per cluster, (k,)."""
        return np.bincount(self.labels, minlength=self.k)

    def nearest(self, cluster: int, n: int) -> np.ndarray:
        """Global rows of the ``n`` patches closest to centre ``cluster``, closest first."""
        rows = np.flatnonzero(self.labels == cluster)
        return rows[np.argsort(self.distances[rows], kind="stable")[:n]]


def _explained(inertia: float, tss: float) -> float:
    return 1.0 - inertia / tss if tss > 0 else 1.0


def _tqdm():
    from tqdm.auto import tqdm

    return tqdm


def _result(store: _FeatureStore, centers: np.ndarray, tss: float, seed: int) -> ClusterResult:
    labels, distances = _assign(store, centers)
    file_index = np.repeat(np.arange(len(store.files), dtype=np.int32), np.diff(store.offsets))
    index = np.arange(store.n, dtype=np.int64) - store.offsets[file_index]
    return ClusterResult(files=store.files, centers=centers, labels=labels,
                         distances=distances, file_index=file_index, index=index,
                         coords=store.coords(), total_sum_of_squares=tss, seed=seed)


def fit_kmeans(files, k: int, *, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
               passes: int = 3, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
               threads: int | None = None, progress: bool = True) -> ClusterResult:
    """Cluster every patch of ``files`` (paths or :class:`FeatureFile`) into ``k`` clusters
    with mini-batch K-means (paper section 5.3), seeded for repeatability.

    ``passes`` is used only when streaming (features larger than ``max_memory_bytes``).
    ``threads`` caps BLAS/OpenMP threads (default: 1 for small problems, see
    :func:`_thread_limit`; else the libraries' defaults).
    """
    _check_options(seed=seed, batch_size=batch_size, passes=passes,
                   max_memory_bytes=max_memory_bytes, threads=threads)
    files = _as_files(files)
    store = _FeatureStore(files, max_memory_bytes=max_memory_bytes)
    _check_k(k, store.n)
    tss = _total_sum_of_squares(store)
    with _thread_limit(threads, store, k, batch_size):
        centers = _fit_centers(store, k, seed=seed, batch_size=batch_size, passes=passes,
                               progress=progress)
        return _result(store, centers, tss, seed)


# --------------------------------------------------------------------------- elbow


def choose_k(ks: Sequence[int], explained_variance: Sequence[float]) -> int:
    """The elbow of explained variance against k, by the kneedle rule without smoothing
    (Satopaa et al., 2011) for a concave increasing curve.

    Both axes are scaled to [0, 1] by their first and last values; the elbow is the k whose
    point lies farthest above the chord joining the first and last points, i.e. the largest
    ``ev_scaled - k_scaled``. Ties go to the smaller k. Needs at least three values of k.
    """
    ks = np.asarray(ks, dtype=np.float64)
    ev = np.asarray(explained_variance, dtype=np.float64)
    if len(ks) < 3 or len(ks) != len(ev):
        raise ClusteringError("The elbow needs explained variances for at least three values of k.")
    order = np.argsort(ks)
    ks, ev = ks[order], ev[order]
    span = ev[-1] - ev[0]
    if span <= 0:  # no gain from more clusters: the smallest k explains as much
        return int(ks[0])
    gain = (ev - ev[0]) / span - (ks - ks[0]) / (ks[-1] - ks[0])
    return int(ks[int(np.argmax(gain))])


@dataclass
class ElbowResult:
    """Explained variance (1 - inertia / total sum of squares) per k, and the chosen k."""

    ks: tuple[int, ...]
    inertia: np.ndarray
    explained_variance: np.ndarray
    chosen_k: int
    rule: str
    results: dict[int, ClusterResult] = field(default_factory=dict, repr=False)


def elbow(files, ks: Iterable[int], *, seed: int = 0, min_explained: float | None = None,
          batch_size: int = DEFAULT_BATCH_SIZE, passes: int = 3,
          max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES, threads: int | None = None,
          progress: bool = True, keep: bool = True) -> ElbowResult:
    """Fit K-means for every k in ``ks`` and pick k by the elbow heuristic (paper section 5.3).

    The rule is :func:`choose_k` (kneedle), or with ``min_explained`` the smallest k whose
    explained variance reaches it (the paper reports 83.3% at its chosen k=3000). With
    ``keep`` the :class:`ClusterResult` of the chosen k is kept in ``results``.
    """
    _check_options(seed=seed, batch_size=batch_size, passes=passes,
                   max_memory_bytes=max_memory_bytes, threads=threads,
                   min_explained=min_explained)
    files = _as_files(files)
    ks = tuple(sorted({int(k) for k in ks}))
    store = _FeatureStore(files, max_memory_bytes=max_memory_bytes)
    for k in ks:
        _check_k(k, store.n)
    if min_explained is None and len(ks) < 3:
        raise ClusteringError(f"The elbow needs at least three values of k, got {list(ks)}.")
    tss = _total_sum_of_squares(store)
    centers, inertia = {}, []
    tqdm = _tqdm()
    for k in tqdm(ks, desc="elbow", unit="k", disable=not progress):
        with _thread_limit(threads, store, k, batch_size):
            centers[k] = _fit_centers(store, k, seed=seed, batch_size=batch_size,
                                      passes=passes, progress=progress)
            inertia.append(float(_assign(store, centers[k])[1].astype(np.float64).sum()))
    inertia = np.asarray(inertia)
    explained = np.array([_explained(i, tss) for i in inertia])
    if min_explained is None:
        chosen, rule = choose_k(ks, explained), "kneedle (farthest above the chord)"
    else:
        reached = [k for k, e in zip(ks, explained) if e >= min_explained]
        if not reached:
            raise ClusteringError(
                f"No k in {ks[0]}..{ks[-1]} explains {min_explained:.1%} of the variance "
                f"(best: {explained.max():.1%} at k={ks[int(explained.argmax())]}). "
                "Extend the range or lower the target.")
        chosen, rule = reached[0], f"smallest k explaining >= {min_explained:.1%}"
    results = {}
    if keep:
        with _thread_limit(threads, store, chosen, batch_size):
            results[chosen] = _result(store, centers[chosen], tss, seed)
    return ElbowResult(ks=ks, inertia=inertia, explained_variance=explained,
                       chosen_k=chosen, rule=rule, results=results)


# --------------------------------------------------------------------------- saving


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_clusters(result: ClusterResult, out_dir: str | os.PathLike, *,
                  curve: ElbowResult | None = None) -> tuple[Path, Path]:
    """Write ``clusters.h5`` (everything, centres included) and ``assignments.csv``
    (file, index, x, y, cluster, distance: one row per patch) into ``out_dir``.

    Both are written under temporary names and renamed only once both are complete, so a
    failure leaves the previous pair in place."""
    out_dir = Path(out_dir)
    h5_path, csv_path = out_dir / "clusters.h5", out_dir / "assignments.csv"
    with _atomic(h5_path) as h5_tmp, _atomic(csv_path) as csv_tmp:
        _write_clusters_h5(result, h5_tmp, curve)
        _write_assignments_csv(result, csv_tmp)
    return h5_path, csv_path


def _write_clusters_h5(result: ClusterResult, path: Path, curve: ElbowResult | None) -> None:
    h5py = require("h5py", extra="cluster", purpose="saving cluster assignments")
    from . import __version__

    text = h5py.string_dtype()
    with h5py.File(path, "w") as handle:
        handle["centers"] = result.centers
        for name in ("labels", "distances", "file_index", "index", "coords"):
            handle.create_dataset(name, data=getattr(result, name), compression="gzip")
        handle.create_dataset("files", data=[str(f.path) for f in result.files], dtype=text)
        handle.create_dataset("slide_paths", data=[f.slide_path or "" for f in result.files],
                              dtype=text)
        handle["patch_size_level0"] = [f.patch_size_level0 or 0 for f in result.files]
        handle["file_n"] = [f.n for f in result.files]
        handle.attrs.update(k=result.k, seed=result.seed, inertia=result.inertia,
                            total_sum_of_squares=result.total_sum_of_squares,
                            explained_variance=result.explained_variance,
                            model_name=result.files[0].model_name or "",
                            histohub_version=__version__)
        if curve is not None:
            group = handle.create_group("elbow")
            group["k"], group["inertia"] = np.asarray(curve.ks), curve.inertia
            group["explained_variance"] = curve.explained_variance
            group.attrs.update(chosen_k=curve.chosen_k, rule=curve.rule)


def _write_assignments_csv(result: ClusterResult, path: Path) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["file", "index", "x", "y", "cluster", "distance"])
        for i, f in enumerate(result.files):
            rows = np.flatnonzero(result.file_index == i)
            writer.writerows(
                (f.path, int(j), int(x), int(y), int(c), f"{d:.6g}") for j, (x, y), c, d in zip(
                    result.index[rows], result.coords[rows], result.labels[rows],
                    result.distances[rows]))


def load_clusters(path: str | os.PathLike) -> ClusterResult:
    """Read a ``clusters.h5`` written by :func:`save_clusters`."""
    h5py = require("h5py", extra="cluster", purpose="reading cluster assignments")
    with h5py.File(path, "r") as handle:
        files = tuple(
            FeatureFile(path=Path(p.decode() if isinstance(p, bytes) else p), n=int(n),
                        dim=int(handle["centers"].shape[1]),
                        slide_path=(s.decode() if isinstance(s, bytes) else s) or None,
                        patch_size_level0=int(ps) or None,
                        model_name=_attr_str(handle.attrs, "model_name") or None)
            for p, s, ps, n in zip(handle["files"][:], handle["slide_paths"][:],
                                   handle["patch_size_level0"][:], handle["file_n"][:]))
        return ClusterResult(
            files=files, centers=handle["centers"][:], labels=handle["labels"][:],
            distances=handle["distances"][:], file_index=handle["file_index"][:],
            index=handle["index"][:], coords=handle["coords"][:],
            total_sum_of_squares=float(handle.attrs["total_sum_of_squares"]),
            seed=int(handle.attrs["seed"]))


def write_elbow_csv(curve: ElbowResult, path: str | os.PathLike) -> Path:
    """k, inertia, explained_variance, chosen (0/1) per row."""
    path = Path(path)
    with _atomic(path) as tmp, open(tmp, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["k", "inertia", "explained_variance", "chosen"])
        for k, i, e in zip(curve.ks, curve.inertia, curve.explained_variance):
            writer.writerow([k, f"{i:.8g}", f"{e:.6f}", int(k == curve.chosen_k)])
    return path


# --------------------------------------------------------------------------- figures


def _pyplot():
    matplotlib = require("matplotlib", extra="cluster", purpose="drawing cluster figures")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path, dpi: int) -> Path:
    plt = _pyplot()
    try:
        with _atomic(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path


def plot_elbow(curve: ElbowResult, path: str | os.PathLike) -> Path:
    """Explained variance against k, the chosen k marked (the paper's elbow heuristic)."""
    plt = _pyplot()
    ks, ev = np.asarray(curve.ks), curve.explained_variance * 100
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ks, ev, "o-", color="tab:blue", label="explained variance")
    ax.plot(ks[[0, -1]], ev[[0, -1]], "--", color="0.6", label="chord (first to last k)")
    chosen = int(np.flatnonzero(ks == curve.chosen_k)[0])
    ax.axvline(curve.chosen_k, color="tab:red", alpha=0.4)
    ax.plot(ks[chosen], ev[chosen], "o", ms=12, mfc="none", mec="tab:red", mew=2,
            label=f"chosen k = {curve.chosen_k} ({ev[chosen]:.1f}%)")
    ax.set(xlabel="number of clusters k", ylabel="explained variance (%)",
           title=f"Elbow heuristic: 1 - inertia / total sum of squares\nrule: {curve.rule}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save_figure(fig, Path(path), dpi=100)


def _colour_table(clusters: Sequence[int]) -> dict[int, tuple[float, float, float]]:
    """A distinct colour per shown cluster (tab10, or tab20 beyond ten)."""
    plt = _pyplot()
    if len(clusters) > MAX_OVERLAY_COLOURS:
        raise ClusteringError(
            f"At most {MAX_OVERLAY_COLOURS} clusters can be told apart by colour; "
            f"{len(clusters)} were asked for. Choose fewer with --clusters-to-show.")
    cmap = plt.get_cmap("tab10" if len(clusters) <= 10 else "tab20")
    return {c: cmap(i)[:3] for i, c in enumerate(clusters)}


def default_clusters(result: ClusterResult, limit: int = 10) -> list[int]:
    """Every cluster when ``k <= limit``, else the ``limit`` largest (largest first)."""
    if result.k <= limit:
        return list(range(result.k))
    return [int(c) for c in np.argsort(-result.sizes, kind="stable")[:limit]]


def _check_clusters(result: ClusterResult, clusters: Sequence[int]) -> list[int]:
    clusters = [int(c) for c in clusters]
    bad = [c for c in clusters if not 0 <= c < result.k]
    if bad:
        raise ClusteringError(f"Cluster ids {bad} do not exist: ids run from 0 to {result.k - 1}.")
    return list(dict.fromkeys(clusters))


def _slide_candidates(f: FeatureFile, slide_dir: Path | None) -> list[Path]:
    """Where the slide of ``f`` may be: ``slide_dir/<name of slide_path>``, ``slide_path``,
    else (files from CLAM or TRIDENT carry no slide path) ``slide_dir/<feature file stem>.*``."""
    candidates = []
    if f.slide_path:
        if slide_dir is not None:
            candidates.append(slide_dir / Path(f.slide_path).name)
        candidates.append(Path(f.slide_path))
    elif slide_dir is not None:
        candidates.extend(p for p in sorted(slide_dir.glob(f"{f.path.stem}.*"))
                          if p.suffix.lower() not in (".h5", ".pt", ".png", ".csv"))
    return candidates


def _open_slide(f: FeatureFile, slide_dir: Path | None):
    """A :class:`histohub.wsi.Slide` for the file's slide, or None (with a warning)."""
    from .errors import SlideError
    from .wsi import open_slide

    for candidate in _slide_candidates(f, slide_dir):
        if candidate.is_file():
            try:
                return open_slide(candidate)
            except SlideError as error:
                logger.warning("%s", error)
                return None
    logger.warning("slide of %s not found (slide_path=%r)%s", f.path, f.slide_path,
                   "" if slide_dir else ": pass slide_dir / --slide-dir if the slides moved")
    return None


def _read_patch(slide, x: int, y: int, size0: int, out_px: int) -> np.ndarray:
    """The level-0 square (x, y, size0) read from the coarsest level that still has at least
    ``out_px`` pixels across it, resized to (out_px, out_px, 3) uint8. A tile that cannot be
    decoded comes back grey (logged), so one bad tile does not cost the figure."""
    import openslide
    from PIL import Image

    wanted = max(size0 / out_px, 1.0)
    level = max(i for i, ds in enumerate(slide.level_downsamples) if ds <= wanted or i == 0)
    side = max(1, round(size0 / slide.level_downsamples[level]))
    try:
        rgb = slide.read_region((int(x), int(y)), level, (side, side))
    except openslide.OpenSlideError as error:
        logger.warning("%s: patch at (%d, %d) cannot be read (%s)", slide.path, x, y, error)
        return np.full((out_px, out_px, 3), 160, np.uint8)
    return np.asarray(Image.fromarray(rgb).resize((out_px, out_px), Image.Resampling.BILINEAR))


@dataclass(frozen=True)
class MontageLayout:
    """Where things are in a montage canvas: row r starts at ``top(r)``; patch j of a row at
    ``left(j)``; each patch is ``patch_px`` square."""

    clusters: tuple[int, ...]
    patch_px: int
    gap: int = 4
    bar: int = 10

    def top(self, r: int) -> int:
        return self.gap + r * (self.patch_px + self.gap)

    def left(self, j: int) -> int:
        return self.bar + 2 * self.gap + j * (self.patch_px + self.gap)


def montage_canvas(result: ClusterResult, clusters: Sequence[int], *, n: int = 8,
                   patch_px: int = MONTAGE_PATCH_PX, slide_dir: str | os.PathLike | None = None
                   ) -> tuple[np.ndarray, MontageLayout]:
    """The montage image, (H, W, 3) uint8: for each cluster a row of its ``n`` patches
    nearest the centre (closest first), read from the slides, after a bar in the cluster's
    overlay colour. Patches whose slide cannot be found are grey."""
    clusters = _check_clusters(result, clusters)
    if not clusters:
        raise ClusteringError("No cluster to show in the montage.")
    check_montage_size(len(clusters), n, patch_px=patch_px)
    layout = MontageLayout(tuple(clusters), patch_px)
    colours = _colour_table(clusters[:MAX_OVERLAY_COLOURS])
    canvas = np.full((layout.top(len(clusters)), layout.left(n) + layout.gap, 3), 255, np.uint8)
    slides: dict[int, object] = {}
    slide_dir = Path(slide_dir) if slide_dir else None
    try:
        for r, c in enumerate(clusters):
            top = layout.top(r)
            if c in colours:
                canvas[top:top + patch_px, layout.gap:layout.gap + layout.bar] = (
                    np.array(colours[c]) * 255).round()
            for j, row in enumerate(result.nearest(c, n)):
                fi = int(result.file_index[row])
                f = result.files[fi]
                if fi not in slides:
                    slides[fi] = _open_slide(f, slide_dir)
                box = canvas[top:top + patch_px, layout.left(j):layout.left(j) + patch_px]
                if slides[fi] is None or not f.patch_size_level0:
                    box[:] = 200  # grey: slide or patch size unavailable
                    continue
                x, y = result.coords[row]
                box[:] = _read_patch(slides[fi], x, y, f.patch_size_level0, patch_px)
    finally:
        for slide in slides.values():
            if slide is not None:
                slide.close()
    return canvas, layout


def check_montage_size(rows: int, n: int, *, patch_px: int = MONTAGE_PATCH_PX) -> None:
    """Refuse a montage of ``rows`` clusters x ``n`` patches that is empty or over
    :data:`MAX_MONTAGE_PX` on a side, before any canvas is allocated."""
    if n < 1 or patch_px < 1:
        raise ClusteringError(f"A montage needs at least 1 patch of at least 1 px per row, "
                              f"got n={n}, patch_px={patch_px}.")
    layout = MontageLayout(tuple(range(rows)), patch_px)
    height, width = layout.top(rows), layout.left(n) + layout.gap
    if max(height, width) > MAX_MONTAGE_PX:
        step = patch_px + layout.gap
        raise ClusteringError(
            f"A montage of {rows} clusters x {n} patches would be {width} x {height} px, "
            f"over {MAX_MONTAGE_PX} px on a side: show at most "
            f"{(MAX_MONTAGE_PX - layout.left(0) - layout.gap) // step} patches per cluster "
            f"(--montage-size) and {(MAX_MONTAGE_PX - layout.gap) // step} clusters "
            "(--clusters-to-show).")


def write_montage(result: ClusterResult, path: str | os.PathLike, *,
                  clusters: Sequence[int] | None = None, n: int = 8,
                  patch_px: int = MONTAGE_PATCH_PX,
                  slide_dir: str | os.PathLike | None = None) -> Path:
    """Paper Fig. 5: one row per cluster with the ``n`` patches nearest its centre.

    ``clusters`` defaults to every cluster when k <= 32, else the 32 largest. Rows are
    labelled with the cluster id and size; a bar in the cluster's overlay colour (for the
    first twenty shown) links the row to :func:`write_overlays`. The PNG is the canvas of
    :func:`montage_canvas` at 1:1 plus 190 px of labels on the left and 45 px of title.
    """
    plt = _pyplot()
    if clusters is None:
        clusters = default_clusters(result, DEFAULT_MONTAGE_ROWS)
    canvas, layout = montage_canvas(result, clusters, n=n, patch_px=patch_px,
                                    slide_dir=slide_dir)
    sizes, total = result.sizes, len(result.labels)
    dpi, label_in, title_in = 100, 1.9, 0.45
    height, width = canvas.shape[0] / dpi, canvas.shape[1] / dpi
    fig = plt.figure(figsize=(width + label_in, height + title_in))
    ax = fig.add_axes((label_in / (width + label_in), 0.0, width / (width + label_in),
                       height / (height + title_in)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([layout.top(r) + patch_px / 2 for r in range(len(layout.clusters))],
                  [f"cluster {c}\n{sizes[c]} patches ({sizes[c] / total:.1%})"
                   for c in layout.clusters], fontsize=9)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    shown = ("all clusters" if len(layout.clusters) == result.k
             else f"{len(layout.clusters)} of {result.k} clusters")
    fig.suptitle(f"k-means, k = {result.k} ({shown}): the {n} patches nearest each centre, "
                 "nearest first", fontsize=10, y=1 - 0.1 / (height + title_in), va="top")
    return _save_figure(fig, Path(path), dpi=dpi)


def blend_clusters(thumb: np.ndarray, coords: np.ndarray, labels: np.ndarray, *,
                   patch_size_level0: float, scale: tuple[float, float],
                   colours: dict[int, tuple[float, float, float]], alpha: float = 0.5
                   ) -> np.ndarray:
    """Colour the patches whose label is in ``colours`` over a thumbnail (paper Fig. 6).

    ``thumb`` (h, w, 3) uint8; ``coords`` (N, 2) level-0 x, y; ``labels`` (N,); ``scale``
    thumbnail px per level-0 px in x and y. Covered pixels become
    ``(1 - alpha) * thumb + alpha * colour``; returns (h, w, 3) float in [0, 1].
    """
    tint = np.zeros(thumb.shape[:2] + (3,), np.float32)
    covered = np.zeros(thumb.shape[:2], bool)
    for (x, y), c in zip(coords, labels):
        colour = colours.get(int(c))
        if colour is None:
            continue
        x0, y0 = int(x * scale[0]), int(y * scale[1])
        x1 = max(x0 + 1, int(math.ceil((x + patch_size_level0) * scale[0])))
        y1 = max(y0 + 1, int(math.ceil((y + patch_size_level0) * scale[1])))
        tint[y0:y1, x0:x1] = colour
        covered[y0:y1, x0:x1] = True
    blended = thumb.astype(np.float32) / 255
    blended[covered] = (1 - alpha) * blended[covered] + alpha * tint[covered]
    return blended


def write_overlays(result: ClusterResult, out_dir: str | os.PathLike, *,
                   clusters: Sequence[int] | None = None, thumbnail_px: int = 1024,
                   alpha: float = 0.5, slide_dir: str | os.PathLike | None = None
                   ) -> list[Path]:
    """Paper Fig. 6: for each slide, the thumbnail beside the same thumbnail with the
    patches of ``clusters`` coloured (same colour for a cluster on every slide).

    ``clusters`` defaults to every cluster when k <= 10, else the 10 largest. Writes
    ``out_dir/<feature file stem>.png``; slides that cannot be found are skipped with a
    warning. Returns the paths written.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    clusters = _check_clusters(result, default_clusters(result) if clusters is None else clusters)
    if not clusters:
        raise ClusteringError("No cluster to show in the overlays.")
    colours = _colour_table(clusters)
    written = []
    slide_dir = Path(slide_dir) if slide_dir else None
    for i, f in enumerate(result.files):
        if not f.patch_size_level0:
            logger.warning("%s has no 'patch_size_level0' attribute: no overlay", f.path)
            continue
        slide = _open_slide(f, slide_dir)
        if slide is None:
            continue
        with slide:
            thumb = slide.thumbnail(max(slide.dimensions) / thumbnail_px)
            scale = thumb.shape[1] / slide.dimensions[0], thumb.shape[0] / slide.dimensions[1]
        rows = np.flatnonzero(result.file_index == i)
        blended = blend_clusters(thumb, result.coords[rows], result.labels[rows],
                                 patch_size_level0=f.patch_size_level0, scale=scale,
                                 colours=colours, alpha=alpha)
        counts = np.bincount(result.labels[rows], minlength=result.k)
        height_in = 5.0
        width_in = min(16.0, 2 * height_in * thumb.shape[1] / thumb.shape[0]) + 0.4
        fig, axes = plt.subplots(1, 2, figsize=(width_in, height_in + 1.2))
        axes[0].imshow(thumb)
        axes[0].set_title("slide")
        axes[1].imshow(blended)
        shown = int(np.isin(result.labels[rows], clusters).sum())
        axes[1].set_title(f"{shown} of {len(rows)} patches in the clusters shown")
        for ax in axes:
            ax.set_axis_off()
        handles = [Patch(color=colours[c], label=f"cluster {c}: {counts[c]} patches here")
                   for c in clusters]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5),
                   fontsize=9, frameon=False)
        name = Path(f.slide_path).name if f.slide_path else f.path.name
        fig.suptitle(f"{name}: k-means clusters (k = {result.k}) over the slide", fontsize=11)
        fig.tight_layout(rect=(0, 0.05 + 0.25 * math.ceil(len(handles) / 5) / (height_in + 1.2),
                               1, 0.97))
        written.append(_save_figure(fig, Path(out_dir) / f"{f.path.stem}.png", dpi=100))
    return written
