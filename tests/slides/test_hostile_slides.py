"""Crafted slides (issue 23): refused before OpenSlide allocates what they declare, and a
native crash while reading costs one slide, not the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from child_patches import patched_env
from histohub.errors import SlideError
from histohub.slides._reader import open_slide
from wsi_factory import forge_tiles, tissue_image, write_slide

pytest.importorskip("openslide")
pytest.importorskip("tifffile")

ROOT = Path(__file__).resolve().parents[2]

#: Reads every level-0 patch of a slide in a process limited to 1 GiB of address space (no
#: torch imported): OpenSlide's g_malloc aborts such a process on the crafted files.
_READ_UNDER_CAP = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from histohub.errors import SlideError
from histohub.slides._reader import PatchReader, open_slide
from histohub.slides._tiling import tile_grid
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


# --------------------------------------------------------------------------- a cohort

#: Every process of the command under a memory cap; ``unguarded`` also turns off the check
#: of the tile tags, so that OpenSlide really aborts on the 65520 px tiles.
_CAP = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
"""
_UNGUARDED = """
import histohub.slides._reader
histohub.slides._reader.check_tiled_tiff = lambda path: None
"""


@pytest.fixture
def cohort(tmp_path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    for index in range(3):
        write_slide(folder / f"good{index}.tiff",
                    tissue_image(448, 448, [(0, 0, 448, 448)], seed=index), levels=1)
    for kind in ("byte-counts", "tile-side"):
        write_slide(folder / f"bad-{kind}.tiff",
                    tissue_image(512, 512, [(0, 0, 512, 512)], seed=9), levels=1)
        forge_tiles(folder / f"bad-{kind}.tiff",
                    **({"byte_counts": 2**31 - 1} if kind == "byte-counts" else
                       {"tile_side": 65520}))
    return folder


def _run_cli(mode: str, argv: list[str], folder: Path) -> subprocess.CompletedProcess:
    env = patched_env(folder, _CAP + (_UNGUARDED if mode == "unguarded" else ""))
    return subprocess.run([sys.executable, "-m", "histohub", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", ["guarded", "unguarded"])
def test_cohort_with_crafted_slides_finishes_every_good_slide(cohort, resnet18_file, tmp_path,
                                                              mode):
    """The issue's 'done when': the good slides are extracted, the two bad ones named; with
    the tag check off, OpenSlide aborts on the 65520 px tiles, and only that slide fails."""
    out = tmp_path / "out"
    done = _run_cli(mode, ["extract", str(cohort), "--model", str(resnet18_file), "--out",
                           str(out), "--batch-size", "4", "--quiet"], tmp_path / "site")
    assert done.returncode == 1, done.stderr[-3000:]
    report = done.stdout
    failed = [line for line in report.splitlines() if line.startswith("failed: ")]
    goods = {"good0.h5", "good1.h5", "good2.h5"}
    if mode == "guarded":
        assert "slides: 3 extracted, 0 already done, 2 failed" in report, report + done.stderr
        assert len(failed) == 2 and "crafted or damaged" in failed[0] + failed[1]
        assert any("bad-byte-counts.tiff" in line for line in failed)
        assert {p.name for p in out.glob("*.h5")} == goods
    else:  # 2 GiB fit under the cap: OpenSlide reports those tiles unreadable
        assert len(failed) == 1 and "bad-tile-side.tiff" in failed[0], report
        assert "died (signal SIGABRT)" in failed[0], report
        assert goods <= {p.name for p in out.glob("*.h5")}
    assert any("bad-tile-side.tiff" in line for line in failed)
    assert not list(out.glob("*.partial"))
