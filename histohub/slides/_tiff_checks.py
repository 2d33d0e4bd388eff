"""What a TIFF-based slide declares, checked before a native library acts on it.

OpenSlide (through libtiff) allocates each tile's declared size with glib's ``g_malloc``,
which aborts the whole process when it cannot: a file whose ``TileByteCounts`` says
2^31 - 1, or whose ``TileWidth``/``TileLength`` say 65520 (a 17 GB tile), takes every
slide in flight down with it (issue 23). ``check_tiled_tiff`` reads the tile tags of every
tiled page (tifffile, no pixel data) and refuses, with a ``SlideError``, a file whose tiles
could not be what they say:

- a tile larger than ``MAX_TILE_BYTES`` decoded (scanners write 240-1024 px tiles: 3 MiB
  at most; the bound leaves 16x room);
- a tile whose bytes lie past the end of the file;
- a tile declaring more bytes than twice its pixels (no codec writes that).

Files that are not TIFFs, and a system without tifffile, are left to OpenSlide; a native
crash that still happens is confined to one slide by ``histohub.slides._guard``.
"""

from __future__ import annotations

import os

import numpy as np

from histohub.errors import SlideError

#: The largest tile (decoded bytes) a slide may declare: 64 MiB, a 4096 px RGBA tile.
MAX_TILE_BYTES = 64 << 20
#: Room above a tile's decoded size that its stored bytes may take (headers, tables).
_STORED_SLACK = 1 << 20
_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Files (device, inode, size, mtime, ctime) found sound in this process.
_PASSED: set[tuple[int, ...]] = set()


def check_tiled_tiff(path: str | os.PathLike) -> None:
    """Raise ``SlideError`` when a tiled page of the TIFF at ``path`` declares tiles that no
    real slide holds (see the module); return quietly for other files."""
    try:
        import tifffile
    except ImportError:
        return
    stat = os.stat(path)
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key in _PASSED:  # each reader thread and worker opens the slide again
        return
    with open(path, "rb") as handle:
        if handle.read(4) not in _MAGIC:
            return
    file_size = stat.st_size
    try:
        with tifffile.TiffFile(path) as tif:
            tiled = [(index, _declared(page)) for index, page in enumerate(tif.pages)
                     if getattr(page, "is_tiled", False)]
    except (tifffile.TiffFileError, ValueError, OSError, IndexError):
        return  # not a TIFF tifffile parses: OpenSlide says what is wrong with it
    for index, declared in tiled:
        _check_page(path, index, *declared, file_size=file_size)
    if len(_PASSED) > 4096:
        _PASSED.clear()
    _PASSED.add(key)


def _declared(page) -> tuple[int, int, int, np.ndarray, np.ndarray]:
    """A tiled page's tile (width, height, decoded bytes), tile offsets and byte counts."""
    width, height = int(page.tilewidth), int(page.tilelength)
    samples = max(1, int(page.samplesperpixel))
    bits = page.bitspersample if np.isscalar(page.bitspersample) else max(page.bitspersample)
    decoded = width * height * samples * max(1, -(-int(bits) // 8))
    return (width, height, decoded, np.asarray(page.dataoffsets, np.int64),
            np.asarray(page.databytecounts, np.int64))


def _check_page(path, index: int, width: int, height: int, decoded: int,
                offsets: np.ndarray, counts: np.ndarray, *, file_size: int) -> None:
    where = f"{os.fspath(path)}: page {index}"
    advice = "a crafted or damaged slide, not read (check the file, or scan it again)"
    if decoded > MAX_TILE_BYTES:
        raise SlideError(f"{where} declares {width} x {height} px tiles ({decoded} bytes "
                         f"each, histohub allows {MAX_TILE_BYTES}): {advice}")
    if len(counts) == 0:
        return
    ends = offsets + counts
    worst = int(np.argmax(ends))
    if ends[worst] > file_size:
        raise SlideError(f"{where}: tile {worst} declares {int(counts[worst])} bytes at offset "
                         f"{int(offsets[worst])}, past the end of the {file_size}-byte file: "
                         f"{advice}")
    largest = int(np.argmax(counts))
    if counts[largest] > 2 * decoded + _STORED_SLACK:
        raise SlideError(f"{where}: tile {largest} declares {int(counts[largest])} bytes for "
                         f"{width} x {height} px: {advice}")
