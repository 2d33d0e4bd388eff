"""Figures of a clustering: the elbow curve, the montage of the patches nearest each
centre (paper Fig. 5) and chosen clusters coloured over each slide (paper Fig. 6).

Slides are opened and read through :mod:`histohub.slides._reader`; PNGs are written atomically.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histohub.files import atomic_path
from histohub.errors import ClusteringError, SlideError, require
from histohub.slides._reader import Slide, open_slide
from histohub.slides._tiling import choose_level
from histohub.cluster._kmeans import ClusterResult, ElbowResult
from histohub.cluster._store import FeatureFile

logger = logging.getLogger(__name__)

MAX_OVERLAY_COLOURS = 20             # tab20: beyond this, colours stop being distinct
DEFAULT_MONTAGE_ROWS = 32
MAX_MONTAGE_PX = 1 << 15             # montage canvas side; matplotlib's PNG limit is 2**16
MONTAGE_PATCH_PX = 96                # side of each patch in the montage


def _pyplot():
    matplotlib = require("matplotlib", extra="cluster", purpose="drawing cluster figures")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path, dpi: int) -> Path:
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
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


def _open_slide(f: FeatureFile, slide_dir: Path | None) -> Slide | None:
    """A :class:`histohub.slides._reader.Slide` for the file's slide, or None (with a warning)."""
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


def _read_patch(slide: Slide, x: int, y: int, size0: int, out_px: int) -> np.ndarray:
    """The level-0 square (x, y, size0) resized to (out_px, out_px, 3) uint8, read from the
    coarsest level that still has ``out_px`` pixels across it: ``wsi.choose_level`` given a
    slide mpp of 1, so that the target "mpp" is the downsample wanted. A tile that cannot
    be decoded comes back grey (logged), so one bad tile does not cost the figure."""
    level = choose_level(slide, 1.0, max(size0 / out_px, 1.0))
    side = max(1, round(size0 / slide.level_downsamples[level]))
    try:
        rgb = slide.read_region((int(x), int(y)), level, (side, side))
    except Exception as error:  # noqa: BLE001  OpenSlideError, which wsi.Slide passes on
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
