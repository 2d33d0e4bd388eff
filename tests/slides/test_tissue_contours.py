"""The default 'contours' mask: keeps dense and pale tissue and holes, drops ink and dust;
measured against known masks (synthetic case from real H&E) and on the CMU slide."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2")

from histohub.slides._tissue import DEFAULT_MASK, tissue_mask  # noqa: E402
from histohub.slides import open_slide, tile_grid  # noqa: E402

MPP = 3.5  # the mask's microns per pixel when 224 px patches are cut at 0.5 um/px


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_default_mask_is_contours():
    assert DEFAULT_MASK == "contours"


def test_dark_tissue_kept_with_its_hole_ink_and_dust_dropped():
    rng = np.random.default_rng(0)
    image = np.full((300, 400, 3), 242, np.uint8)
    tissue = np.zeros((300, 400), bool)
    yy, xx = np.mgrid[0:300, 0:400]
    tissue[(yy - 150) ** 2 / 110 ** 2 + (xx - 200) ** 2 / 160 ** 2 < 1] = True
    hole = (yy - 150) ** 2 + (xx - 150) ** 2 < 25 ** 2
    tissue &= ~hole
    dark = np.array([95, 45, 120]) + rng.integers(-15, 15, (300, 400, 3))  # value < 0.5
    image[tissue] = dark[tissue].clip(0, 255)
    ink = (np.abs(xx - 300) < 8) & (yy > 20)  # a blue stroke across tissue and glass
    image[ink] = (image[ink] * np.array([0.2, 0.35, 0.8])).astype(np.uint8)
    image[10:13, 20:23] = 90  # dust
    truth = tissue & ~ink
    mask = tissue_mask(image, "contours", mpp=MPP)
    assert _iou(mask, truth) > 0.95
    assert mask[ink].mean() < 0.02 and not mask[10:13, 20:23].any() and not mask[hole].any()
    assert tissue_mask(image, "hsv")[truth].mean() < 0.5  # the paper's rule drops it


def test_contours_need_mpp():
    with pytest.raises(ValueError, match="mpp"):
        tissue_mask(np.zeros((8, 8, 3), np.uint8), "contours")


@pytest.fixture(scope="module")
def pools():
    from tissue_slides import tiles

    found = tiles()
    if found is None:
        pytest.skip("shared data (../shared/data) absent")
    return found


def test_known_masks_from_real_tissue(pools):
    import cv2
    from tissue_slides import make_case

    case = make_case(3, pools, size=(3200, 2400))  # 3 sections: dense, ordinary, pale; 3 inks
    thumb = cv2.resize(case.rgb, (3200 // 7, 2400 // 7), interpolation=cv2.INTER_AREA)

    def on_grid(region):
        return cv2.resize(region.astype(np.float32), thumb.shape[1::-1],
                          interpolation=cv2.INTER_AREA) > 0.5

    truth, ink, dense = on_grid(case.tissue), on_grid(case.ink), on_grid(case.dense)
    mask = tissue_mask(thumb, "contours", mpp=MPP)
    assert _iou(mask, truth) >= 0.95
    assert mask[ink].mean() < 0.02
    hsv = tissue_mask(thumb, "hsv")
    assert mask[dense].mean() > 0.95 > 0.5 > hsv[dense].mean()


def test_cmu_every_half_stained_patch_is_extracted(cmu_slide):
    """Stained: level-0 saturation > 0.1 (the paper's own saturation bound, no value bound,
    no blur); every 224 px patch at 0.5 um/px at least half stained is in the default grid,
    the dark epidermis included (the paper's HSV rule leaves many out)."""
    import cv2

    with open_slide(cmu_slide) as slide:
        grid = tile_grid(slide, target_mpp=0.5, method=DEFAULT_MASK)
        hsv_grid = tile_grid(slide, target_mpp=0.5, method="hsv")
        image = slide.read_region((0, 0), 0, slide.dimensions)
    stained = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)[..., 1] > 25
    size = grid.patch_size_level0
    wanted = {(x, y) for y in range(0, image.shape[0] - size + 1, size)
              for x in range(0, image.shape[1] - size + 1, size)
              if stained[y:y + size, x:x + size].mean() >= 0.5}
    kept = {tuple(c) for c in grid.coords.tolist()}
    assert len(wanted) > 30 and wanted <= kept
    assert not wanted <= {tuple(c) for c in hsv_grid.coords.tolist()}
