"""``histohub cluster``: k-means over extracted features, the elbow, Figs. 5 and 6 of the paper.

    histohub cluster features/*.h5 --k-range 2:20 --out clusters/
    histohub cluster features/ --k 8 --out clusters/ --clusters-to-show 1,3 --montage-size 3

Writes into ``--out``: ``clusters.h5`` (centres, labels, distances, coordinates),
``assignments.csv`` (file, index, x, y, cluster, distance), ``montage.png`` (the patches
nearest each centre), ``overlays/<file>.png`` (chosen clusters over each slide) and, with
``--k-range``, ``elbow.png`` and ``elbow.csv``.
"""

from __future__ import annotations

import argparse
import glob
import math
from pathlib import Path

from histohub.errors import ClusteringError, FeatureFileError


def _k_range(text: str) -> range:
    parts = text.split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or numbers[0] < 1 or numbers[1] < numbers[0] or (
            len(numbers) == 3 and numbers[2] < 1):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not START:END or START:END:STEP with 1 <= START <= END "
            "(END included), e.g. 2:20 or 1000:10000:500")
    return range(numbers[0], numbers[1] + 1, numbers[2] if len(numbers) == 3 else 1)


def _cluster_ids(text: str) -> list[int]:
    try:
        ids = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of cluster ids (0 or more), e.g. 1,3")
    return ids


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _at_most(limit, what: str):
    """A parser of positive integers up to ``limit()`` (what this machine can honour)."""
    def parse(text: str) -> int:
        value = _positive(text)
        if value > limit():
            raise argparse.ArgumentTypeError(f"expected at most {limit()} ({what}), got {text}")
        return value
    return parse


def _threads() -> int:
    from histohub._limits import max_workers

    return max_workers()


def _kmeans_rows() -> int:
    from histohub._limits import memory_bytes

    return memory_bytes() // 2 // (4 * 2048)  # rows of up to 2048 float32 in half the memory


def _seed(text: str) -> int:
    from histohub.cluster import MAX_SEED

    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected 0 to {MAX_SEED}, got {text}")
    return value


def _gib(text: str) -> float:
    from histohub._limits import memory_bytes

    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a size in GiB >= 0 (0: always stream), "
                                         f"got {text}")
    if value > memory_bytes() / 2**30:
        raise argparse.ArgumentTypeError(f"expected at most {memory_bytes() / 2**30:.1f} "
                                         f"(this machine's memory in GiB), got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], e.g. 0.8, got {text}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cluster", help="cluster extracted features (k-means, elbow, montage, overlays)",
        description="Mini-batch k-means over the features of one or more slides, as in "
                    "section 5.3 of Ciga et al.: explained variance per k, cluster "
                    "assignments, a montage of the patches nearest each centre (Fig. 5) and "
                    "overlays of chosen clusters on each slide (Fig. 6).")
    parser.add_argument("features", nargs="+", metavar="FEATURES",
                        help="HDF5 files from `histohub extract`, folders of them, or globs")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--k", type=_positive, help="number of clusters")
    which.add_argument("--k-range", type=_k_range, metavar="START:END[:STEP]",
                       help="fit every k in the range (END included) and pick one by the "
                            "elbow heuristic")
    parser.add_argument("--min-explained", type=_fraction, metavar="FRACTION",
                        help="with --k-range: pick the smallest k whose explained variance "
                             "reaches FRACTION (e.g. 0.8) instead of the kneedle elbow")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--clusters-to-show", type=_cluster_ids, metavar="IDS",
                        help="comma-separated cluster ids for the montage and overlays "
                             "(default: all when k <= 10 for overlays / 32 for the montage, "
                             "else the largest)")
    parser.add_argument("--montage-size", type=_positive, default=8, metavar="N",
                        help="patches per cluster in the montage (default 8)")
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    parser.add_argument("--batch-size", type=_at_most(_kmeans_rows, "half the memory"),
                        default=4096,
                        help="k-means mini-batch size (default 4096)")
    parser.add_argument("--passes", type=_at_most(lambda: 1000, "passes"), default=3,
                        help="passes over the data when streaming features (default 3)")
    parser.add_argument("--max-memory", type=_gib, default=1.0, metavar="GIB",
                        help="cluster in memory up to this many GiB of features, stream "
                             "beyond (default 1)")
    parser.add_argument("--threads", type=_at_most(_threads, "2 x the CPUs"),
                        help="BLAS/OpenMP threads for k-means (default: 1 for small "
                             "problems, where threads only wait for each other; else all)")
    parser.add_argument("--slide-dir", type=Path,
                        help="where to find the slides if they moved since extraction "
                             "(looked up by file name)")
    parser.add_argument("--geojson", action="store_true",
                        help="also write geojson/<feature file>.geojson: each slide's patches "
                             "as QuPath tiles classified 'Cluster <id>', one colour each")
    parser.add_argument("--no-figures", action="store_true",
                        help="skip the montage and the overlays (no slide reading)")
    parser.set_defaults(func=run)


