"""Synthetic whole-slide images OpenSlide reads: tiled, JPEG-compressed pyramidal TIFFs.

OpenSlide's generic-tiff driver needs tiled levels; it takes microns per pixel from the
TIFF resolution tags. tifffile writes the tiles we JPEG-encode with PIL (no imagecodecs
needed). Used by the benchmarks of this folder (imported as a sibling) and by the tests
(pytest's ``pythonpath`` lists this folder).
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


def tile_byte_range(path: str | Path, *, level: int, x: int, y: int) -> tuple[int, int]:
    """(offset, length) in the file of the JPEG tile holding level pixel (x, y)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        across = -(-page.imagewidth // page.tilewidth)
        index = (y // page.tilelength) * across + x // page.tilewidth
        return int(page.dataoffsets[index]), int(page.databytecounts[index])


def corrupt_tile(path: str | Path, *, level: int = 0, x: int, y: int) -> None:
    """Damage the JPEG tile holding level pixel (x, y) so that decoding it fails."""
    offset, length = tile_byte_range(path, level=level, x=x, y=y)
    with open(path, "r+b") as handle:
        handle.seek(offset + 2)
        handle.write(b"\x00" * min(64, length - 4))


def forge_tiles(path: str | Path, *, level: int = 0, byte_counts: int | None = None,
                tile_side: int | None = None) -> None:
    """Rewrite a level's tile tags in place, as a crafted file would: every
    ``TileByteCounts`` set to ``byte_counts``, ``TileWidth``/``TileLength`` to
    ``tile_side``. OpenSlide allocates what they declare (``g_malloc``, which aborts the
    process when it cannot): the files of issue 23."""
    import tifffile

    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[level]
        if byte_counts is not None:
            page.tags["TileByteCounts"].overwrite([byte_counts] * len(page.databytecounts))
        if tile_side is not None:
            page.tags["TileWidth"].overwrite(tile_side)
            page.tags["TileLength"].overwrite(tile_side)
