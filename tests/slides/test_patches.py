"""histohub.slide_patches: a slide's tissue patches as uint8 batches, for the caller's model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import histohub
from histohub.errors import OptionError, SlideError
from histohub.slides._reader import PatchReader, open_slide
from histohub.slides._tiling import tile_grid
from wsi_factory import corrupt_tile, tissue_image, write_slide

pytest.importorskip("openslide")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """1024 x 1024 px at 0.5 um/px: 16 patches of 224 px, all tissue."""
    image = tissue_image(1024, 1024, [(0, 0, 1024, 1024)], seed=4)
    return write_slide(tmp_path_factory.mktemp("patches") / "s.tif", image, mpp=0.5, levels=2)


@pytest.mark.parametrize("readers", [{}, {"read_threads": 2}, {"num_workers": 2}])
def test_batches_are_the_grids_patches_in_order(slide, readers):
    with open_slide(slide) as handle:
        grid = tile_grid(handle, target_mpp=0.5)
    batches = list(histohub.slide_patches(slide, target_mpp=0.5, batch_size=5, **readers))
    assert [len(b.pixels) for b in batches] == [5, 5, 5, 1]
    np.testing.assert_array_equal(np.concatenate([b.coords for b in batches]), grid.coords)
    reader = PatchReader(grid)
    expected = np.stack([reader.read(i) for i in range(len(grid))])
    reader.close()
    pixels = np.concatenate([b.pixels.numpy() for b in batches])
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 224, 224, 3)
    np.testing.assert_array_equal(pixels, expected)
    assert all(b.failed.shape == (0, 2) for b in batches)


@pytest.mark.parametrize("readers", [{}, {"num_workers": 1}])
def test_undecodable_patches_are_listed_not_fatal(tmp_path, readers):
    image = tissue_image(1024, 1024, [(0, 0, 1024, 1024)], seed=4)
    path = write_slide(tmp_path / "c.tif", image, mpp=0.5, levels=2)
    corrupt_tile(path, level=0, x=600, y=100)  # tile x 512-767, y 0-255; the mask uses level 1
    batches = list(histohub.slide_patches(path, target_mpp=0.5, batch_size=2, **readers))
    assert [[tuple(c) for c in b.failed.tolist()] for b in batches] == [
        [], [(448, 0), (672, 0)], [], [(448, 224), (672, 224)], [], [], [], []]
    assert [len(b.pixels) for b in batches] == [2, 0, 2, 0, 2, 2, 2, 2]
    assert all(len(b.pixels) == len(b.coords) for b in batches)


def test_bad_options_are_refused_when_called_and_a_bad_slide_when_read(tmp_path):
    for bad, match in [({"batch_size": 0}, "batch_size"), ({"target_mpp": 0}, "target_mpp"),
                       ({"mask": "triangle"}, "mask"), ({"min_foreground": 2}, "min_foreground"),
                       ({"patch_size": 0}, "patch_size"),
                       ({"interpolation": "lanczos"}, "interpolation")]:
        with pytest.raises(OptionError, match=match):
            histohub.slide_patches(tmp_path / "missing.svs", **{"target_mpp": 0.5, **bad})
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="CUDA"):
            histohub.slide_patches(tmp_path / "missing.svs", target_mpp=0.5, pin_memory=True)
    patches = histohub.slide_patches(tmp_path / "missing.svs", target_mpp=0.5)
    with pytest.raises(SlideError, match="no such file"):
        next(patches)


@pytest.mark.parametrize("readers", [{"read_threads": 2}, {"num_workers": 2}])
def test_stopping_early_stops_the_readers(slide, readers):
    import multiprocessing

    before = set(threading.enumerate())
    patches = histohub.slide_patches(slide, target_mpp=0.5, batch_size=2, **readers)
    first = next(patches)
    assert len(first.pixels) == 2
    patches.close()
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    # histohub's own reader threads are joined by close(); the feeder threads of the
    # DataLoader's multiprocessing queues are closed by torch without a join
    # (cancel_join_thread) and end once they have flushed: they must end, not at once
    assert not [t for t in left if not t.name.startswith("QueueFeederThread")]
    for thread in left:
        thread.join(timeout=30)
        assert not thread.is_alive(), thread
    assert not multiprocessing.active_children()  # worker processes shut down


@pytest.fixture(scope="module")
def three_slides(tmp_path_factory, slide):
    """``slide`` and two more: 3 x 1 patches of tissue, and blank glass (no patch)."""
    folder = tmp_path_factory.mktemp("three_slides")
    strip = tissue_image(448, 896, [(0, 0, 672, 224)], seed=5)
    blank = np.full((448, 448, 3), 240, np.uint8)
    return [slide, write_slide(folder / "strip.tif", strip, mpp=0.5, levels=1),
            write_slide(folder / "blank.tif", blank, mpp=0.5, levels=1)]


@pytest.mark.parametrize("readers", [{}, {"read_threads": 2}, {"num_workers": 2}])
def test_a_cohort_is_each_slides_batches_in_turn(three_slides, readers):
    """Three slides in one stream: each slide's batches are what ``slide_patches`` gives for
    it alone, in the slides' order, the last flagged; the blank slide gives none."""
    batches = list(histohub.cohort_patches(three_slides, target_mpp=0.5, batch_size=5, **readers))
    assert [(b.slide, len(b.pixels), b.last) for b in batches] == [
        (three_slides[0], 5, False), (three_slides[0], 5, False), (three_slides[0], 5, False),
        (three_slides[0], 1, True), (three_slides[1], 3, True)]
    for path in three_slides[:2]:
        alone = list(histohub.slide_patches(path, target_mpp=0.5, batch_size=5))
        mine = [b for b in batches if b.slide == path]
        for a, b in zip(alone, mine, strict=True):
            np.testing.assert_array_equal(a.pixels.numpy(), b.pixels.numpy())
            np.testing.assert_array_equal(a.coords, b.coords)


