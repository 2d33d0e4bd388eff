"""histohub.slide_patches: a slide's tissue patches as uint8 batches, for the caller's model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import histohub
from histohub.errors import OptionError, SlideError
from histohub.wsi import PatchReader, open_slide, tile_grid
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


def test_undecodable_patches_are_listed_not_fatal(tmp_path):
    image = tissue_image(1024, 1024, [(0, 0, 1024, 1024)], seed=4)
    path = write_slide(tmp_path / "c.tif", image, mpp=0.5, levels=2)
    corrupt_tile(path, level=0, x=600, y=100)  # tile x 512-767, y 0-255; the mask uses level 1
    batches = list(histohub.slide_patches(path, target_mpp=0.5, batch_size=4))
    failed = {tuple(c) for b in batches for c in b.failed.tolist()}
    assert failed == {(448, 0), (672, 0), (448, 224), (672, 224)}
    assert sum(len(b.pixels) for b in batches) == 12
    assert all(len(b.pixels) == len(b.coords) for b in batches)


def test_bad_options_are_refused_when_called_and_a_bad_slide_when_read(tmp_path):
    for bad, match in [({"batch_size": 0}, "batch_size"), ({"target_mpp": 0}, "target_mpp"),
                       ({"mask": "triangle"}, "mask"), ({"min_foreground": 2}, "min_foreground")]:
        with pytest.raises(OptionError, match=match):
            histohub.slide_patches(tmp_path / "missing.svs", **{"target_mpp": 0.5, **bad})
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="CUDA"):
            histohub.slide_patches(tmp_path / "missing.svs", target_mpp=0.5, pin_memory=True)
    patches = histohub.slide_patches(tmp_path / "missing.svs", target_mpp=0.5)
    with pytest.raises(SlideError, match="no such file"):
        next(patches)


def test_stopping_early_stops_the_readers(slide):
    before = set(threading.enumerate())
    patches = histohub.slide_patches(slide, target_mpp=0.5, batch_size=2, read_threads=2)
    first = next(patches)
    assert len(first.pixels) == 2
    patches.close()
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]
