"""A four_slides as one stream: full model batches across slides, features back to their slide,
results in order, nothing left locked or half-written when a run stops early."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from histohub.featurefile._layout import is_complete, partial_path, read_features
from histohub.slides._extract import SlideExtractor, SlideJob, extract_slide
from histohub.slides._stream import Batch, CrossBatcher
from test_features import Tiny
from wsi_factory import tissue_image, write_slide


class Recording(Tiny):
    """``Tiny`` that remembers the size of every batch it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return super().forward(x)


@pytest.fixture(scope="module")
def four_slides(tmp_path_factory) -> list[Path]:
    """Four small slides at 0.5 um/px with 2, 5, 1 and 7 tissue patches of 224 px."""
    folder = tmp_path_factory.mktemp("four_slides")
    shapes = [(2, 1), (5, 1), (1, 1), (7, 1)]
    slides = []
    for i, (cols, rows) in enumerate(shapes):
        image = tissue_image(224 * (rows + 1), 224 * (cols + 1), [(0, 0, 224 * cols, 224 * rows)],
                             seed=i)
        slides.append(write_slide(folder / f"s{i}.tif", image, mpp=0.5, levels=1))
    return slides


def test_model_batches_cross_slide_boundaries(four_slides, tmp_path):
    """15 patches in slides of 2/5/1/7 at batch size 4: 4 + 4 + 4 + 3 forward passes, where
    slide by slide would take 1 + 2 + 1 + 2 short ones, and every file holds what a
    single-slide run writes."""
    model = Recording()
    jobs = [SlideJob(s, tmp_path / f"{s.stem}.h5") for s in four_slides]
    with SlideExtractor(model, batch_size=4, progress=False) as extractor:
        results = list(extractor.extract_many(jobs))
    assert [r.slide_path for r in results] == four_slides
    assert [r.n_patches for r in results] == [2, 5, 1, 7]
    assert model.sizes == [1, 4, 4, 4, 3]  # 1: the feature-size probe (no histohub_info)
    for slide, result in zip(four_slides, results):
        alone = extract_slide(Tiny(), slide, tmp_path / "alone" / f"{slide.stem}.h5",
                              batch_size=4, progress=False)
        a, b = read_features(result.output), read_features(alone.output)
        np.testing.assert_array_equal(a["coords"], b["coords"])
        np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-6)
        assert is_complete(result.output) and not partial_path(result.output).exists()


def test_a_failing_slide_leaves_its_neighbours_whole(four_slides, tmp_path):
    """The second output is another tool's file: that slide reports an error, the others
    are written in full, and the foreign file is untouched."""
    outputs = [tmp_path / f"{s.stem}.h5" for s in four_slides]
    outputs[1].write_bytes(b"not histohub's")
    with SlideExtractor(Tiny(), batch_size=4, progress=False) as extractor:
        results = list(extractor.extract_many(list(zip(four_slides, outputs))))
    assert [r.error is None for r in results] == [True, False, True, True]
    assert [r.n_patches for r in results] == [2, 0, 1, 7]
    assert outputs[1].read_bytes() == b"not histohub's"
    for out in (outputs[0], outputs[2], outputs[3]):
        assert is_complete(out)


def test_stopping_early_releases_every_slide(four_slides, tmp_path):
    """Leaving the loop after the first result: no lock is left held, the slides already
    opened keep a partial file, and the next run finishes all of them."""
    jobs = [SlideJob(s, tmp_path / f"{s.stem}.h5") for s in four_slides]
    with SlideExtractor(Recording(), batch_size=4, progress=False) as extractor:
        results = extractor.extract_many(jobs)
        first = next(results)
        results.close()
    assert first.n_patches == 2 and is_complete(jobs[0].output)
    assert not is_complete(jobs[3].output)
    model = Recording()
    with SlideExtractor(model, batch_size=4, progress=False) as extractor:
        again = list(extractor.extract_many(jobs))  # a held lock would make a slide "busy"
    assert [r.error for r in again] == [None] * 4
    assert [r.n_patches for r in again] == [2, 5, 1, 7] and again[0].skipped
    assert sum(model.sizes) - 1 == sum(r.patches_run for r in again) <= 13


