"""A slide job and what came of it: how slides are tiled (``Tiling``), one slide to do
(``SlideJob``), and what was done (``SlideResult``). Shared by the library and the CLI."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histohub.errors import HistohubError
from histohub._features import check_options
from histohub.slides._tissue import DEFAULT_MASK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tiling:
    """How slides are cut into patches.

    ``mpp``: the slides' microns per pixel, for files that do not record it.
    ``target_mpp``: tile at this mpp (default: the model's). ``mask``: 'contours' (the
    default: all tissue, dense and pale, without pen ink or debris), 'hsv' (the paper's
    rule) or 'otsu'. ``min_foreground``: tissue fraction a patch needs. ``max_patches``:
    keep the first N grid patches (for quick trials). ``roi``: a GeoJSON file, or a folder
    of them named by slide stem: only tissue inside counts, annotations of a class matching
    ``roi_exclude`` are cut out (``histohub.slides._qupath.load_roi``). ``coords``: a CLAM or
    TRIDENT h5 (or a folder of them by slide stem): exactly its patches are extracted
    (``histohub.slides._coords``), whatever the mask.
    """

    mpp: float | None = None
    target_mpp: float | None = None
    mask: str = DEFAULT_MASK
    min_foreground: float = 0.5
    max_patches: int | None = None
    roi: Path | None = None
    roi_exclude: tuple[str, ...] = ("Ignore*",)
    coords: Path | None = None

    def check(self) -> None:
        check_options(mpp=self.mpp, target_mpp=self.target_mpp, mask=self.mask,
                      min_foreground=self.min_foreground, max_patches=self.max_patches)


@dataclass(frozen=True)
class SlideJob:
    """One slide to extract: its file, the feature file, an optional preview PNG and an
    optional GeoJSON of its tissue and patches for QuPath. The slide is named by the path
    given (``slides._names``); ``record_resolved_path`` also records the file behind its
    links in the feature file (``slide_resolved_path``)."""

    slide: Path
    output: Path
    preview: Path | None = None
    geojson: Path | None = None
    record_resolved_path: bool = False


@dataclass
class SlideResult:
    """What the extraction did for one slide. ``error``: set (and nothing written) when
    ``extract_many`` could not do this slide; ``extract_slide`` raises instead."""

    slide_path: Path
    output: Path
    n_patches: int
    n_failed: int = 0
    n_nonfinite: int = 0
    n_grid: int = 0
    seconds: float = 0.0
    skipped: bool = False   # already complete, not recomputed
    resumed_at: int = 0     # grid position a partial run was continued from
    patches_run: int = 0    # patches put through the model in this call
    warnings: list[str] = field(default_factory=list)
    error: HistohubError | None = None


def skipped_result(job: SlideJob, done: dict[str, Any]) -> SlideResult:
    """The result for a job whose output was already complete (``_h5.find_done``'s record)."""
    log.info("%s: already done (%s); pass overwrite=True to redo it", job.slide.name,
             job.output)
    return SlideResult(job.slide, job.output, int(done["n_patches"]), int(done["n_failed"]),
                       int(done["n_nonfinite"]), int(done["n_grid"]), skipped=True)