def expand_inputs(items: list[str]) -> list[Path]:
    """Files as given, ``*.h5`` files inside folders (sorted), globs expanded."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(path.glob("*.h5")))
        elif glob.has_magic(item):
            paths.extend(Path(p) for p in sorted(glob.glob(item)))
        else:
            paths.append(path)
    return list(dict.fromkeys(paths))


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any work, an --out that cannot be a folder, a --slide-dir that is not
    one and --clusters-to-show ids that k cannot reach."""
    existing = next(p for p in (args.out, *args.out.parents) if p.exists())
    if not existing.is_dir():
        raise ClusteringError(f"--out {args.out}: {existing} is a file, not a folder.")
    if args.slide_dir is not None and not args.slide_dir.is_dir():
        raise ClusteringError(f"--slide-dir {args.slide_dir} is not a folder.")
    k_max = args.k if args.k is not None else max(args.k_range)
    too_large = [c for c in args.clusters_to_show or [] if c >= k_max]
    if too_large:
        raise ClusteringError(f"--clusters-to-show: cluster ids {too_large} do not exist with "
                              f"k <= {k_max}: ids run from 0 to k - 1.")


def write_cluster_geojson(result, folder: Path) -> list[Path]:
    """One FeatureCollection per feature file: its patches coloured by cluster."""
    from histohub.slides._qupath import cluster_features, write_geojson

    written = []
    for i, file in enumerate(result.files):
        if file.patch_size_level0 is None:
            raise FeatureFileError(f"{file.path}: no patch_size_level0 attribute, so the "
                                   "patches' squares are unknown; re-extract it")
        rows = result.file_index == i
        features = cluster_features(result.coords[rows], int(file.patch_size_level0),
                                    result.labels[rows], result.distances[rows])
        written.append(write_geojson(folder / f"{file.path.stem}.geojson", features))
    return written


def run(args: argparse.Namespace) -> int:
    from histohub import cluster

    if args.min_explained is not None and args.k_range is None:
        raise ClusteringError("--min-explained picks k from --k-range; it cannot be "
                                      "used with --k.")
    _check_arguments(args)
    if not args.no_figures:
        cluster.check_montage_size(len(args.clusters_to_show or [0]), args.montage_size)
    paths = expand_inputs(args.features)
    if not paths:
        raise FeatureFileError(f"No feature files found in {' '.join(args.features)}.")
    files = cluster.read_feature_files(paths)
    n = sum(f.n for f in files)
    print(f"{n} patches from {len(files)} file(s), {files[0].dim} features each")
    options = dict(seed=args.seed, batch_size=args.batch_size, passes=args.passes,
                   max_memory_bytes=int(args.max_memory * (1 << 30)), threads=args.threads)
    curve = None
    out: Path = args.out
    if args.k_range is not None:
        curve = cluster.elbow(files, args.k_range, min_explained=args.min_explained, **options)
        print(f"{'k':>6}  {'inertia':>14}  explained variance")
        for k, inertia, explained in zip(curve.ks, curve.inertia, curve.explained_variance):
            mark = "  <- chosen" if k == curve.chosen_k else ""
            print(f"{k:>6}  {inertia:>14.6g}  {explained:>17.1%}{mark}")
        print(f"chosen k = {curve.chosen_k}, rule: {curve.rule}")
        result = curve.results[curve.chosen_k]
        cluster.write_elbow_csv(curve, out / "elbow.csv")
        print(f"wrote {cluster.plot_elbow(curve, out / 'elbow.png')}")
    else:
        result = cluster.fit_kmeans(files, args.k, **options)
        print(f"k = {result.k}: explained variance {result.explained_variance:.1%}")
    for written in cluster.save_clusters(result, out, curve=curve):
        print(f"wrote {written}")
    if args.geojson:
        written = write_cluster_geojson(result, out / "geojson")
        print(f"wrote {len(written)} GeoJSON file(s) in {out / 'geojson'}")
    if not args.no_figures:
        montage = cluster.write_montage(result, out / "montage.png", n=args.montage_size,
                                        clusters=args.clusters_to_show,
                                        slide_dir=args.slide_dir)
        print(f"wrote {montage}")
        overlays = cluster.write_overlays(result, out / "overlays", clusters=args.clusters_to_show,
                                          slide_dir=args.slide_dir)
        print(f"wrote {len(overlays)} overlay(s) in {out / 'overlays'}")
    return 0
