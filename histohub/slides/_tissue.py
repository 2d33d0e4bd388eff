"""Tissue (foreground) masks: RGB uint8 ``(H, W, 3)`` -> bool ``(H, W)``.

``tissue_mask(rgb, method)`` is one of ``MASK_METHODS``: ``"contours"`` (the default for
extraction, ``DEFAULT_MASK``: tissue contours with holes, pen ink and debris left out;
``_contours``), the paper's HSV foreground rule (Appendix B; what training samples
pretraining patches with, as the paper did) or Otsu on saturation. ``_tiling.tile_grid``
keeps the patches it covers enough of. Measured against known masks: ``docs/tissue.md``.
"""

from __future__ import annotations

import numpy as np

#: Tissue detection methods of ``tissue_mask``.
MASK_METHODS = ("contours", "hsv", "otsu")
#: The extraction default: keeps dense dark and pale tissue, drops glass, ink and dust
#: (IoU and ink kept against known masks: ``benchmarks/bench_tissue.py``).
DEFAULT_MASK = "contours"
#: The paper's HSV bounds (Appendix B), all on [0, 1] scales.
HSV_HUE_EXCLUDED = (0.5, 0.65)
HSV_MIN_SATURATION = 0.1
HSV_VALUE_RANGE = (0.5, 0.9)
#: Otsu on saturation never sets its threshold below this (a blank slide has no tissue).
OTSU_MIN_SATURATION = 0.05


def tissue_mask(rgb: np.ndarray, method: str = "hsv", *, mpp: float | None = None
                ) -> np.ndarray:
    """Foreground (tissue) mask of an RGB uint8 ``(H, W, 3)`` image -> bool ``(H, W)``.

    ``method="contours"``: ``histohub.slides._contours.contour_mask`` at ``mpp`` (microns
    per pixel of ``rgb``, required: its sizes are in microns).

    ``method="hsv"``: the paper's rule (Appendix B): "0.65 > hue > 0.5, saturation > 0.1,
    and 0.9 > value > 0.5", bounds "determined ... to isolate the irrelevant background
    regions". How we read it (hue, saturation, value on [0, 1]; hue 1.0 = 360 degrees):

    - the hue band 0.5-0.65 is 180-234 degrees, cyan to blue. H&E tissue is pink to purple
      (hue about 0.83-0.97, 300-350 degrees, on both real test slides); cyan-blue is
      marker ink and scanner fringes. Read as "foreground = hue inside the band", the rule
      keeps 0.5% of CMU-1-Small-Region's pixels and 0% of the TCGA slide's, i.e. no
      tissue at all: it cannot be the foreground rule. So the hue band isolates irrelevant
      regions and is *excluded*;
    - saturation > 0.1 keeps stained pixels (white glass has saturation near 0);
    - 0.9 > value > 0.5 drops bright glass and very dark pixels (black ink, folds).

    Tissue = saturation > 0.1 AND 0.5 < value < 0.9 AND NOT (0.5 < hue < 0.65).
    (Known limit of the paper's value bound: the darkest, most nucleus-dense regions fall
    below value 0.5; ``method="otsu"`` keeps them.)

    ``method="otsu"``: saturation above its Otsu threshold (at least
    ``OTSU_MIN_SATURATION``), the usual CLAM-style rule.
    """
    from PIL import Image

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"tissue_mask wants an RGB uint8 (H, W, 3) array, got {rgb.dtype} "
                         f"{rgb.shape}")
    if method == "contours":
        if mpp is None:
            raise ValueError("tissue_mask(method='contours') needs mpp=, the image's microns "
                             "per pixel")
        from histohub.slides._contours import contour_mask

        return contour_mask(rgb, mpp=mpp)
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))  # each channel 0..255 for 0..1
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    if method == "hsv":
        lo, hi = (round(b * 255) for b in HSV_HUE_EXCLUDED)
        in_band = (hue > lo) & (hue < hi)
        vlo, vhi = (round(b * 255) for b in HSV_VALUE_RANGE)
        return (sat > round(HSV_MIN_SATURATION * 255)) & (val > vlo) & (val < vhi) & ~in_band
    if method == "otsu":
        threshold = max(_otsu_threshold(sat), OTSU_MIN_SATURATION * 255)
        return sat > threshold
    raise ValueError(f"Unknown mask method {method!r}; choose 'contours' (the "
                     "extraction default), 'hsv' (the paper's) or 'otsu'")


def _otsu_threshold(channel: np.ndarray) -> float:
    """Otsu's threshold of a uint8 image: maximises the between-class variance."""
    hist = np.bincount(channel.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    weight0 = np.cumsum(hist)
    weight1 = total - weight0
    sum0 = np.cumsum(hist * levels)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(np.argmax(between))