def test_a_cohorts_unreadable_slide_stops_it_or_is_skipped(three_slides, tmp_path, caplog):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide")
    slides = [three_slides[1], broken, three_slides[1]]
    patches = histohub.cohort_patches(slides, target_mpp=0.5)
    assert next(patches).slide == three_slides[1]
    with pytest.raises(SlideError, match="broken.svs"):
        next(patches)
    kept = list(histohub.cohort_patches(slides, target_mpp=0.5, skip_unreadable=True))
    assert [b.slide for b in kept] == [three_slides[1], three_slides[1]]
    assert "broken.svs" in caplog.text and "skipped" in caplog.text
    with pytest.raises(OptionError, match="slide_patches"):
        histohub.cohort_patches(three_slides[0], target_mpp=0.5)


def test_a_cohort_tiles_the_next_slide_while_this_one_is_read(three_slides, monkeypatch):
    """The second slide is tiled while the first slide's batches are being consumed."""
    import histohub.slides._patches as slide_batches

    tiled: list = []
    real = slide_batches.tile_grid
    monkeypatch.setattr(slide_batches, "tile_grid",
                        lambda slide, **kw: tiled.append(slide.path.name) or real(slide, **kw))
    patches = histohub.cohort_patches(three_slides[:2], target_mpp=0.5, batch_size=5)
    first = next(patches)
    assert first.slide == three_slides[0] and not first.last
    for _ in range(100):  # the background thread may still be at it
        if len(tiled) == 2:
            break
        threading.Event().wait(0.05)
    assert tiled == [three_slides[0].name, three_slides[1].name]
    patches.close()


def test_a_cohort_frees_each_slides_grid_once_read(three_slides, monkeypatch):
    import gc
    import weakref

    import histohub.slides._patches as slide_batches

    grids: list[weakref.ref] = []
    real = slide_batches.tile_grid
    monkeypatch.setattr(slide_batches, "tile_grid",
                        lambda *a, **k: (g := real(*a, **k), grids.append(weakref.ref(g)))[0])
    first, second = three_slides[0], three_slides[1]
    patches = histohub.cohort_patches([first, second, second], target_mpp=0.5)
    assert [next(patches).slide for _ in range(2)] == [three_slides[0], three_slides[1]]
    gc.collect()
    assert grids[0]() is None and grids[1]() is not None
    patches.close()


def test_worker_processes_are_started_once_for_a_whole_cohort(three_slides, tmp_path, monkeypatch):
    """Two worker processes read all three slides (one DataLoader per slide started two
    new ones for every slide: 0.3-0.6 s each)."""
    import os

    from histohub.slides._batches import ChunkReader

    real = ChunkReader.__getitem__

    def recorded(self, item):
        (tmp_path / f"{os.getpid()}-{item.slot}").touch()
        return real(self, item)

    monkeypatch.setattr(ChunkReader, "__getitem__", recorded)  # workers fork with it
    slides = [three_slides[0], three_slides[1], three_slides[0]]
    batches = list(histohub.cohort_patches(slides, target_mpp=0.5, batch_size=4,
                                           num_workers=2))
    first, second = three_slides[0], three_slides[1]
    assert [b.slide for b in batches] == [first] * 4 + [second] + [first] * 4
    seen = [name.split("-") for name in os.listdir(tmp_path)]
    assert {slot for _, slot in seen} == {"0", "1", "2"}
    assert len({pid for pid, _ in seen}) == 2
