"""Crafted slides (issue 23): refused before OpenSlide allocates what they declare, and a
native crash while reading costs one slide, not the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from histohub.errors import SlideError
from histohub.wsi import open_slide
from wsi_factory import forge_tiles, tissue_image, write_slide

pytest.importorskip("openslide")
pytest.importorskip("tifffile")

ROOT = Path(__file__).resolve().parents[1]

#: Reads every level-0 patch of a slide in a process limited to 1 GiB of address space (no
#: torch imported): OpenSlide's g_malloc aborts such a process on the crafted files.
_READ_UNDER_CAP = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from histohub.errors import SlideError
from histohub.wsi import PatchReader, open_slide, tile_grid
try:
    slide = open_slide(sys.argv[1])
    grid = tile_grid(slide, target_mpp=0.25)
    reader = PatchReader(grid, slide=slide)
    for index in range(len(grid)):
        try:
            reader.read(index)
        except SlideError:
            pass
except SlideError as error:
    print("refused:", error)
"""


def good_slide(path: Path, seed: int = 0) -> Path:
    return write_slide(path, tissue_image(1024, 1024, [(64, 64, 896, 896)], seed=seed),
                       mpp=0.5, levels=2)


def crafted(path: Path, kind: str) -> Path:
    good_slide(path)
    if kind == "byte-counts":
        forge_tiles(path, byte_counts=2**31 - 1)
    else:
        forge_tiles(path, tile_side=65520)
    return path


@pytest.mark.parametrize("kind", ["byte-counts", "tile-side"])
def test_crafted_tiff_is_refused_before_openslide_allocates(tmp_path, kind):
    path = crafted(tmp_path / f"{kind}.tiff", kind)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _READ_UNDER_CAP, str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]   # not SIGABRT (-6) in g_malloc
    assert "refused:" in done.stdout and "crafted or damaged" in done.stdout
    assert done.stdout.count("\n") == 1                  # one line


def test_crafted_tiff_error_names_the_tile_and_the_file_size(tmp_path):
    path = crafted(tmp_path / "counts.tiff", "byte-counts")
    with pytest.raises(SlideError, match=r"2147483647 bytes .*past the end"):
        open_slide(path)
    path = crafted(tmp_path / "side.tiff", "tile-side")
    with pytest.raises(SlideError, match=r"65520 x 65520 px tiles"):
        open_slide(path)


def test_good_slide_still_opens(tmp_path):
    with open_slide(good_slide(tmp_path / "good.tiff")) as slide:
        assert slide.dimensions == (1024, 1024)


def test_cmu_slide_still_opens(cmu_slide):
    with open_slide(cmu_slide) as slide:
        assert slide.level_count >= 1