def test_cross_batcher_hands_batches_back_in_order_with_their_rows():
    """Rows of 3 + 0 + 5 + 2 at batch size 4: model batches of 4, 4, 2; each batch gets
    back exactly its own rows' features."""
    seen: list[int] = []

    def model(pixels: torch.Tensor) -> np.ndarray:
        seen.append(len(pixels))
        return pixels[:, 0, 0, :1].numpy().astype(np.float32)

    def batch(slot: int, values: list[int]) -> Batch:
        pixels = np.zeros((len(values), 2, 2, 3), np.uint8)
        pixels[:, 0, 0, 0] = values
        return Batch(slot, None, range(0), pixels, np.arange(len(values)))

    batcher = CrossBatcher(model, 4)
    batches = [batch(0, [1, 2, 3]), batch(0, []), batch(1, [4, 5, 6, 7, 8]), batch(2, [9, 10])]
    done = []
    for b in batches:
        done += batcher.add(b)
    done += batcher.finish()
    assert seen == [4, 4, 2]
    assert done == batches
    assert [b.features[:, 0].tolist() if b.rows else [] for b in done] == \
        [[1, 2, 3], [], [4, 5, 6, 7, 8], [9, 10]]


def test_cross_batcher_drop_skips_a_slots_rows():
    runs: list[int] = []

    def model(pixels: torch.Tensor) -> np.ndarray:
        runs.append(len(pixels))
        return np.zeros((len(pixels), 1), np.float32)

    batcher = CrossBatcher(model, 4)
    a = Batch(0, None, range(0), np.zeros((3, 1, 1, 3), np.uint8), np.arange(3))
    b = Batch(1, None, range(0), np.zeros((2, 1, 1, 3), np.uint8), np.arange(2))
    assert batcher.add(a) == []
    batcher.drop(0)
    done = batcher.add(b) + batcher.finish()
    assert runs == [2] and done == [a, b] and a.features is None and len(b.features) == 2


def test_the_reader_takes_over_the_handle_that_tiled_the_slide(four_slides, tmp_path, monkeypatch):
    """One OpenSlide handle per slide (opened to tile it, then read from, its tile cache
    warm), and every handle closed at the end."""
    import histohub.slides._reader as wsi

    opened, closed = [], []
    real_init, real_close = wsi.Slide.__init__, wsi.Slide.close
    monkeypatch.setattr(wsi.Slide, "__init__",
                        lambda self, path: opened.append(path) or real_init(self, path))
    monkeypatch.setattr(wsi.Slide, "close", lambda self: closed.append(self) or real_close(self))
    with SlideExtractor(Tiny(), batch_size=4, progress=False) as extractor:
        jobs = [(s, tmp_path / f"{s.stem}.h5") for s in four_slides]
        results = list(extractor.extract_many(jobs))
    assert [r.n_patches for r in results] == [2, 5, 1, 7]
    assert sorted(map(str, opened)) == sorted(map(str, four_slides))
    assert len(closed) == len(four_slides)


def _at_the_same_time(first, second, what: str):
    """``first`` and ``second`` wrapped so that each waits (up to 10 s) for the other to
    begin: both finish only if they run at the same time. ``what`` names ``first``."""
    import threading

    began = threading.Event(), threading.Event()

    def wrap(call, mine: int, message: str):
        def wrapped(*args, **kwargs):
            began[mine].set()
            assert began[1 - mine].wait(timeout=10), message
            return call(*args, **kwargs)
        return wrapped

    return (wrap(first, 0, f"{what} before tiling began"),
            wrap(second, 1, f"{what} only after tiling"))


def test_the_model_is_made_ready_while_the_first_slide_is_tiled(four_slides, tmp_path,
                                                                 monkeypatch):
    """Making the model ready and tiling the first slide run at the same time."""
    import histohub.slides._extract as slide_features

    runner, tile = _at_the_same_time(slide_features.ModelRunner, slide_features.tile_grid,
                                     "the model was made ready")
    monkeypatch.setattr(slide_features, "ModelRunner", runner)
    monkeypatch.setattr(slide_features, "tile_grid", tile)
    result = extract_slide(Tiny(), four_slides[0], tmp_path / "s.h5", batch_size=4, progress=False)
    assert result.n_patches == 2


def _loads_that_meet_tiling(monkeypatch, what: str) -> list:
    """``resolve_model`` and ``tile_grid`` patched to finish only if they run at the same
    time (``_at_the_same_time``); returns the list of what ``resolve_model`` was asked for
    (the model's descriptor: its file, or its name)."""
    import histohub.slides._extract as slide_features

    loads: list = []
    resolve, tile = _at_the_same_time(slide_features.resolve_model, slide_features.tile_grid,
                                      what)
    monkeypatch.setattr(slide_features, "resolve_model",
                        lambda *args, **kwargs: loads.append(args[0].file or args[0].name)
                        or resolve(*args, **kwargs))
    monkeypatch.setattr(slide_features, "tile_grid", tile)
    return loads


