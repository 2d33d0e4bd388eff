"""Mini-batch k-means over feature files and the elbow rule for k (paper section 5.3).

Features up to ``max_memory_bytes`` are clustered in memory (``MiniBatchKMeans.fit``);
beyond, the model is initialised on a random sample of rows and refined with
``partial_fit`` over shuffled blocks, and labels, inertia and the total sum of squares are
computed in further streaming passes. Only the per-patch outputs (label, distance, file,
index, coordinates: 36 bytes per patch) are kept in memory.

- [0] Ciga, Xu & Martel, Self supervised contrastive learning for digital histopathology,
  Machine Learning with Applications 7, 2022 (section 5.3).
- [1] Sculley, Web-scale k-means clustering, WWW 2010 (mini-batch k-means).
- [2] Satopaa et al., Finding a "kneedle" in a haystack, ICDCS workshops 2011.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from histohub.errors import ClusteringError, require
from histohub.cluster._store import FeatureFile, FeatureStore, as_files, total_sum_of_squares

DEFAULT_MAX_MEMORY_BYTES = 1 << 30  # features up to 1 GiB are clustered in memory
DEFAULT_BATCH_SIZE = 4096
SMALL_STEP = 1 << 26                 # mini-batch steps below this many multiply-adds: 1 thread
MAX_SEED = 2**32 - 1                 # scikit-learn's random_state range is [0, 2**32 - 1]


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


def _fit_centers(store: FeatureStore, k: int, *, seed: int, batch_size: int, passes: int,
                 progress: bool) -> np.ndarray:
    """Mini-batch K-means centres, (k, D) float32 (scikit-learn ``MiniBatchKMeans``)."""
    cluster = require("sklearn.cluster", extra="cluster", purpose="k-means clustering")
    model = cluster.MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3,
                                    batch_size=batch_size, compute_labels=False)
    return _run_kmeans(model, store, k, seed=seed, batch_size=batch_size, passes=passes,
                       progress=progress)


def _thread_limit(threads: int | None, store: FeatureStore, k_max: int, batch_size: int):
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


def _run_kmeans(model, store: FeatureStore, k: int, *, seed: int, batch_size: int,
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


def _assign(store: FeatureStore, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _result(store: FeatureStore, centers: np.ndarray, tss: float, seed: int) -> ClusterResult:
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
    files = as_files(files)
    store = FeatureStore(files, max_memory_bytes=max_memory_bytes)
    _check_k(k, store.n)
    tss = total_sum_of_squares(store)
    with _thread_limit(threads, store, k, batch_size):
        centers = _fit_centers(store, k, seed=seed, batch_size=batch_size, passes=passes,
                               progress=progress)
        return _result(store, centers, tss, seed)


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
    files = as_files(files)
    ks = tuple(sorted({int(k) for k in ks}))
    store = FeatureStore(files, max_memory_bytes=max_memory_bytes)
    for k in ks:
        _check_k(k, store.n)
    if min_explained is None and len(ks) < 3:
        raise ClusteringError(f"The elbow needs at least three values of k, got {list(ks)}.")
    tss = total_sum_of_squares(store)
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
