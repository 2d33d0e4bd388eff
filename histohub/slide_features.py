"""Whole slides -> HDF5 feature files (the CLAM/TRIDENT layout of ``histohub._h5``).

- ``extract_slide(model, slide, out_h5)``: one slide, tiled at the model's microns per
  pixel (``histohub.wsi``), patches read while the model runs, features appended batch by
  batch; resumable, corrupt tiles skipped.
- ``SlideExtractor(model)``: the same for a cohort, paying per slide only what is the
  slide's: the model is placed on its device (and compiled, see ``compile``) once, and
  ``extract_many`` prepares the next slide (output checks, fingerprint, tissue mask, grid)
  in one background thread while the current slide runs.

Nothing is lost and nothing is trusted by accident: options are checked before anything
runs (``check_options``, shared with the command line); a file histohub did not write is
never replaced; an existing feature file counts as done only for the same request (the
same slide contents, model weights, preprocessing and tiling, and no fewer patches); a
partial file is resumed only with the same weights and grid; a full disk is one clear
error (``DiskFullError``) and the partial file is removed. A lock beside each output keeps
concurrent processes on a shared folder from writing one slide twice: whoever holds it
checks again whether the slide is done.

Reading overlaps the model: ``read_threads`` reader threads (default 1; OpenSlide's reads,
JPEG decoding and PIL's resize release the GIL, so on 2 cores a thread costs the model far
less than worker processes do), or ``num_workers`` DataLoader worker processes (each opens
its own slide handle; pays off with a GPU and more cores). Batches stay uint8 until the
device: pinned host memory and a ``non_blocking`` copy on a GPU, normalisation there.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _h5
from .errors import HistohubError, SlideError
from .features import PREFETCH_BATCHES, check_options, interleave, prefetch
from .grid_preview import preview as write_preview
from .model_runner import ModelRunner, ModelSpec, model_fingerprint, resolve_model, tune_allocator
from .patch_batches import BatchReader, SlidePatches, batch_ranges, stack_patches
from .wsi import TileGrid, open_slide, slide_fingerprint, tile_grid

log = logging.getLogger(__name__)

#: Rows per HDF5 chunk at most (fewer for slides with fewer patches).
CHUNK_ROWS = 256


@dataclass(frozen=True)
class Tiling:
    """How slides are cut into patches.

    ``mpp``: the slides' microns per pixel, for files that do not record it.
    ``target_mpp``: tile at this mpp (default: the model's). ``mask``: 'hsv' (the paper's
    rule) or 'otsu'. ``min_foreground``: tissue fraction a patch needs. ``max_patches``:
    keep the first N grid patches (for quick trials).
    """

    mpp: float | None = None
    target_mpp: float | None = None
    mask: str = "hsv"
    min_foreground: float = 0.5
    max_patches: int | None = None

    def check(self) -> None:
        check_options(mpp=self.mpp, target_mpp=self.target_mpp, mask=self.mask,
                      min_foreground=self.min_foreground, max_patches=self.max_patches)


@dataclass(frozen=True)
class SlideJob:
    """One slide to extract: its file, the feature file, and an optional preview PNG."""

    slide: Path
    output: Path
    preview: Path | None = None


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


@dataclass
class _Prepared:
    """A slide made ready in the background: its request and grid, or 'already done'."""

    job: SlideJob
    request: dict[str, Any]
    done: dict[str, Any] | None = None
    grid: TileGrid | None = None
    n_tissue: int = 0
    seconds: float = 0.0


class SlideExtractor:
    """A model ready for slide after slide: loaded, placed and compiled once.

    ``model_or_name``: an ``nn.Module`` or a name / checkpoint path for ``load_pretrained``.
    ``device``: 'cpu', 'cuda', 'cuda:1', ... ``batch_size``: patches per forward pass.
    ``read_threads``: reader threads (1 or 2); ``num_workers``: DataLoader worker processes
    instead (0: threads). ``amp``: autocast (True = bfloat16, or 'fp16').
    ``compile``: ``torch.compile`` the model: True, False, or "auto" (default): on a CPU,
    once the job holds ``features.COMPILE_MIN_PATCHES`` patches (not on a GPU, where
    reading is the bottleneck); once, never again for the next slide.

    >>> with SlideExtractor("resnet18-ssl") as extractor:       # doctest: +SKIP
    ...     for result in extractor.extract_many(jobs, tiling=Tiling(mpp=0.25)):
    ...         print(result.slide_path.name, result.error or result.n_patches)
    """

    def __init__(self, model_or_name: nn.Module | str | os.PathLike, *,
                 device: str | torch.device = "cpu", batch_size: int = 64,
                 num_workers: int = 0, read_threads: int = 1, amp: bool | str = False,
                 compile: bool | str = "auto", progress: bool = True) -> None:
        check_options(batch_size=batch_size, num_workers=num_workers,
                      read_threads=read_threads, amp=amp, compile=compile)
        device = torch.device(device)
        if device.type == "cpu":
            tune_allocator()
        model, self.spec = resolve_model(model_or_name, device=device, progress=progress)
        self.runner = ModelRunner(model, device=device, amp=amp, compile=compile,
                                  batch_size=batch_size, preprocessing=self.spec.preprocessing)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.read_threads, self.progress = read_threads, progress
        self._feature_dim = self.spec.feature_dim
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> SlideExtractor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the background thread that prepares slides (the model stays usable)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # -- one slide, many slides

    def extract(self, slide_path: str | os.PathLike, out_h5: str | os.PathLike, *,
                tiling: Tiling = Tiling(), overwrite: bool = False,
                preview: str | os.PathLike | None = None) -> SlideResult:
        """Features of every tissue patch of one slide into ``out_h5`` (``extract_slide``
        says what is kept, resumed or refused). Errors are raised."""
        tiling.check()
        job = SlideJob(Path(slide_path), Path(out_h5), None if preview is None else Path(preview))
        prepared = self._prepare(job, tiling, overwrite)
        if prepared.grid is not None:
            self.runner.plan(len(prepared.grid))
        return self._run(prepared, tiling, overwrite)

    def extract_many(self, jobs: Iterable[SlideJob | tuple], *, tiling: Tiling = Tiling(),
                     overwrite: bool = False) -> Iterator[SlideResult]:
        """Extract ``jobs`` (``SlideJob`` or ``(slide, out_h5[, preview])``) in order,
        preparing the next slide's mask and grid while the current one runs.

        Yields one ``SlideResult`` per job. A slide that cannot be done (not a slide, no
        mpp, an output it must not replace, busy in another process, a full disk) gives a
        result with ``error`` set, and the others go on; any other exception stops it.
        """
        tiling.check()
        jobs = [job if isinstance(job, SlideJob) else SlideJob(*map(_path, job))
                for job in jobs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histohub-prepare")
        self._fingerprint()  # once, here: the background thread then reads the cached digest
        pending: Future | None = None
        if jobs:
            pending = self._pool.submit(self._prepare, jobs[0], tiling, overwrite)
        tiled: list[int] = []
        for index, job in enumerate(jobs):
            current, pending = pending, None
            if index + 1 < len(jobs):
                pending = self._pool.submit(self._prepare, jobs[index + 1], tiling, overwrite)
            started = time.perf_counter()
            try:
                prepared = current.result()
                if prepared.grid is not None:
                    tiled.append(len(prepared.grid))
                    self.runner.plan(_job_patches(tiled, len(jobs) - index - 1))
                result = self._run(prepared, tiling, overwrite)
            except HistohubError as error:
                log.error("%s", error)
                result = SlideResult(job.slide, job.output, 0, error=error,
                                     seconds=time.perf_counter() - started)
            yield result

    # -- the two halves

    def _fingerprint(self) -> str:
        return model_fingerprint(self.runner.eager)

    def _prepare(self, job: SlideJob, tiling: Tiling, overwrite: bool) -> _Prepared:
        """Everything before the model: refuse foreign outputs, identify the request, find
        it done, or tile the slide (and draw the preview)."""
        started = time.perf_counter()
        if not overwrite:
            _h5.refuse_foreign(job.output)
        pre = self.spec.preprocessing
        target = tiling.target_mpp if tiling.target_mpp is not None else pre.mpp
        if target is None:
            raise SlideError(f"the model {self.spec.name!r} does not state the microns per "
                             "pixel it expects; pass target_mpp= (--target-mpp), e.g. 0.5")
        with open_slide(job.slide) as slide:
            request = _request(self.spec, self._fingerprint(), slide, tiling, target)
            done = None if overwrite else _h5.find_done(job.output, request,
                                                        max_patches=tiling.max_patches)
            if done is not None:
                return _Prepared(job, request, done=done)
            grid = tile_grid(slide, target_mpp=target, patch_size=pre.input_size,
                             min_foreground=tiling.min_foreground, method=tiling.mask,
                             mpp_override=tiling.mpp)
            n_tissue = len(grid)
            if tiling.max_patches is not None:
                grid = replace(grid, coords=grid.coords[:tiling.max_patches],
                               foreground=grid.foreground[:tiling.max_patches])
            if job.preview is not None:
                _write_preview(slide, grid, job.preview)
        return _Prepared(job, request, grid=grid, n_tissue=n_tissue,
                         seconds=time.perf_counter() - started)

    def _run(self, prepared: _Prepared, tiling: Tiling, overwrite: bool) -> SlideResult:
        """Under the output's lock: done by now (another process)? else run the grid."""
        started = time.perf_counter() - prepared.seconds
        job = prepared.job
        if prepared.done is not None:
            return _skipped(job, prepared.done)
        with _output_lock(job.output):
            done = None if overwrite else _h5.find_done(job.output, prepared.request,
                                                        max_patches=tiling.max_patches)
            if done is not None:  # finished by another process meanwhile
                return _skipped(job, done)
            result = self._write(prepared, tiling, overwrite)
        result.seconds = time.perf_counter() - started
        return result

    def _write(self, prepared: _Prepared, tiling: Tiling, overwrite: bool) -> SlideResult:
        job, grid = prepared.job, prepared.grid
        result = SlideResult(job.slide, job.output, 0, n_grid=len(grid))
        if len(grid) == 0:
            message = (f"{job.slide.name}: no patch has >= {tiling.min_foreground:.0%} tissue "
                       f"({tiling.mask} mask); the output holds no features. Try --mask otsu "
                       "or a lower --min-foreground, and check the preview (--preview)")
            log.warning(message)
            result.warnings.append(message)
        if self._feature_dim is None:  # a module without histohub_info: one forward pass
            size = self.spec.preprocessing.input_size
            self._feature_dim = int(self.runner.run(torch.zeros(1, 3, size, size)).shape[1])
        attrs = _h5.feature_attrs(prepared.request, grid, model_sha256=self.spec.sha256,
                                  feature_dim=self._feature_dim, n_tissue=prepared.n_tissue,
                                  max_patches=tiling.max_patches)
        writer = _h5.FeatureWriter(job.output, attrs=attrs, feature_dim=self._feature_dim,
                                   coords_attrs=_h5.coords_attrs(grid), resume=not overwrite,
                                   chunk_rows=max(1, min(CHUNK_ROWS, len(grid))))
        try:
            result.resumed_at = writer.next_index
            self._run_grid(writer, grid, result)
            result.n_patches, result.n_failed = writer.n_patches, writer.n_failed
            result.n_nonfinite = writer.n_nonfinite
            writer.finish(overwrite=overwrite)
        finally:
            writer.close()
        if result.n_failed:
            result.warnings.append(f"{job.slide.name}: {result.n_failed} patches could not "
                                   "be read and were skipped (failed_coords)")
        if result.n_nonfinite:
            result.warnings.append(f"{job.slide.name}: {result.n_nonfinite} patches gave "
                                   "NaN/inf features and were left out (nonfinite_coords)")
        return result

    # -- the grid through the model

    def _run_grid(self, writer: _h5.FeatureWriter, grid: TileGrid, result: SlideResult
                  ) -> None:
        from tqdm.auto import tqdm

        ranges = batch_ranges(writer.next_index, len(grid), self.batch_size)
        name = Path(grid.slide_path).name
        with tqdm(total=len(grid), initial=writer.next_index, unit="patch", desc=name[:30],
                  disable=not self.progress, leave=False, dynamic_ncols=True) as bar:
            for positions, (pixels, ok, failed) in zip(ranges, self._batches(grid, ranges)):
                features = np.zeros((0, writer.feature_dim), np.float32)
                nonfinite = np.zeros(0, np.int64)
                if len(ok):
                    out = self.runner.run_pixels(torch.as_tensor(pixels)).numpy()
                    finite = np.isfinite(out).all(axis=1)
                    if not finite.all():
                        log.warning("%s: %d patches gave NaN/inf features, left out (coords "
                                    "%s)", name, int((~finite).sum()),
                                    grid.coords[ok[~finite]][:3].tolist())
                    features, nonfinite, ok = out[finite], ok[~finite], ok[finite]
                writer.append(features, grid.coords[ok], next_index=positions.stop,
                              failed_coords=grid.coords[failed],
                              nonfinite_coords=grid.coords[nonfinite])
                result.patches_run += len(positions)
                bar.update(len(positions))

    def _batches(self, grid: TileGrid, ranges: list[range]) -> Iterator:
        """``(uint8 (b, S, S, 3), positions read, positions failed)`` for each range, read
        ahead of the model by reader threads (batches dealt round-robin) or processes."""
        interpolation = self.spec.preprocessing.interpolation
        if self.num_workers > 0:
            return _worker_batches(grid, ranges, interpolation, self.num_workers,
                                   self.runner.pin_memory)
        allocate = _pinned if self.runner.pin_memory else None
        threads = max(1, min(self.read_threads, len(ranges)))
        depth = max(1, PREFETCH_BATCHES // threads)
        return interleave([
            prefetch(BatchReader(grid, interpolation=interpolation, allocate=allocate)
                     .read_all(ranges[k::threads]), depth=depth)
            for k in range(threads)])


def _pinned(shape: tuple[int, ...]) -> np.ndarray:
    """A page-locked uint8 host array: the copy to the GPU runs asynchronously from it."""
    return torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy()


def _worker_batches(grid: TileGrid, ranges: list[range], interpolation: str,
                    num_workers: int, pin_memory: bool) -> Iterator:
    """Read batches in DataLoader worker processes (each with its own slide handle)."""
    loader = torch.utils.data.DataLoader(
        SlidePatches(grid, interpolation), batch_sampler=ranges,
        num_workers=num_workers, pin_memory=pin_memory, collate_fn=stack_patches,
        multiprocessing_context="spawn" if sys.platform == "darwin" else None)
    for positions, (pixels, ok) in zip(ranges, loader):
        positions = np.asarray(positions, np.int64)
        yield pixels, positions[ok], positions[~ok]


def _job_patches(tiled: list[int], slides_left: int) -> int:
    """Patches still to come: the slide about to run, plus the slides left at the mean
    size of the slides tiled so far."""
    return tiled[-1] + round(slides_left * sum(tiled) / len(tiled))


def _path(value: Any) -> Path | None:
    return None if value is None else Path(value)


def _skipped(job: SlideJob, done: dict[str, Any]) -> SlideResult:
    log.info("%s: already done (%s); pass overwrite=True to redo it", job.slide.name,
             job.output)
    return SlideResult(job.slide, job.output, int(done["n_patches"]), int(done["n_failed"]),
                       int(done["n_nonfinite"]), int(done["n_grid"]), skipped=True)


def _request(spec: ModelSpec, fingerprint: str, slide, tiling: Tiling, target_mpp: float
             ) -> dict[str, Any]:
    """The ``REQUEST_ATTRS`` of this call, known without tiling the slide."""
    from .wsi import _slide_mpp

    pre = spec.preprocessing
    size, slide_digest = slide_fingerprint(slide.path)
    mpp = tiling.mpp
    return {
        "model_name": spec.name, "arch": spec.arch, "model_fingerprint": fingerprint,
        "norm_mean": tuple(float(v) for v in pre.mean),
        "norm_std": tuple(float(v) for v in pre.std), "interpolation": pre.interpolation,
        "slide_size": size, "slide_fingerprint": slide_digest,
        "slide_width": slide.dimensions[0], "slide_height": slide.dimensions[1],
        # as tile_grid will take it (an mpp given by the user is checked, and warned about, there)
        "slide_mpp": float(mpp) if mpp is not None else _slide_mpp(slide, None)[0],
        "target_mpp": float(target_mpp), "patch_size": pre.input_size,
        "mask_method": tiling.mask, "min_foreground": float(tiling.min_foreground),
    }


def _write_preview(slide, grid: TileGrid, path: Path) -> None:
    try:
        write_preview(slide, grid, path)
    except OSError as error:
        if not _h5.is_disk_full(error):
            raise
        path.unlink(missing_ok=True)
        raise _h5.disk_full_error(path, error) from error


@contextmanager
def _output_lock(out_h5: Path) -> Iterator[None]:
    """Hold ``.<name>.h5.lock`` next to the output so two processes never write one slide
    (released by the system if the holder dies)."""
    from filelock import FileLock, Timeout

    out_h5.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out_h5.parent / f".{out_h5.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise HistohubError(f"{out_h5} is being written by another histohub process; "
                            "skipped (run again once it has finished)") from None
    try:
        yield
    finally:
        lock.release()


