"""Test slides: the package's synthetic slides (``histohub.slides._synthetic``), and ways to
damage them (a tile that fails to decode, tile tags a crafted file would hold)."""

from __future__ import annotations

from pathlib import Path

from histohub.slides._synthetic import GLASS, PINK, PURPLE, tissue_image, write_slide

__all__ = ["GLASS", "PINK", "PURPLE", "corrupt_tile", "forge_tiles", "tile_byte_range",
           "tissue_image", "write_slide"]


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
