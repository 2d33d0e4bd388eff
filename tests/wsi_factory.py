"""Test slides: the package's synthetic slides (``histohub.slides._synthetic``), and ways to
damage them (a tile that fails to decode)."""

from __future__ import annotations

from pathlib import Path

from histohub.slides._synthetic import GLASS, PINK, PURPLE, tissue_image, write_slide

__all__ = ["GLASS", "PINK", "PURPLE", "corrupt_tile", "tile_byte_range", "tissue_image",
           "write_slide"]


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
