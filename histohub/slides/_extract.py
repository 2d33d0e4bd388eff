"""Whole slides -> HDF5 feature files (the CLAM/TRIDENT layout of ``histohub.featurefile._layout``).

- ``extract_slide(model, slide, out_h5)``: one slide, tiled at the model's microns per
  pixel (``histohub.slides._reader``), patches read while the model runs, features appended batch by
  batch; resumable, corrupt tiles skipped.
- ``SlideExtractor(model)``: the same for a cohort, paying per slide only what is the
  slide's: the model is placed on its device (and compiled, see ``compile``) once, and
  ``extract_many`` prepares the next slide (output checks, fingerprint, tissue mask, grid,
  lock, partial file) in one background thread while the current slide runs, and runs the
  model in full batches across slide boundaries (``histohub.slides._stream``).

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

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histohub.featurefile import _layout as _h5
from histohub.featurefile._writer import FeatureWriter
from histohub.errors import HistohubError, MissingDependencyError, SlideError
from histohub._features import check_options
from histohub.slides._preview import grid_summary
from histohub.hub._runner import (ModelRunner, local_model_spec, model_fingerprint, resolve_model,
                                  tune_allocator)
from histohub.slides._batches import batch_ranges, pinned
from histohub.slides._jobs import SlideJob, SlideResult, Tiling, skipped_result
from histohub.slides._outputs import (OpenOutput, output_lock, request_attrs, warm_imports,
                                      write_preview)
from histohub.slides._stream import Batch, CrossBatcher, Schedule, reader_stream, worker_stream
from histohub.slides._coords import coords_grid
from histohub.slides._outputs import name_attrs, write_grid_geojson
from histohub.slides._reader import open_slide
from histohub.slides._regions import SlideRegions, slide_regions
from histohub.slides._tiling import _slide_mpp, tile_grid
from histohub.slides._tissue import DEFAULT_MASK

# h5py and filelock are imported with this module, while nothing else runs: imported beside
# the thread that tiles the first slide, h5py's import took up to 8x longer (0.15-0.2 s)
with contextlib.suppress(MissingDependencyError):  # said when a slide needs them
    warm_imports()

log = logging.getLogger(__name__)

#: Rows per HDF5 chunk at most (fewer for slides with fewer patches).
CHUNK_ROWS = 256


class SlideExtractor:
    """A model ready for slide after slide: loaded, placed and compiled once.

    ``model_or_name``: an ``nn.Module`` or a name / checkpoint path for ``load_pretrained``.
    ``device``: 'cpu', 'cuda', 'cuda:1', ... ``batch_size``: patches per forward pass.
    ``read_threads``: reader threads (1 or 2); ``num_workers``: DataLoader worker processes
    instead (0: threads). ``amp``: autocast (True = bfloat16, or 'fp16').
    ``compile``: ``torch.compile`` the model: True, False, or "auto" (default): on a CPU,
    once the job holds ``model_runner.COMPILE_MIN_PATCHES`` patches (not on a GPU, where
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
        # weights already here (a checkpoint file, a bundled or a cached and verified model)
        # load while the first slide is tiled; a download happens now, so a failed one is
        # reported before any slide is touched
        self._model: nn.Module | None = None
        spec = local_model_spec(model_or_name)
        self._model_source = spec  # loaded as described: name or file is decided once
        if spec is None:
            self._model, spec = resolve_model(model_or_name, device=device, progress=progress)
        self.spec = spec
        self._runner_options = dict(device=device, amp=amp, compile=compile,
                                    batch_size=batch_size,
                                    preprocessing=self.spec.preprocessing, fingerprint=True)
        self._runner: ModelRunner | None = None
        self._runner_error: Exception | None = None
        self._runner_lock = threading.Lock()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.read_threads, self.progress = read_threads, progress
        self._feature_dim = self.spec.feature_dim
        self._pool: ThreadPoolExecutor | None = None

    @property
    def runner(self) -> ModelRunner:
        """The model loaded (when it was not yet) and placed on its device (fingerprinted,
        channels_last), made on first use: ``extract_many`` makes it while the background
        thread tiles the first slide. A failure is raised again, not retried."""
        with self._runner_lock:
            if self._runner_error is not None:
                raise self._runner_error
            if self._runner is None:
                try:
                    if self._model is None:
                        self._model, self.spec = resolve_model(
                            self._model_source, device=self._runner_options["device"],
                            progress=self.progress)
                    self._runner = ModelRunner(self._model, **self._runner_options)
                except Exception as error:
                    self._runner_error = error
                    raise
            return self._runner

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
        model's batches run across slide boundaries (``histohub.slides._stream``), so a cohort
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
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histohub-prepare")
        schedule = Schedule(self._pool, jobs, lambda job: self._prepare(job, tiling, overwrite),
                            release=lambda unit: getattr(unit, "release", _nothing)())
        batcher = CrossBatcher(self._features, self.batch_size)
        bar = tqdm(total=0, unit="patch", desc="patches", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        results: dict[int, SlideResult] = {}
        seen: set[int] = set()
        tiled: list[int] = []
        due, stream = 0, None
        try:
            warm_imports()  # a missing h5py is said before any thread starts
            schedule.start()  # the first slide is tiled while the model is made ready here
            self._fingerprint()
            stream = self._stream(schedule)
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
                    if done.last:
                        schedule.finished(done.slot)  # its grid is freed now, not at the end
                while due in results:
                    yield results.pop(due)
                    due += 1
        finally:  # stop the readers, then free what the background thread opened
            if stream is not None:
                stream.close()
            schedule.close()
            bar.close()

    # -- the stages

    def _fingerprint(self) -> str:
        return model_fingerprint(self.runner.eager)

    def _feature_dim_now(self) -> int:
        """The model's feature size: known from its spec, or once its weights are loaded;
        a module without ``histohub_info`` runs one forward pass, the first time a slide
        needs a file (never while the model runs a batch: the first file is opened before
        the first batch)."""
        if self._feature_dim is None:
            runner = self.runner  # a checkpoint file's architecture is known once it is read
            self._feature_dim = self.spec.feature_dim
            if self._feature_dim is None:
                size = self.spec.preprocessing.input_size
                self._feature_dim = int(runner.run(torch.zeros(1, 3, size, size)).shape[1])
        return self._feature_dim

    def _prepare(self, job: SlideJob, tiling: Tiling, overwrite: bool) -> OpenOutput:
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
        # the handle stays open for the first reader (its tile cache holds the mask's tiles)
        prepared = OpenOutput(job, {}, started, slide=open_slide(job.slide))
        try:
            slide = prepared.slide
            regions = slide_regions(tiling, slide)
            if regions.coords is not None:  # the coordinates file sets the patches' mpp
                target = _slide_mpp(slide, tiling.mpp)[0] * regions.size0 / pre.input_size
            said = not overwrite and job.output.exists()  # found done before tiling? (find_done
            if said:  # says a trial is extended once: here)
                prepared.request = self._request(slide, tiling, target, regions)
                done = _h5.find_done(job.output, prepared.request,
                                     max_patches=tiling.max_patches)
                if done is not None:
                    prepared.release()
                    return replace(prepared, done=done)
            if regions.coords is not None:
                grid = coords_grid(slide, regions.coords, regions.size0,
                                   patch_size=pre.input_size, method=tiling.mask,
                                   mpp_override=tiling.mpp)
            else:
                grid = tile_grid(slide, target_mpp=target, patch_size=pre.input_size,
                                 min_foreground=tiling.min_foreground, method=tiling.mask,
                                 mpp_override=tiling.mpp, roi=regions.roi)
            prepared.n_tissue = len(grid)
            log.info("%s: %s", job.slide.name, grid_summary(grid))
            if tiling.max_patches is not None:
                grid = replace(grid, coords=grid.coords[:tiling.max_patches],
                               foreground=grid.foreground[:tiling.max_patches])
            prepared.grid = grid
            if job.preview is not None:
                write_preview(slide, grid, job.preview)
            if job.geojson is not None:
                write_grid_geojson(grid, job.geojson)
            # a new output needs the model's fingerprint only now: made meanwhile
            prepared.request = prepared.request or self._request(slide, tiling, target,
                                                                 regions)
            prepared.lock = output_lock(job.output)  # then: finished by another meanwhile?
            done = None if overwrite else _h5.find_done(
                job.output, prepared.request, max_patches=tiling.max_patches, say_trial=not said)
            if done is not None:
                prepared.release(finished=True)
                return replace(prepared, done=done, grid=None)
            prepared.result = self._open(prepared, tiling, overwrite)
        except BaseException:
            prepared.release()
            raise
        return prepared

    def _request(self, slide, tiling: Tiling, target_mpp: float, regions: SlideRegions
                 ) -> dict[str, Any]:
        fingerprint = self._fingerprint()  # first: it loads the weights and settles spec
        return request_attrs(self.spec, fingerprint, slide, tiling, target_mpp,
                             roi=regions.roi_digest, coords_from=regions.coords_digest)

    def _open(self, prepared: OpenOutput, tiling: Tiling, overwrite: bool) -> SlideResult:
        """The partial feature file (new or resumed) and the grid batches still to run."""
        job, grid = prepared.job, prepared.grid
        result = SlideResult(job.slide, job.output, 0, n_grid=len(grid))
        if len(grid) == 0:
            message = (f"{job.slide.name}: no patch has >= {tiling.min_foreground:.0%} tissue "
                       f"({tiling.mask} mask); the output holds no features. Try another --mask "
                       "or a lower --min-foreground, and check the preview (--preview)")
            log.warning(message)
            result.warnings.append(message)
        feature_dim = self._feature_dim_now()
        attrs = _h5.feature_attrs(prepared.request, grid, names=name_attrs(job),
                                  model_sha256=self.spec.sha256 or "", feature_dim=feature_dim,
                                  n_tissue=prepared.n_tissue, max_patches=tiling.max_patches)
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
                             allocate=pinned if self.runner.pin_memory else None)

    def _admit(self, unit: Any, tiled: list[int], slides_left: int, bar) -> None:
        """A slide's first batch is here: tell the runner how big the job is (compile?)."""
        if isinstance(unit, OpenOutput) and unit.result is not None:
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
            results[batch.slot] = skipped_result(job, unit.done)
            return
        result = unit.result
        if result.error is not None:  # failed at an earlier batch (reported then)
            return
        try:
            if batch.positions is not None:
                unit.append(batch)
                result.patches_run += len(batch.positions)
                bar.update(len(batch.positions))
            if batch.last:
                unit.finish(overwrite)
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


def _job_patches(tiled: list[int], slides_left: int) -> int:
    """Patches still to come: the slide about to run, plus the slides left at the mean
    size of the slides tiled so far."""
    return tiled[-1] + round(slides_left * sum(tiled) / len(tiled))


def _path(value: Any) -> Path | None:
    return None if value is None else Path(value)


def _nothing() -> None:
    pass


def extract_slide(model_or_name: nn.Module | str | os.PathLike, slide_path: str | os.PathLike,
                  out_h5: str | os.PathLike, *, mpp: float | None = None,
                  target_mpp: float | None = None, batch_size: int = 64,
                  device: str | torch.device = "cpu", num_workers: int = 0,
                  read_threads: int = 1, amp: bool | str = False,
                  compile: bool | str = "auto", mask: str = DEFAULT_MASK,
                  min_foreground: float = 0.5, overwrite: bool = False,
                  preview: str | os.PathLike | None = None, max_patches: int | None = None,
                  progress: bool = True) -> SlideResult:
    """Features of every tissue patch of a slide, streamed into an HDF5 file.

    Tiles the slide at ``target_mpp`` (default: the model's, from the manifest; 0.5 um/px
    for the paper's models) with 224 px patches holding at least ``min_foreground`` tissue
    (``mask``: 'contours', the default: tissue without ink or debris; the paper's 'hsv'
    rule; or 'otsu'), reads them while the model runs, and
    appends ``features`` (N, D) and ``coords`` (N, 2) to ``out_h5`` (layout:
    ``histohub.featurefile``). ``mpp`` gives the slide's microns per pixel when the file lacks it.
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