def extract_slide(model_or_name: nn.Module | str | os.PathLike, slide_path: str | os.PathLike,
                  out_h5: str | os.PathLike, *, mpp: float | None = None,
                  target_mpp: float | None = None, batch_size: int = 64,
                  device: str | torch.device = "cpu", num_workers: int = 0,
                  read_threads: int = 1, amp: bool | str = False,
                  compile: bool | str = "auto", mask: str = "hsv",
                  min_foreground: float = 0.5, overwrite: bool = False,
                  preview: str | os.PathLike | None = None, max_patches: int | None = None,
                  progress: bool = True) -> SlideResult:
    """Features of every tissue patch of a slide, streamed into an HDF5 file.

    Tiles the slide at ``target_mpp`` (default: the model's, from the manifest; 0.5 um/px
    for the paper's models) with 224 px patches holding at least ``min_foreground`` tissue
    (``mask``: the paper's 'hsv' rule or 'otsu'), reads them while the model runs, and
    appends ``features`` (N, D) and ``coords`` (N, 2) to ``out_h5`` (layout:
    ``histohub._h5``). ``mpp`` gives the slide's microns per pixel when the file lacks it.
    ``max_patches`` keeps the first N grid patches (for quick trials). ``preview``: write a
    PNG of the mask and grid there. Corrupt tiles are logged, recorded in ``failed_coords``
    and skipped; NaN/inf features go to ``nonfinite_coords`` with a warning. The model and
    reader options are ``SlideExtractor``'s; for many slides, use one ``SlideExtractor``
    (the model is placed and compiled once, the next slide prepared meanwhile).

    Options are checked first (``OptionError``). Unless ``overwrite``:

    - a file at ``out_h5`` that histohub did not write raises ``OutputExistsError``;
    - a complete ``out_h5`` made for this request (same slide contents, model weights,
      preprocessing, mpp, tiling) is left alone (``skipped``); one from a ``max_patches``
      trial that this call extends is redone; one made for another request, or holding more
      patches than asked for, raises ``OutputExistsError`` saying what differs;
    - a ``.partial`` file from a killed run is resumed when it was made with the same
      weights and grid, and started over (with a warning) otherwise.

    A full disk raises ``DiskFullError`` (an OSError) and removes the partial file.
    """
    tiling = Tiling(mpp=mpp, target_mpp=target_mpp, mask=mask, min_foreground=min_foreground,
                    max_patches=max_patches)
    check_options(batch_size=batch_size, num_workers=num_workers, read_threads=read_threads,
                  amp=amp, compile=compile)
    tiling.check()
    if not overwrite:
        _h5.refuse_foreign(out_h5)  # before the model loads
    extractor = SlideExtractor(model_or_name, device=device, batch_size=batch_size,
                               num_workers=num_workers, read_threads=read_threads, amp=amp,
                               compile=compile, progress=progress)
    return extractor.extract(slide_path, out_h5, tiling=tiling, overwrite=overwrite,
                             preview=preview)
