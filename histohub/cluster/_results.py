"""Cluster results on disk: ``clusters.h5`` (everything), ``assignments.csv`` (one row per
patch) and ``elbow.csv``; each file is written atomically (see :mod:`histohub.files`)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from histohub.files import atomic_path
from histohub._version import __version__
from histohub.errors import require
from histohub.cluster._kmeans import ClusterResult, ElbowResult
from histohub.cluster._store import FeatureFile


def save_clusters(result: ClusterResult, out_dir: str | os.PathLike, *,
                  curve: ElbowResult | None = None) -> tuple[Path, Path]:
    """Write ``clusters.h5`` (everything, centres included) and ``assignments.csv``
    (file, index, x, y, cluster, distance: one row per patch) into ``out_dir``.

    Both are written under temporary names and renamed only once both are complete, so a
    failure leaves the previous pair in place."""
    out_dir = Path(out_dir)
    h5_path, csv_path = out_dir / "clusters.h5", out_dir / "assignments.csv"
    with atomic_path(h5_path) as h5_tmp, atomic_path(csv_path) as csv_tmp:
        _write_clusters_h5(result, h5_tmp, curve)
        _write_assignments_csv(result, csv_tmp)
    return h5_path, csv_path


def _write_clusters_h5(result: ClusterResult, path: Path, curve: ElbowResult | None) -> None:
    h5py = require("h5py", extra="cluster", purpose="saving cluster assignments")
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
                        model_name=str(handle.attrs.get("model_name", "")) or None)
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
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["k", "inertia", "explained_variance", "chosen"])
        for k, i, e in zip(curve.ks, curve.inertia, curve.explained_variance):
            writer.writerow([k, f"{i:.8g}", f"{e:.6f}", int(k == curve.chosen_k)])
    return path