def test_bundled_weights_load_while_the_first_slide_is_tiled(four_slides, tmp_path, monkeypatch):
    """A model whose weights are here (the bundled resnet18-ssl-mini) is known from the
    manifest at once and loaded while the first slide is tiled; the file records the
    weights' pinned sha256."""
    from histohub.hub._registry import get_entry

    loads = _loads_that_meet_tiling(monkeypatch, "the weights were loaded")
    with SlideExtractor("resnet18-ssl-mini", batch_size=4, progress=False) as extractor:
        assert loads == []                      # known from the manifest, nothing read yet
        result = extractor.extract(four_slides[1], tmp_path / "s.h5")
    assert loads == ["resnet18-ssl-mini"] and result.n_patches > 0
    features = read_features(tmp_path / "s.h5")
    assert features["attrs"]["model_sha256"] == get_entry("resnet18-ssl-mini").weights[0].sha256


def test_weights_that_fail_to_load_leave_no_trace_and_are_not_retried(four_slides, tmp_path,
                                                                       monkeypatch):
    """A bundled model whose weights turn out bad (here: the load raises) fails the job
    with that error, once; no lock, partial file or output is left behind."""
    import histohub.slides._extract as slide_features
    from histohub.errors import FingerprintError

    calls = []

    def broken(*args, **kwargs):
        calls.append(args[0].name)   # the model's descriptor
        raise FingerprintError("resnet18-ssl-mini: the loaded conv1.weight has L2 norm 1.00")

    monkeypatch.setattr(slide_features, "resolve_model", broken)
    jobs = [(s, tmp_path / f"{s.stem}.h5") for s in four_slides]
    with SlideExtractor("resnet18-ssl-mini", batch_size=4, progress=False) as extractor:
        with pytest.raises(FingerprintError, match="L2 norm"):
            list(extractor.extract_many(jobs))
        with pytest.raises(FingerprintError, match="L2 norm"):   # the same error, not a retry
            list(extractor.extract_many(jobs[:1]))
    assert calls == ["resnet18-ssl-mini"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_checkpoint_file_loads_while_the_first_slide_is_tiled(four_slides, resnet18_file,
                                                               tmp_path, monkeypatch):
    """A checkpoint path is checked at once (its first bytes) and read while the first
    slide is tiled; the file records the checkpoint's sha256 and 512 features per patch."""
    import hashlib

    loads = _loads_that_meet_tiling(monkeypatch, "the checkpoint was loaded")
    with SlideExtractor(resnet18_file, batch_size=4, progress=False) as extractor:
        assert loads == []
        result = extractor.extract(four_slides[0], tmp_path / "s.h5")
    assert loads == [resnet18_file] and result.n_patches == 2
    features = read_features(tmp_path / "s.h5")
    assert features["features"].shape == (2, 512)
    assert features["attrs"]["model_sha256"] == hashlib.sha256(
        resnet18_file.read_bytes()).hexdigest()


def test_a_checkpoint_that_is_no_checkpoint_is_refused_before_any_slide(four_slides, tmp_path):
    from histohub.errors import CheckpointError

    page = tmp_path / "weights.safetensors"
    page.write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match="neither a safetensors file"):
        SlideExtractor(page, progress=False)


def test_a_checkpoint_that_fits_no_architecture_fails_once_and_leaves_no_trace(
        four_slides, tmp_path):
    """Its keys are found wrong only when it is read, while the first slide is tiled: the
    job fails with that error, once, and nothing is left in the output folder."""
    from safetensors.torch import save_file

    from histohub.errors import KeyMappingError

    weights = tmp_path / "weights" / "other.safetensors"
    weights.parent.mkdir()
    save_file({"encoder.weight": torch.zeros(3, 3)}, weights)
    out = tmp_path / "out"
    out.mkdir()
    jobs = [(s, out / f"{s.stem}.h5") for s in four_slides]
    with SlideExtractor(weights, batch_size=4, progress=False) as extractor:
        with pytest.raises(KeyMappingError):
            list(extractor.extract_many(jobs))
        with pytest.raises(KeyMappingError):
            list(extractor.extract_many(jobs[:1]))
    assert sorted(out.iterdir()) == []


