"""Slides: opening, mpp, the paper's tissue rule, tiling at the model's mpp, patch reading."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from histohub.errors import SlideError
from histohub.slides._preview import preview
from histohub.slides._batches import batch_ranges
from histohub.slides._tissue import _otsu_threshold, tissue_mask
from histohub.slides._reader import PatchReader, TileReadError, _read_mpp, open_slide
from histohub.slides._tiling import tile_grid
from wsi_factory import GLASS, PINK, corrupt_tile, tissue_image, write_slide

pytest.importorskip("openslide")


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """1536 x 1280 px at 0.25 um/px, 3 levels; tissue in two boxes (level-0 px)."""
    image = tissue_image(1280, 1536, [(0, 0, 896, 448), (1008, 672, 448, 448)], seed=1)
    return write_slide(tmp_path_factory.mktemp("slides") / "pyramid.tif", image, mpp=0.25)


# --------------------------------------------------------------------------- opening

def test_cmu_slide_mpp_from_metadata(cmu_slide):
    with open_slide(cmu_slide) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "openslide.mpp"


def test_slide_without_mpp_asks_for_it(tcga_slide):
    with open_slide(tcga_slide) as slide:
        assert slide.mpp is None
        with pytest.raises(SlideError, match="--mpp"):
            tile_grid(slide, target_mpp=0.5)
        grid = tile_grid(slide, target_mpp=0.5, mpp_override=0.25)
    # 0.25 um/px at level 0, level 1 is x2 = 0.5 um/px: read there, no resizing
    assert (grid.level, grid.read_size, grid.patch_size_level0) == (1, 224, 448)
    assert grid.mpp_source == "user" and len(grid) > 0


@pytest.mark.parametrize("content", [b"", b"not a slide at all\n" * 100])
def test_not_a_slide_is_a_clear_error(tmp_path, content):
    path = tmp_path / "notes.svs"
    path.write_bytes(content)
    with pytest.raises(SlideError, match="not a slide"):
        open_slide(path)
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "missing.svs")


@pytest.mark.parametrize("properties, expected", [
    ({"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2527"}, (0.2527, "openslide.mpp")),
    ({"tiff.XResolution": "40000", "tiff.YResolution": "40000",
      "tiff.ResolutionUnit": "centimeter"}, (0.25, "tiff.resolution")),
    ({"tiff.XResolution": "50800", "tiff.YResolution": "50800", "tiff.ResolutionUnit": "inch"},
     (0.5, "tiff.resolution")),
    ({"tiff.XResolution": "72", "tiff.YResolution": "72", "tiff.ResolutionUnit": "inch"},
     (None, None)),  # the 72 dpi default of image writers: not a scan resolution
    ({"tiff.XResolution": "40000", "tiff.YResolution": "40000"}, (None, None)),  # no unit
    ({"tiff.ResolutionUnit": "inch"}, (None, None)),  # the TCGA slide: unit, no resolution
])
def test_mpp_sources(properties, expected):
    mpp, source = _read_mpp(properties)
    assert source == expected[1]
    if expected[0] is None:
        assert mpp is None
    else:
        assert mpp == pytest.approx((expected[0], expected[0]))


def test_generated_slide_mpp_from_resolution_tags(pyramid):
    with open_slide(pyramid) as slide:
        assert slide.level_count == 3
        assert slide.mpp == pytest.approx(0.25)


# --------------------------------------------------------------------------- the tissue rule

def _paper_rule(r: int, g: int, b: int) -> bool:
    """Appendix B transcribed with colorsys (hue, saturation, value on [0, 1]), the hue band
    excluded (see histohub.slides._tissue.tissue_mask for why)."""
    h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    return s > 0.1 and 0.5 < v < 0.9 and not 0.5 < h < 0.65


def test_hsv_rule_matches_the_formula_on_random_colours():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    mask = tissue_mask(pixels)
    expected = np.array([[_paper_rule(*map(int, p)) for p in row] for row in pixels])
    # PIL quantises hue, saturation and value to 8 bits: a few pixels on a boundary differ
    assert (mask != expected).mean() < 0.01
    assert 0.05 < expected.mean() < 0.95  # both classes present: the comparison means something


@pytest.mark.parametrize("colour, tissue", [
    (PINK, True), ((150, 95, 175), True), ((205, 120, 160), True),   # eosin, haematoxylin
    (GLASS, False), ((255, 255, 255), False),                          # glass
    ((25, 25, 35), False),                                             # black ink / fold
    ((60, 140, 210), False), ((40, 150, 170), False),                  # blue, cyan ink
])
def test_hsv_rule_on_typical_colours(colour, tissue):
    image = np.full((4, 4, 3), colour, np.uint8)
    assert tissue_mask(image).all() == tissue and tissue_mask(image).any() == tissue


def test_hsv_rule_marks_tissue_on_real_slides(cmu_slide, tcga_slide):
    """The reading we chose marks the tissue: it agrees with Otsu on saturation, and the
    literal reading ("foreground = hue inside 0.5-0.65") would mark next to nothing."""
    for path in (cmu_slide, tcga_slide):
        with open_slide(path) as slide:
            thumb = slide.thumbnail(8)
        hsv = np.asarray(Image.fromarray(thumb).convert("HSV")) / 255
        literal = ((hsv[..., 0] > 0.5) & (hsv[..., 0] < 0.65) & (hsv[..., 1] > 0.1)
                   & (hsv[..., 2] > 0.5) & (hsv[..., 2] < 0.9))
        ours, otsu = tissue_mask(thumb, "hsv"), tissue_mask(thumb, "otsu")
        assert literal.mean() < 0.01
        assert ours.mean() > 0.15
        assert (ours & otsu).sum() / (ours | otsu).sum() > 0.6
        # what ours marks beyond Otsu is pale tissue next to it (saturation 0.1-0.2), not glass
        near_otsu = np.asarray(Image.fromarray(otsu.astype(np.uint8) * 255)
                               .filter(ImageFilter.MaxFilter(9))) > 0
        assert (ours & ~near_otsu).sum() < 0.02 * ours.sum()
    # CMU-1-Small-Region: the top-right corner is glass
    with open_slide(cmu_slide) as slide:
        corner = slide.read_region((1700, 0), 0, (500, 500))
    assert tissue_mask(corner).mean() < 0.01


def test_otsu_threshold_and_blank_image():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(40, 5, 5000), rng.normal(180, 8, 5000)])
    values = values.clip(0, 255).astype(np.uint8)
    threshold = _otsu_threshold(values)
    assert values[values < 110].max() <= threshold < values[values > 110].min()

    def within_class_variance(t):  # Otsu (1979): minimise the weighted within-class variance
        low, high = values[values <= t], values[values > t]
        return sum(len(c) * c.var() for c in (low, high) if len(c))

    skewed = rng.gamma(2.0, 30.0, 4000).clip(0, 255).astype(np.uint8)
    for data in (values, skewed):
        values = data
        best = min(within_class_variance(t) for t in range(255))
        assert within_class_variance(_otsu_threshold(data)) == pytest.approx(best, rel=1e-9)
    blank = np.full((32, 32, 3), GLASS, np.uint8)
    blank[::3] += 2  # a little noise for Otsu to split
    assert not tissue_mask(blank, "otsu").any() and not tissue_mask(blank, "hsv").any()
    with pytest.raises(ValueError, match="hsv"):
        tissue_mask(blank, "lab")


# --------------------------------------------------------------------------- tiling

@pytest.mark.parametrize("target, level, read_size, size0", [
    (0.5, 1, 224, 448),    # level 1 is exactly 0.5 um/px
    (0.6, 1, 269, 538),    # coarsest level <= 0.6 is level 1; 269 px resized to 224
    (1.0, 2, 224, 896),
    (0.3, 0, 269, 269),    # only level 0 is fine enough
    (0.2, 0, 179, 179),    # finer than the scan: level 0, upsampled (a warning)
])
def test_level_choice(pyramid, target, level, read_size, size0):
    with open_slide(pyramid) as slide:
        grid = tile_grid(slide, target_mpp=target, min_foreground=0)
    assert (grid.level, grid.read_size, grid.patch_size_level0) == (level, read_size, size0)
    width, height = 1536, 1280
    assert len(grid) == (width // size0) * (height // size0)
    assert (grid.coords % size0 == 0).all()
    assert (grid.coords[:, 0] + size0 <= width).all()
    assert (grid.coords[:, 1] + size0 <= height).all()


def test_foreground_fraction_selects_the_tissue_patches(pyramid):
    with open_slide(pyramid) as slide:
        grid = tile_grid(slide, target_mpp=0.5)  # 448 level-0 px per patch, 3 x 2 patches
    # box 1 (x 0-896, y 0-448) fills patches (0, 0) and (448, 0); box 2 covers parts of
    # four patches; each kept patch's fraction is its geometric overlap with the boxes
    kept = {tuple(c) for c in grid.coords.tolist()}
    assert {(0, 0), (448, 0)} <= kept
    assert (896, 0) not in kept
    for (x, y), fraction in zip(grid.coords.tolist(), grid.foreground):
        overlap = sum(max(0, min(x + 448, bx + bw) - max(x, bx)) *
                      max(0, min(y + 448, by + bh) - max(y, by)) / 448 ** 2
                      for bx, by, bw, bh in [(0, 0, 896, 448), (1008, 672, 448, 448)])
        assert fraction == pytest.approx(overlap, abs=0.08)
        assert overlap >= 0.45


def test_patch_reader_reads_at_level_and_resizes(pyramid):
    with open_slide(pyramid) as slide:
        grid = tile_grid(slide, target_mpp=0.6, min_foreground=0)
        reader = PatchReader(grid)
        x, y = grid.coords[1]
        patch = reader.read(1)
        direct = slide.read_region((int(x), int(y)), 1, (269, 269))
    expected = np.asarray(Image.fromarray(direct).resize((224, 224), Image.Resampling.BILINEAR))
    assert patch.shape == (224, 224, 3) and patch.dtype == np.uint8
    np.testing.assert_array_equal(patch, expected)
    reader.close()


def test_corrupt_tile_fails_alone(tmp_path):
    image = tissue_image(1024, 1024, [(0, 0, 1024, 1024)], seed=2)
    path = write_slide(tmp_path / "corrupt.tif", image, mpp=0.5, levels=1)
    corrupt_tile(path, level=0, x=300, y=300)  # the tile (256-511, 256-511)
    with open_slide(path) as slide:
        grid = tile_grid(slide, target_mpp=0.5, min_foreground=0)  # patches of 224 px
    reader = PatchReader(grid)
    bad = {i for i, (x, y) in enumerate(grid.coords.tolist())
           if x < 512 and x + 224 > 256 and y < 512 and y + 224 > 256}
    for index in range(len(grid)):
        if index in bad:
            with pytest.raises(TileReadError, match="could not be read"):
                reader.read(index)
        else:  # the handle was reopened after the error: later reads work
            assert reader.read(index).shape == (224, 224, 3)
    reader.close()


def test_thumbnail_survives_a_corrupt_tile(tmp_path, caplog):
    image = tissue_image(1024, 1024, [(0, 0, 1024, 1024)], seed=2)
    path = write_slide(tmp_path / "corrupt.tif", image, mpp=0.5, levels=1)
    corrupt_tile(path, level=0, x=600, y=100)  # the tile x 512-767, y 0-255
    with open_slide(path) as slide:
        thumb = slide.thumbnail(4)  # one block: it fails, then is read tile by tile
    mask = tissue_mask(thumb)
    assert not mask[:64, 128:192].any()  # the corrupt tile only: background
    assert mask[64:, :].mean() > 0.95 and mask[:64, :128].mean() > 0.95
    assert "unreadable" in caplog.text


def test_large_slide_mask_stays_bounded(tmp_path, monkeypatch):
    """The mask thumbnail is capped at MASK_MAX_SIDE (here lowered to 256 so that an
    8,000 x 4,800 px slide exercises the cap) and read block by block."""
    import histohub.slides._tiling as tiling

    monkeypatch.setattr(tiling, "MASK_MAX_SIDE", 256)
    image = np.full((4800, 8000, 3), 245, np.uint8)
    image[1600:2048, 4000:5344] = PINK
    path = write_slide(tmp_path / "large.tif", image, mpp=0.5, levels=4)
    with open_slide(path) as slide:
        grid = tile_grid(slide, target_mpp=0.5)
        whole = slide.thumbnail(grid.mask_downsample, block=10_000)
        blocks = slide.thumbnail(grid.mask_downsample, block=37)
    assert max(grid.mask.shape) == 256 and grid.mask_downsample == pytest.approx(8000 / 256)
    assert grid.n_candidates == (8000 // 224) * (4800 // 224)
    # tissue at x 4000-5344, y 1600-2048: patches with >= 50% of it are 2 rows of 6
    assert 10 <= len(grid) <= 13
    assert grid.coords[:, 0].min() >= 4000 - 112 and grid.coords[:, 0].max() <= 5344 - 112
    assert whole.shape == blocks.shape
    assert np.abs(whole.astype(int) - blocks.astype(int)).mean() < 2


def test_preview_png(pyramid, tmp_path):
    with open_slide(pyramid) as slide:
        grid = tile_grid(slide, target_mpp=0.5)
        out = preview(slide, grid, tmp_path / "p.png", max_side=400)
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert max(image.shape[:2]) == 400
    # the tissue is tinted green, the glass is not
    assert image[20:60, 20:100, 1].mean() > image[20:60, 20:100, 0].mean()
    assert abs(image[-20:, :30, 1].mean() - GLASS[1]) < 6
    assert not (tmp_path / "p.png.partial").exists()


def testbatch_ranges_align_to_batch_size():
    assert batch_ranges(0, 10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert batch_ranges(8, 10, 4) == [range(8, 10)]
    assert batch_ranges(6, 13, 4) == [range(6, 8), range(8, 12), range(12, 13)]
    assert batch_ranges(10, 10, 4) == []
