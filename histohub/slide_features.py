"""Whole slides -> HDF5 feature files (the CLAM/TRIDENT layout of ``histohub._h5``).

- ``extract_slide(model, slide, out_h5)``: one slide, tiled at the model's microns per
  pixel (``histohub.wsi``), patches read while the model runs, features appended batch by
  batch; resumable, corrupt tiles skipped.
- ``SlideExtractor(model)``: the same for a cohort, paying per slide only what is the
  slide's: the model is placed on its device (and compiled, see ``compile``) once, and
  ``extract_many`` prepares the next slide (output checks, fingerprint, tissue mask, grid,
  lock, partial file) in one background thread while the current slide runs, and runs the
  model in full batches across slide boundaries (``histohub.slide_stream``).

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
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _h5
from ._h5_writer import FeatureWriter
from .errors import HistohubError, SlideError
from .features import check_options
from .grid_preview import preview as write_preview
from .model_runner import ModelRunner, ModelSpec, model_fingerprint, resolve_model, tune_allocator
from .patch_batches import batch_ranges
from .slide_stream import Batch, CrossBatcher, Schedule, reader_stream, worker_stream
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
    """A slide made ready in the background: 'already done', or its grid with the output's
    lock held and its partial file open at ``ranges`` (the grid batches still to run)."""

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

    def release(self) -> None:
        """Close the partial file (kept, to be resumed) and free the lock; idempotent."""
        writer, lock, self.writer, self.lock = self.writer, self.lock, None, None
        if writer is not None:
            writer.close()
        if lock is not None:
            lock.release()


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
        (result,) = self._results([job], tiling, overwrite)
        if result.error is not None:
            raise result.error
        return result

    def extract_many(self, jobs: Iterable[SlideJob | tuple], *, tiling: Tiling = Tiling(),
                     overwrite: bool = False) -> Iterator[SlideResult]:
        """Extract ``jobs`` (``SlideJob`` or ``(slide, out_h5[, preview])``), yielding one
        ``SlideResult`` per job in order.

        The next slide's mask and grid are prepared while the current one runs, and the
        model's batches run across slide boundaries (``histohub.slide_stream``), so a cohort
        of small slides runs full batches. A slide that cannot be done (not a slide, no
        mpp, an output it must not replace, busy in another process, a full disk) gives a
        result with ``error`` set, and the others go on; any other exception stops it (the
        partial files stay, to be resumed).
        """
        tiling.check()
        jobs = [job if isinstance(job, SlideJob) else SlideJob(*map(_path, job))
                for job in jobs]
        yield from self._results(jobs, tiling, overwrite)

    def _results(self, jobs: list[SlideJob], tiling: Tiling, overwrite: bool
                 ) -> Iterator[SlideResult]:
        """Prepare (background thread) -> read (reader threads) -> model (full batches,
        across slides) -> write back per slide; results in job order."""
        from tqdm.auto import tqdm

        if not jobs:
            return
        self._fingerprint()  # once, here: the background thread then reads the cached digest
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histohub-prepare")
        schedule = Schedule(self._pool, jobs, lambda job: self._prepare(job, tiling, overwrite),
                            release=lambda unit: getattr(unit, "release", _nothing)())
        stream = self._stream(schedule)
        batcher = CrossBatcher(self._features, self.batch_size)
        bar = tqdm(total=0, unit="patch", desc="patches", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        results: dict[int, SlideResult] = {}
        seen: set[int] = set()
        tiled: list[int] = []
        due = 0
        try:
            for batch in chain(stream, [None]):
                if batch is None:
                    complete = batcher.finish()
                else:
                    if batch.slot not in seen:
                        seen.add(batch.slot)
                        self._admit(batch.unit, tiled, len(jobs) - batch.slot - 1, bar)
                    complete = batcher.add(batch)
                for done in complete:
                    self._write_back(done, jobs[done.slot], results, batcher, overwrite, bar)
                while due in results:
                    yield results.pop(due)
                    due += 1
        finally:
            stream.close()
            schedule.close()
            bar.close()

    # -- the stages

    def _fingerprint(self) -> str:
        return model_fingerprint(self.runner.eager)

    def _feature_dim_now(self) -> int:
        """The model's feature size; a module without ``histohub_info`` runs one forward
        pass, the first time a slide needs a file (never while the model runs a batch: the
        first file is opened before the first batch)."""
        if self._feature_dim is None:
            size = self.spec.preprocessing.input_size
            self._feature_dim = int(self.runner.run(torch.zeros(1, 3, size, size)).shape[1])
        return self._feature_dim

    def _prepare(self, job: SlideJob, tiling: Tiling, overwrite: bool) -> _Prepared:
        """Everything before the model: refuse foreign outputs, identify the request, find
        it done, or tile the slide (and draw the preview), take the output's lock and open
        its partial file (resumed where a killed run stopped)."""
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
                return _Prepared(job, request, started, done=done)
            grid = tile_grid(slide, target_mpp=target, patch_size=pre.input_size,
                             min_foreground=tiling.min_foreground, method=tiling.mask,
                             mpp_override=tiling.mpp)
            n_tissue = len(grid)
            if tiling.max_patches is not None:
                grid = replace(grid, coords=grid.coords[:tiling.max_patches],
                               foreground=grid.foreground[:tiling.max_patches])
            if job.preview is not None:
                _write_preview(slide, grid, job.preview)
        prepared = _Prepared(job, request, started, grid=grid, n_tissue=n_tissue,
                             lock=_output_lock(job.output))
        try:
            # under the lock: finished by another process meanwhile?
            done = None if overwrite else _h5.find_done(job.output, request,
                                                        max_patches=tiling.max_patches)
            if done is not None:
                prepared.release()
                return replace(prepared, done=done, grid=None)
            prepared.result = self._open(prepared, tiling, overwrite)
        except BaseException:
            prepared.release()
            raise
        return prepared

    def _open(self, prepared: _Prepared, tiling: Tiling, overwrite: bool) -> SlideResult:
        """The partial feature file (new or resumed) and the grid batches still to run."""
        job, grid = prepared.job, prepared.grid
        result = SlideResult(job.slide, job.output, 0, n_grid=len(grid))
        if len(grid) == 0:
            message = (f"{job.slide.name}: no patch has >= {tiling.min_foreground:.0%} tissue "
                       f"({tiling.mask} mask); the output holds no features. Try --mask otsu "
                       "or a lower --min-foreground, and check the preview (--preview)")
            log.warning(message)
            result.warnings.append(message)
        feature_dim = self._feature_dim_now()
        attrs = _h5.feature_attrs(prepared.request, grid, model_sha256=self.spec.sha256,
                                  feature_dim=feature_dim, n_tissue=prepared.n_tissue,
                                  max_patches=tiling.max_patches)
        prepared.writer = FeatureWriter(
            job.output, attrs=attrs, feature_dim=feature_dim,
            coords_attrs=_h5.coords_attrs(grid), resume=not overwrite,
            chunk_rows=max(1, min(CHUNK_ROWS, len(grid))))
        result.resumed_at = prepared.writer.next_index
        prepared.ranges = batch_ranges(result.resumed_at, len(grid), self.batch_size)
        return result

    def _stream(self, schedule: Schedule) -> Iterator[Batch]:
        """Every slide's batches in order, read ahead of the model by reader threads
        (batches dealt round-robin) or DataLoader worker processes."""
        interpolation = self.spec.preprocessing.interpolation
        if self.num_workers > 0:
            return worker_stream(schedule, num_workers=self.num_workers,
                                 interpolation=interpolation, pin_memory=self.runner.pin_memory)
        return reader_stream(schedule, threads=self.read_threads, interpolation=interpolation,
                             allocate=_pinned if self.runner.pin_memory else None)

    def _admit(self, unit: Any, tiled: list[int], slides_left: int, bar) -> None:
        """A slide's first batch is here: tell the runner how big the job is (compile?)."""
        if isinstance(unit, _Prepared) and unit.result is not None:
            tiled.append(len(unit.grid))
            self.runner.plan(_job_patches(tiled, slides_left))
            bar.total += len(unit.grid) - unit.result.resumed_at
            bar.set_postfix_str(unit.job.slide.name[:30], refresh=False)
            bar.refresh()

    def _features(self, pixels: torch.Tensor) -> np.ndarray:
        return self.runner.run_pixels(pixels).numpy()

    def _write_back(self, batch: Batch, job: SlideJob, results: dict[int, SlideResult],
                    batcher: CrossBatcher, overwrite: bool, bar) -> None:
        """Append a batch to its slide's file; after its last batch, finish the file."""
        unit = batch.unit
        if isinstance(unit, HistohubError):
            log.error("%s", unit)
            results[batch.slot] = SlideResult(job.slide, job.output, 0, error=unit)
            return
        if unit.done is not None:
            results[batch.slot] = _skipped(job, unit.done)
            return
        result = unit.result
        if result.error is not None:  # failed at an earlier batch (reported then)
            return
        try:
            if batch.positions is not None:
                self._append(unit, batch)
                result.patches_run += len(batch.positions)
                bar.update(len(batch.positions))
            if batch.last:
                _finish(unit, overwrite)
        except HistohubError as error:  # a full disk, an output that appeared meanwhile
            log.error("%s", error)
            result.error = error
            unit.release()
            batcher.drop(batch.slot)
        else:
            if not batch.last:
                return
        result.seconds = time.perf_counter() - unit.started
        results[batch.slot] = result

    def _append(self, unit: _Prepared, batch: Batch) -> None:
        grid, writer, ok = unit.grid, unit.writer, batch.ok
        features = batch.features if batch.features is not None else \
            np.zeros((0, writer.feature_dim), np.float32)
        nonfinite = np.zeros(0, np.int64)
        finite = np.isfinite(features).all(axis=1)
        if not finite.all():
            log.warning("%s: %d patches gave NaN/inf features, left out (coords %s)",
                        unit.job.slide.name, int((~finite).sum()),
                        grid.coords[ok[~finite]][:3].tolist())
            features, nonfinite, ok = features[finite], ok[~finite], ok[finite]
        writer.append(features, grid.coords[ok], next_index=batch.positions.stop,
                      failed_coords=grid.coords[batch.failed],
                      nonfinite_coords=grid.coords[nonfinite])