def test_worker_chunks_are_consecutive_batches_two_or_more_per_worker():
    from histohub.slides._stream import WORKER_CHUNK, worker_chunks

    ranges = [range(i, i + 8) for i in range(0, 800, 8)]  # 100 batches
    chunks = worker_chunks(ranges, num_workers=4)
    assert [len(c) for c in chunks] == [WORKER_CHUNK] * (100 // WORKER_CHUNK)
    assert [r for c in chunks for r in c] == ranges  # in order, each once
    assert [len(c) for c in worker_chunks(ranges[:10], num_workers=4)] == [1] * 10
    assert [len(c) for c in worker_chunks(ranges[:12], num_workers=2)] == [3] * 4
    assert worker_chunks(ranges[:1], num_workers=8) == [[ranges[0]]]


def test_a_cohort_frees_each_slides_grid_once_it_is_written(four_slides, tmp_path, monkeypatch):
    """The grids (masks up to 4096 x 4096 bytes) of finished slides are freed during the run,
    not held to its end: over thousands of slides they were gigabytes."""
    import gc
    import weakref

    import histohub.slides._extract as slide_features

    grids: list[weakref.ref] = []
    real = slide_features.tile_grid
    monkeypatch.setattr(slide_features, "tile_grid",
                        lambda *a, **k: (g := real(*a, **k), grids.append(weakref.ref(g)))[0])
    jobs = [SlideJob(s, tmp_path / f"{s.stem}-{i}.h5") for i in range(2) for s in four_slides]
    alive_at_the_end = None
    with SlideExtractor(Tiny(), batch_size=2, read_threads=2, progress=False) as extractor:
        for result in extractor.extract_many(jobs):
            assert result.error is None
            if result.slide_path == jobs[-1].slide:
                gc.collect()
                alive_at_the_end = [ref() is not None for ref in grids]
    assert len(grids) == len(jobs) == 8
    assert alive_at_the_end[:5] == [False] * 5


def test_reader_threads_count_past_a_job_consumed_before_they_reach_it(four_slides):
    """A thread that reaches a job only after its batches were all consumed (none of them
    was its own) counts them, and reads its own share of the next job: the k-th batch of
    the stream is thread k % threads'."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from histohub.slides._batches import batch_ranges
    from histohub.slides._stream import Schedule, _thread_batches
    from histohub.slides._reader import open_slide
    from histohub.slides._tiling import tile_grid

    def prepare(path):
        with open_slide(path) as slide:
            grid = tile_grid(slide, target_mpp=0.5)
        return SimpleNamespace(grid=grid, ranges=batch_ranges(0, len(grid), 2))

    released = []
    with ThreadPoolExecutor(1) as pool:
        schedule = Schedule(pool, four_slides[1::2], prepare, release=released.append)
        first = schedule.get(0)
        schedule.finished(0)  # as if its 3 batches (stream batches 0-2) had been consumed
        assert released == [first] and first.grid is not None
        threads = [list(_thread_batches(schedule, k, 2, "bilinear", None)) for k in (0, 1)]
        schedule.close()
    second = batch_ranges(0, 7, 2)  # stream batches 3-6
    assert [(b.slot, b.positions) for b in threads[0]] == [(1, second[1]), (1, second[3])]
    assert [(b.slot, b.positions) for b in threads[1]] == [(1, second[0]), (1, second[2])]
    assert all(b.rows == len(b.positions) for t in threads for b in t)
    assert len(released) == 2  # the second job, at close; the first not again


def test_workers_are_not_forked_while_a_slide_is_being_prepared(four_slides, tmp_path):
    """A worker forked while the preparing thread was importing a module waited on that
    import's lock forever (seen with PIL on the first slide): run in a child process, so a
    hang is a timeout here, not a hung test run."""
    import os
    import signal
    import subprocess
    import sys

    (tmp_path / "slow_import.py").write_text("import time\ntime.sleep(1.5)\n")
    script = f"""
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from histohub.slides._batches import ChunkReader, batch_ranges
from histohub.slides._stream import Schedule, worker_stream
from histohub.slides._reader import open_slide
from histohub.slides._tiling import tile_grid

real = ChunkReader.__getitem__
def getitem(self, item):
    import slow_import  # the worker needs the module too
    return real(self, item)
ChunkReader.__getitem__ = getitem

def prepare(path):
    import slow_import  # 1.5 s inside its import, holding the module's lock
    with open_slide(path) as slide:
        grid = tile_grid(slide, target_mpp=0.5)
    return SimpleNamespace(grid=grid, ranges=batch_ranges(0, len(grid), 4))

with ThreadPoolExecutor(1) as pool:
    schedule = Schedule(pool, [{str(four_slides[3])!r}], prepare, release=lambda unit: None)
    schedule.start()
    time.sleep(0.3)  # the preparing thread is inside the import now
    stream = worker_stream(schedule, num_workers=1, interpolation="bilinear", pin_memory=False)
    print(sum(batch.rows for batch in stream))
    schedule.close()
"""
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "PYTHONPATH": path})  # finds slow_import
    try:
        out, err = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the hung worker too
        child.communicate()
        pytest.fail("the DataLoader worker hung: forked while a slide was being prepared")
    assert child.returncode == 0, err[-2000:]
    assert out.split() == ["7"]
