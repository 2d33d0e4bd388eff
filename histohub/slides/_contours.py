"""The default extraction mask: tissue contours with holes, pen ink and debris left out.

``contour_mask(rgb, mpp=...)`` follows CLAM's segmentation (Lu et al., Nat Biomed Eng 2021,
``WholeSlideImage.segmentTissue``: median blur, saturation threshold, morphological
closing, contours with holes filtered by area) with every size given in microns (so the
result does not depend on the thumbnail's scale), and adds what CLAM lacks: blue, green
and black marker ink is found and cut out before the contours are traced.

- tissue: saturation above ``SAT_MIN`` after a median blur. Saturation, not value, keeps
  the darkest, most nucleus-dense tissue (the paper's HSV rule drops value < 0.5);
- ink: hue outside H&E's pink-to-purple range with some saturation (blue, green), violet
  more saturated than stain (blue over tissue), nearly black, or dark grey; only where it
  forms strokes (an opening by ``INK_MIN_WIDTH_UM`` spares single dark nuclei), widened
  by ``INK_MARGIN_UM`` to take the stroke's blended edges;
- contours: closing by ``CLOSING_UM``, then outer contours of at least
  ``MIN_TISSUE_AREA_UM2`` (drops dust) keeping holes of at least ``MIN_HOLE_AREA_UM2``
  (lumen, fat, cut-out ink), filled back into the mask.

``mask_polygons(mask)`` traces any bool mask into polygons with holes (GeoJSON output).
Needs OpenCV (``pip install 'histohub[wsi]'``), imported when first used.
"""

from __future__ import annotations

import numpy as np

from histohub.errors import require

#: Saturation (0-255) above which a blurred pixel is stained; glass stays below ~10.
SAT_MIN = 15
#: Median blur width before thresholding (CLAM: 7 px at its segmentation level).
MEDIAN_UM = 16.0
#: Hue band of blue and green marker ink, on OpenCV's full 0-255 scale (56 to 250 degrees);
#: H&E stays between about 260 degrees (haematoxylin) and 30 degrees through pink and red.
INK_HUE_BAND = (40, 178)
#: Ink of that hue needs at least this saturation (pale grey-blue glass is not ink).
INK_SAT_MIN = 40
#: Blue ink over tissue turns violet, near haematoxylin's hue, but more saturated than any
#: stain: up to this hue (270 degrees), at least ``INK_VIOLET_SAT_MIN`` saturation is ink
#: (0.2% of dense tumour and lymphocyte pixels of Kather 2016 qualify, singly: the opening
#: below removes them).
INK_VIOLET_HUE_MAX = 192
INK_VIOLET_SAT_MIN = 150
#: Nearly black (value below this, 0-255) is black marker (or a fold), not stain.
INK_VALUE_MAX = 60
#: Dark and grey (value and saturation below these) is ink too: green marker over red
#: tissue turns grey-brown. Stain this dark is saturated (no Kather 2016 tumour, lymphocyte,
#: stroma, complex, debris or mucosa pixel at 3.5 um/px falls below both).
INK_GREY_MAX = (130, 70)
#: Ink strokes are at least this wide; narrower dark or blue specks are nuclei.
INK_MIN_WIDTH_UM = 24.0
#: Ink is widened by this much, to take the stroke's edge blended with tissue or glass.
INK_MARGIN_UM = 4.0
#: Morphological closing of the tissue mask (joins stain around unstained gaps).
CLOSING_UM = 16.0
#: Pieces of tissue smaller than this are debris or dust (0.01 mm^2, under one 224 px
#: patch at 0.5 um/px).
MIN_TISSUE_AREA_UM2 = 10_000.0
#: Holes smaller than this are filled (gaps between cells); larger ones are lumen or fat.
MIN_HOLE_AREA_UM2 = 4_000.0


def _cv2():
    return require("cv2", extra="wsi", purpose="The tissue contours (--mask contours)")