def _pinned(shape: tuple[int, ...]) -> np.ndarray:
    """A page-locked uint8 host array: the copy to the GPU runs asynchronously from it."""
    return torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy()


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


def _output_lock(out_h5: Path) -> Any:
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


def _finish(unit: _Prepared, overwrite: bool) -> None:
    """Rename the finished partial file into place, fill in the result, free the lock."""
    result, writer, name = unit.result, unit.writer, unit.job.slide.name
    result.n_patches, result.n_failed = writer.n_patches, writer.n_failed
    result.n_nonfinite = writer.n_nonfinite
    try:
        writer.finish(overwrite=overwrite)
    finally:
        unit.release()
    if result.n_failed:
        result.warnings.append(f"{name}: {result.n_failed} patches could not be read and "
                               "were skipped (failed_coords)")
    if result.n_nonfinite:
        result.warnings.append(f"{name}: {result.n_nonfinite} patches gave NaN/inf features "
                               "and were left out (nonfinite_coords)")


def _nothing() -> None:
    pass


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
    with SlideExtractor(model_or_name, device=device, batch_size=batch_size,
                        num_workers=num_workers, read_threads=read_threads, amp=amp,
                        compile=compile, progress=progress) as extractor:
        return extractor.extract(slide_path, out_h5, tiling=tiling, overwrite=overwrite,
                                 preview=preview)
