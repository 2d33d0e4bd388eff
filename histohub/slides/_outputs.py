"""A slide's feature file while it is written: the request that identifies it
(``request_attrs``), the lock beside it (``output_lock``), the file open at its resume point
(``OpenOutput``: batches appended, then finished and renamed), and the preview written
without leaving a half-written PNG on a full disk."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histohub.featurefile import _layout as _h5
from histohub.featurefile._writer import FeatureWriter
from histohub.errors import HistohubError
from histohub.slides._preview import preview as draw_preview
from histohub.hub._descriptor import ModelDescriptor
from histohub.slides._jobs import SlideJob, SlideResult, Tiling
from histohub.slides._names import given_path, resolved_path
from histohub.slides._stream import Batch
from histohub.slides._reader import Slide, slide_fingerprint
from histohub.slides._tiling import TileGrid

log = logging.getLogger(__name__)


@dataclass
class OpenOutput:
    """A slide made ready to run: 'already done' (``done``), or its ``grid`` with the
    output's ``lock`` held and its partial file open (``writer``) at ``ranges``, the grid
    batches still to run, and the ``slide`` handle that tiled it, for a reader to take over
    (``take_slide``)."""

    job: SlideJob
    request: dict[str, Any]
    started: float
    done: dict[str, Any] | None = None
    grid: TileGrid | None = None
    n_tissue: int = 0
    writer: FeatureWriter | None = None
    lock: Any = None
    ranges: list[range] = field(default_factory=list)
    result: SlideResult | None = None
    slide: Slide | None = None

    def take_slide(self) -> Slide | None:
        """The open slide handle, now the caller's to close (None when already taken)."""
        slide, self.slide = self.slide, None
        return slide

    def release(self, *, finished: bool = False) -> None:
        """Close the partial file (kept, to be resumed), free the lock, close the slide
        handle unless a reader took it; idempotent. ``finished``: the output is complete, so
        the lock file is removed while still held (whoever takes a new lock on that name
        finds the output done): a clean run leaves no ``.lock`` behind."""
        writer, lock, slide = self.writer, self.lock, self.take_slide()
        self.writer = self.lock = None
        if writer is not None:
            writer.close()
        if lock is not None:
            if finished:
                Path(lock.lock_file).unlink(missing_ok=True)
            lock.release()
        if slide is not None:
            slide.close()

    def append(self, batch: Batch) -> None:
        """Append one batch (``features`` set); NaN/inf rows go to ``nonfinite_coords``."""
        grid, writer, ok = self.grid, self.writer, batch.ok
        features = batch.features if batch.features is not None else \
            np.zeros((0, writer.feature_dim), np.float32)
        nonfinite = np.zeros(0, np.int64)
        finite = np.isfinite(features).all(axis=1)
        if not finite.all():
            log.warning("%s: %d patches gave NaN/inf features, left out (coords %s)",
                        self.job.slide.name, int((~finite).sum()),
                        grid.coords[ok[~finite]][:3].tolist())
            features, nonfinite, ok = features[finite], ok[~finite], ok[finite]
        writer.append(features, grid.coords[ok], next_index=batch.positions.stop,
                      failed_coords=grid.coords[batch.failed],
                      nonfinite_coords=grid.coords[nonfinite])

    def finish(self, overwrite: bool) -> None:
        """Rename the finished partial file into place, fill in the result, free the lock."""
        result, writer, name = self.result, self.writer, self.job.slide.name
        result.n_patches, result.n_failed = writer.n_patches, writer.n_failed
        result.n_nonfinite = writer.n_nonfinite
        try:
            writer.finish(overwrite=overwrite)
        except BaseException:
            self.release()
            raise
        self.release(finished=True)
        if result.n_failed:
            result.warnings.append(f"{name}: {result.n_failed} patches could not be read and "
                                   "were skipped (failed_coords)")
        if result.n_nonfinite:
            result.warnings.append(f"{name}: {result.n_nonfinite} patches gave NaN/inf features "
                                   "and were left out (nonfinite_coords)")


def name_attrs(job: SlideJob) -> dict[str, str]:
    """The attributes naming the job's slide in its feature file (``_layout.NAME_ATTRS``):
    the path and name given, links not followed; ``slide_resolved_path`` only when the
    job asks for it."""
    names = {"slide_path": str(given_path(job.slide)), "slide_name": job.slide.name}
    if job.record_resolved_path:
        names["slide_resolved_path"] = resolved_path(job.slide)
    return names


def request_attrs(spec: ModelDescriptor, fingerprint: str, slide, tiling: Tiling, target_mpp: float,
                  *, roi: str = "", coords_from: str = "") -> dict[str, Any]:
    """The ``REQUEST_ATTRS`` of this call, known without tiling the slide (``roi``,
    ``coords_from``: digests of the ROI and of the coordinates file, "" without)."""
    from histohub.slides._tiling import _slide_mpp

    pre = spec.preprocessing
    size, slide_digest = slide_fingerprint(slide.path)
    mpp = tiling.mpp
    return {
        "model_name": spec.name, "arch": spec.arch or "", "model_fingerprint": fingerprint,
        "norm_mean": tuple(float(v) for v in pre.mean),
        "norm_std": tuple(float(v) for v in pre.std), "interpolation": pre.interpolation,
        "slide_size": size, "slide_fingerprint": slide_digest,
        "slide_width": slide.dimensions[0], "slide_height": slide.dimensions[1],
        # as tile_grid will take it (an mpp given by the user is checked, and warned about, there)
        "slide_mpp": float(mpp) if mpp is not None else _slide_mpp(slide, None)[0],
        "target_mpp": float(target_mpp), "patch_size": pre.input_size,
        "mask_method": tiling.mask, "min_foreground": float(tiling.min_foreground),
        "roi": roi, "coords_from": coords_from,
    }


def write_preview(slide, grid: TileGrid, path: Path) -> None:
    try:
        draw_preview(slide, grid, path)
    except OSError as error:
        if not _h5.is_disk_full(error):
            raise
        path.unlink(missing_ok=True)
        raise _h5.disk_full_error(path, error) from error


def write_grid_geojson(grid: TileGrid, path: Path) -> None:
    """The grid's tissue contours (annotations) and patches (tiles) as GeoJSON for QuPath."""
    from histohub.slides._qupath import patch_features, tissue_features, write_geojson

    try:
        write_geojson(path, tissue_features(grid) + patch_features(grid.coords,
                                                                   grid.patch_size_level0))
    except OSError as error:
        if not _h5.is_disk_full(error):
            raise
        raise _h5.disk_full_error(path, error) from error


def output_lock(out_h5: Path) -> Any:
    """Take ``.<name>.h5.lock`` next to the output so two processes never write one slide
    (released by the system if the holder dies); returns the held lock (any thread may
    release it)."""
    from filelock import FileLock, Timeout

    out_h5.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out_h5.parent / f".{out_h5.name}.lock"), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise HistohubError(f"{out_h5} is being written by another histohub process; "
                            "skipped (run again once it has finished)") from None
    return lock


def warm_imports() -> None:
    """Import what opening an output needs (h5py, filelock) in the calling thread, so that
    the thread tiling the first slide does not pay for it."""
    import filelock  # noqa: F401

    _h5._h5py()