def _odd(pixels: float) -> int:
    return max(3, int(round(pixels)) // 2 * 2 + 1)


def _disk(pixels: float) -> np.ndarray:
    size = _odd(pixels)
    return _cv2().getStructuringElement(_cv2().MORPH_ELLIPSE, (size, size))


def ink_mask(hsv: np.ndarray, *, mpp: float) -> np.ndarray:
    """Pen-ink strokes in a blurred HSV (OpenCV full-range) image -> bool ``(H, W)``."""
    cv2 = _cv2()
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    coloured = (hue >= INK_HUE_BAND[0]) & (hue < INK_HUE_BAND[1]) & (sat >= INK_SAT_MIN)
    coloured |= (hue >= INK_HUE_BAND[0]) & (hue < INK_VIOLET_HUE_MAX) & (
        sat >= INK_VIOLET_SAT_MIN)
    grey = (val < INK_GREY_MAX[0]) & (sat < INK_GREY_MAX[1])
    ink = (coloured | (val < INK_VALUE_MAX) | grey).astype(np.uint8)
    ink = cv2.morphologyEx(ink, cv2.MORPH_OPEN, _disk(INK_MIN_WIDTH_UM / mpp))
    if ink.any():
        ink = cv2.dilate(ink, _disk(2 * INK_MARGIN_UM / mpp))
    return ink.astype(bool)


def contour_mask(rgb: np.ndarray, *, mpp: float) -> np.ndarray:
    """Tissue without ink or debris, holes kept: RGB uint8 ``(H, W, 3)`` at ``mpp`` microns
    per pixel -> bool ``(H, W)`` (the filled contours that ``mask_polygons`` traces)."""
    cv2 = _cv2()
    rgb = np.ascontiguousarray(rgb)
    blurred = cv2.medianBlur(rgb, _odd(MEDIAN_UM / mpp))
    hsv = cv2.cvtColor(blurred, cv2.COLOR_RGB2HSV_FULL)
    ink = ink_mask(hsv, mpp=mpp)
    stained = ((hsv[..., 1] > SAT_MIN) & ~ink).astype(np.uint8)
    closed = cv2.morphologyEx(stained, cv2.MORPH_CLOSE, _disk(CLOSING_UM / mpp))
    closed[ink] = 0  # closing must not bridge back over a cut-out stroke's edge
    pixel_area = mpp * mpp
    polygons = _traced(closed, min_area=MIN_TISSUE_AREA_UM2 / pixel_area,
                       min_hole=MIN_HOLE_AREA_UM2 / pixel_area)
    return fill_polygons(polygons, closed.shape)


Polygon = tuple[np.ndarray, list[np.ndarray]]  # exterior (N, 2) and holes, (x, y) mask px


def _traced(mask: np.ndarray, *, min_area: float, min_hole: float) -> list[Polygon]:
    cv2 = _cv2()
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP,
                                           cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]  # (n, 4): next, previous, first child, parent
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1 or cv2.contourArea(contour) < min_area:
            continue
        holes, child = [], hierarchy[i][2]
        while child != -1:
            if cv2.contourArea(contours[child]) >= min_hole:
                holes.append(contours[child][:, 0, :])
            child = hierarchy[child][0]
        polygons.append((contour[:, 0, :], holes))
    return polygons


def fill_polygons(polygons: list[Polygon], shape: tuple[int, int]) -> np.ndarray:
    """Polygons with holes (mask px) rasterised -> bool ``shape``."""
    cv2 = _cv2()
    out = np.zeros(shape, np.uint8)
    for exterior, holes in polygons:
        cv2.drawContours(out, [exterior.reshape(-1, 1, 2).astype(np.int32)], -1, 1,
                         thickness=cv2.FILLED)
        for hole in holes:  # a hole's contour is the tissue's own border pixels: keep them
            cv2.fillPoly(out, [hole.reshape(-1, 1, 2).astype(np.int32)], 0)
            cv2.polylines(out, [hole.reshape(-1, 1, 2).astype(np.int32)], True, 1)
    return out.astype(bool)


def mask_polygons(mask: np.ndarray) -> list[Polygon]:
    """Every connected region of a bool ``(H, W)`` mask with its holes, in mask pixels
    (``(x, y)`` of the region's border pixels, as OpenCV traces them)."""
    return _traced(mask, min_area=0.0, min_hole=0.0)
