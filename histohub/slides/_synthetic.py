"""Synthetic whole-slide images OpenSlide reads: tiled, JPEG-compressed pyramidal TIFFs.

``write_demo_slide`` gives a new user a slide to run ``histohub extract`` on before they
point it at their own (``histohub demo-slide``); the tests and benchmarks build their slides
with ``write_slide`` and ``tissue_image``. OpenSlide's generic-tiff driver needs tiled
levels; it takes microns per pixel from the TIFF resolution tags. tifffile writes the tiles,
JPEG-encoded with PIL (no imagecodecs needed).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PINK = (222, 150, 200)     # eosin-like, hue about 320 degrees
PURPLE = (150, 95, 175)    # haematoxylin-like
GLASS = (242, 240, 244)


def _allow_precompressed_jpeg() -> None:
    """tifffile looks up a JPEG encoder even when it is handed encoded tiles; without
    imagecodecs there is none, so register a placeholder that is never called."""
    import tifffile._imagecodecs as codecs

    if not hasattr(codecs, "jpeg_encode"):
        codecs.jpeg_encode = None


def _tiles(image: np.ndarray, tile: int, quality: int):
    cache: dict[bytes, bytes] = {}
    height, width, _ = image.shape
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            part = image[y:y + tile, x:x + tile]
            block[:part.shape[0], :part.shape[1]] = part
            key = block.tobytes() if block.min() == block.max() else None
            if key is not None and key in cache:  # identical blank tiles: encode once
                yield cache[key]
                continue
            buffer = io.BytesIO()
            Image.fromarray(block).save(buffer, format="JPEG", quality=quality)
            if key is not None:
                cache[key] = buffer.getvalue()
            yield buffer.getvalue()


def write_slide(path: str | Path, image: np.ndarray, *, mpp: float | None = 0.5,
                levels: int = 3, tile: int = 256, quality: int = 90) -> Path:
    """Write RGB uint8 ``(H, W, 3)`` as a pyramid (each level half the previous one)."""
    import tifffile

    _allow_precompressed_jpeg()
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as writer:
        level = np.ascontiguousarray(image)
        for index in range(levels):
            options = {}
            if mpp is not None:
                pixels_per_cm = 1e4 / (mpp * 2 ** index)
                options = {"resolution": (pixels_per_cm, pixels_per_cm),
                           "resolutionunit": "CENTIMETER"}
            writer.write(_tiles(level, tile, quality), shape=level.shape, dtype=np.uint8,
                         tile=(tile, tile), compression="jpeg", photometric="ycbcr",
                         subsampling=(2, 2), subfiletype=0 if index == 0 else 1,
                         metadata=None, **options)
            if min(level.shape[:2]) < 2 * tile:
                break
            level = np.asarray(Image.fromarray(level).reduce(2))
    return path


def tissue_image(height: int, width: int, boxes: list[tuple[int, int, int, int]], *,
                 seed: int = 0) -> np.ndarray:
    """Glass with textured H&E-coloured rectangles ``(x, y, w, h)``: (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = GLASS
    for x, y, w, h in boxes:
        region = np.where(rng.random((h, w, 1)) < 0.3, PURPLE, PINK).astype(np.int16)
        region += rng.integers(-12, 13, size=(h, w, 3), dtype=np.int16)
        image[y:y + h, x:x + w] = region.clip(0, 255).astype(np.uint8)
    return image


def write_demo_slide(path: str | Path) -> Path:
    """A 4,096 x 3,072 px slide at 0.5 um/px (a 2 x 1.5 mm region at 20x): three sections of
    H&E-coloured texture on glass, one with a hole, in a three-level pyramid (about 4 MB).
    Synthetic: it shows the pipeline working, not what a model sees in tissue."""
    image = tissue_image(3072, 4096, [(256, 384, 1536, 1024), (2048, 256, 1536, 1280),
                                      (768, 1792, 2560, 1024)], seed=7)
    image[640:1024, 768:1280] = GLASS  # a lumen: glass inside a section
    return write_slide(path, image, mpp=0.5, levels=3)
