"""Regions of a JPEG-tiled TIFF level (Aperio .svs, generic tiled TIFF) decoded straight from
its tiles: the same pixels as OpenSlide, 2.74x the patches/s of a reader thread
(``benchmarks/bench_slides.py``, reader part; docs/benchmarks.md).

OpenSlide composites every region through cairo and hands back premultiplied ARGB, which
cost more than decoding the JPEG tiles a 224 px patch needs (0.75 ms for a patch whose
tiles were cached, on 2 vCPUs). ``JpegTileLevel`` reads a tile's bytes with ``os.pread``
(no shared file position: one reader per thread is safe, and the read releases the GIL),
decodes them with imagecodecs' libjpeg-turbo straight into a numpy array, the GIL released
while it decodes (0.21 ms per 256 px tile; Pillow took 0.39, through its 4-byte pixels and
two copies out that hold the GIL), and copies the region out. Decoded tiles go to one LRU
cache per process (``TileCache``, at most ``CACHE_BYTES``): reader threads take turns at a
slide's batches, and neighbouring batches share tiles, which are then decoded once, not
once per thread. A file's tiles leave the cache when the last level open on it is closed,
as an OpenSlide handle's cache does.

Only what is known to match OpenSlide is read here; everything else raises ``Unsupported``
and is read by OpenSlide (``_reader.Slide``, which also compares a piece of the first
region it reads from a level with OpenSlide's and keeps to OpenSlide when they differ):

- ``open_jpeg_level`` gives a level only for OpenSlide's 'aperio' and 'generic-tiff' formats
  (plain tile grids, no overlaps), a tiled page of exactly the level's size, 8-bit, three
  samples, interleaved, JPEG, RGB or YCbCr (Aperio's RGB tiles are decoded without colour
  conversion, as OpenSlide does);
- a region outside the level or touching a tile the file does not hold (or only in part),
  a tile whose image data holds a marker (cut short, overwritten: ``check_scan``), or one
  libjpeg cannot decode, is ``Unsupported`` (OpenSlide says what is wrong with it). Bit
  errors that leave a tile's structure intact decode to wrong pixels here, as they mostly
  do in OpenSlide (libjpeg warns about some of them, which OpenSlide reports and
  imagecodecs does not).

``HISTOHUB_JPEG_TILES=0`` in the environment turns this module off, and so does a system
without ``os.pread`` (Windows) or without tifffile and imagecodecs (the ``wsi`` extra; a
warning says so, once): OpenSlide reads everything.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

from histohub._env import jpeg_tiles_enabled

try:  # with this module (25 ms beside numpy), not in the thread that tiles a slide
    import imagecodecs
    import tifffile
except ImportError:  # optional (the wsi extra): without them OpenSlide reads everything
    imagecodecs = tifffile = None

log = logging.getLogger(__name__)

#: OpenSlide formats whose levels are plain grids of TIFF tiles.
VENDORS = ("aperio", "generic-tiff")
#: Decoded tiles kept per process (a 256 px tile is 192 KiB: about 340 tiles, more than two
#: tile rows of a 40,000 px wide level, so a row of patches reuses the row above's tiles).
CACHE_BYTES = 64 << 20
#: Tiles larger than this a side are left to OpenSlide (scanners write 240-1024 px): a
#: file declaring huge tiles would have each one allocated in full before decoding.
MAX_TILE_SIDE = 4096
#: JPEG start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC); baseline is C0 / C1.
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: In a scan, FF may only be followed by 00 (stuffing), FF (fill) or D0-D7 (restarts): one
#: pass in C (half the time of numpy's, holding the GIL less: reader threads wait on it).
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


class Unsupported(Exception):
    """This region is not read here: read it with OpenSlide."""


class TileCache:
    """Decoded tiles shared by the threads of a process, keyed ``(file, tile)``: least
    recently used first out, at most ``CACHE_BYTES``; a tile one thread is decoding is waited
    for, not decoded again. ``open(file)`` / ``close(file)`` count a file's users; its tiles
    are dropped when the last one closes."""

    def __init__(self) -> None:
        self._tiles: OrderedDict[tuple[Hashable, Hashable], np.ndarray] = OrderedDict()
        self._decoding: dict[tuple[Hashable, Hashable], threading.Lock] = {}
        self._users: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._tiles)

    def open(self, file: Hashable) -> None:
        with self._lock:
            self._users[file] = self._users.get(file, 0) + 1

    def close(self, file: Hashable) -> None:
        with self._lock:
            self._users[file] -= 1
            if self._users[file] == 0:
                del self._users[file]
                for key in [key for key in self._tiles if key[0] == file]:
                    self.nbytes -= self._tiles.pop(key).nbytes

    def get(self, key: tuple[Hashable, Hashable], decode: Callable[[], np.ndarray]
            ) -> np.ndarray:
        while True:
            with self._lock:
                tile = self._tiles.get(key)
                if tile is not None:
                    self._tiles.move_to_end(key)
                    return tile
                busy = self._decoding.get(key)
                if busy is None:  # held while this thread decodes (a Lock: in C, unlike Event)
                    self._decoding[key] = threading.Lock()
                    self._decoding[key].acquire()
                    break
            with busy:  # wait for it, then look again (a failed decoding is tried again here)
                pass
        try:
            tile = decode()
            with self._lock:
                if key[0] in self._users:  # not if the file was closed meanwhile
                    self._tiles[key] = tile
                    self.nbytes += tile.nbytes
                while self.nbytes > CACHE_BYTES and len(self._tiles) > 1:
                    self.nbytes -= self._tiles.popitem(last=False)[1].nbytes
            return tile
        finally:
            with self._lock:
                self._decoding.pop(key).release()

    def forget_threads(self) -> None:
        """In a forked child: none of the parent's threads came along, so a lock one of them
        held, or a tile one was decoding, would be waited for forever."""
        self._lock = threading.Lock()
        self._decoding = {}

    def clear(self) -> None:
        """Drop every tile (files stay open)."""
        with self._lock:
            self._tiles.clear()
            self.nbytes = 0


#: The process's decoded tiles (see ``TileCache``).
TILE_CACHE = TileCache()
if hasattr(os, "register_at_fork"):  # DataLoader workers fork while a thread may read
    os.register_at_fork(after_in_child=TILE_CACHE.forget_threads)


class JpegTileLevel:
    """One tiled TIFF page: ``read(x, y, w, h)`` -> RGB uint8 ``(h, w, 3)`` in the page's px.

    Made by ``open_jpeg_level``; one per reading thread (tiles are shared through
    ``TILE_CACHE``); ``close()`` closes its file.
    """

    def __init__(self, path: str | os.PathLike, *, tile_size: tuple[int, int],
                 image_size: tuple[int, int], offsets, byte_counts, jpeg_tables: bytes | None,
                 rgb: bool) -> None:
        self.tile_w, self.tile_h = tile_size
        self.width, self.height = image_size
        self._across = -(-self.width // self.tile_w)
        self._offsets = np.asarray(offsets, np.int64)
        self._counts = np.asarray(byte_counts, np.int64)
        # abbreviated tiles (Aperio) share one tables stream: tables without their EOI, then
        # the tile without its SOI
        self._prefix = jpeg_tables[:-2] if jpeg_tables else b""
        self._colorspace = imagecodecs.JPEG8.CS.RGB if rgb else imagecodecs.JPEG8.CS.YCbCr
        self._fd: int | None = os.open(path, os.O_RDONLY)
        # the cache's key: this file as it is now (ctime: any rewrite, even one that keeps
        # the size and sets the old mtime), and a tile's offset in it
        stat = os.fstat(self._fd)
        self._file = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        TILE_CACHE.open(self._file)

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the region at (x, y) in this level's px."""
        if self._fd is None:
            raise ValueError("the level is closed")
        if x < 0 or y < 0 or w < 1 or h < 1 or x + w > self.width or y + h > self.height:
            raise Unsupported("region outside the level")
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(y // self.tile_h, (y + h - 1) // self.tile_h + 1):
            for tx in range(x // self.tile_w, (x + w - 1) // self.tile_w + 1):
                index = ty * self._across + tx
                tile = TILE_CACHE.get((self._file, self._tile_key(index)),
                                      lambda: self._decode(index))
                left, top = tx * self.tile_w, ty * self.tile_h
                x0, y0 = max(x, left), max(y, top)
                x1, y1 = min(x + w, left + self.tile_w), min(y + h, top + self.tile_h)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - top:y1 - top, x0 - left:x1 - left]
        return out

    def _tile_key(self, index: int) -> int:
        if index >= len(self._counts) or self._counts[index] <= 0:
            raise Unsupported(f"tile {index} is not in the file")
        if self._counts[index] > 4 * self.tile_w * self.tile_h * 3 + 65536:
            raise Unsupported(f"tile {index} claims {self._counts[index]} bytes")  # not JPEG's
        return int(self._offsets[index])

    def _decode(self, index: int) -> np.ndarray:
        try:
            data = os.pread(self._fd, int(self._counts[index]), int(self._offsets[index]))
        except OSError as error:  # a failing disk: OpenSlide reads it, and reports it
            raise Unsupported(f"tile {index}: {error}") from error
        if len(data) != self._counts[index]:
            raise Unsupported(f"tile {index} lies past the end of the file")
        if self._prefix:
            data = self._prefix + data[2:]
        if check_scan(data) != (self.tile_h, self.tile_w, 3):
            raise Unsupported(f"tile {index} is not a {self.tile_w} px RGB JPEG")
        # the colour space the TIFF says, not libjpeg's guess: tiles stored as RGB are taken
        # as they are, unconverted, as OpenSlide does
        try:
            tile = imagecodecs.jpeg8_decode(data, colorspace=self._colorspace,
                                            outcolorspace=imagecodecs.JPEG8.CS.RGB)
        except imagecodecs.Jpeg8Error as error:  # libjpeg's decoding errors
            raise Unsupported(f"tile {index}: {error}") from error
        tile.flags.writeable = False  # shared by every reader of the cache
        return tile

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            TILE_CACHE.close(self._file)


def check_scan(data: bytes) -> tuple[int, int, int]:
    """``(height, width, components)`` of the baseline JPEG ``data``; ``Unsupported`` unless it
    is headers, then one scan of image data with no marker but restarts inside, then its end.

    libjpeg only warns where a scan is cut short by a marker (a tile cut off, or overwritten
    by other bytes); OpenSlide makes that warning an error, Pillow ignores it. Such a tile
    goes to OpenSlide, so that it is reported as it would be without this module.
    """
    frame = None
    pos = 2 if data[:2] == b"\xff\xd8" else -1
    while 0 <= pos < len(data) - 3 and data[pos] == 0xFF and data[pos + 1] != 0xDA:
        if data[pos + 1] in _FRAMES:  # start of frame: coding, precision, size, components
            frame = (data[pos + 1], data[pos + 4], int.from_bytes(data[pos + 5:pos + 7], "big"),
                     int.from_bytes(data[pos + 7:pos + 9], "big"), data[pos + 9])
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")  # a header segment
    if pos < 0 or pos >= len(data) - 3 or data[pos] != 0xFF or data[-2:] != b"\xff\xd9" \
            or frame is None or frame[:2] not in ((0xC0, 8), (0xC1, 8)):
        raise Unsupported("not a baseline 8-bit JPEG tile")
    start = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    if _MARKER_IN_SCAN.search(data, start, len(data) - 2):
        raise Unsupported("a marker inside the tile's image data")
    return frame[2:]


def open_jpeg_level(path: str | os.PathLike, vendor: str | None,
                    size: tuple[int, int]) -> JpegTileLevel | None:
    """The level of ``size`` (w, h) of the slide at ``path`` (OpenSlide ``vendor``) for
    ``JpegTileLevel`` reads, or None when it is not one they handle (see the module)."""
    if not hasattr(os, "pread") or vendor not in VENDORS or \
            not jpeg_tiles_enabled():
        return None
    if imagecodecs is None:
        _say_no_decoder()
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [page for page in tif.pages
                     if (page.imagewidth, page.imagelength) == tuple(size) and page.is_tiled]
            if len(pages) != 1:
                return None
            page = pages[0]
            photometric = tifffile.PHOTOMETRIC
            if (page.compression != tifffile.COMPRESSION.JPEG
                    or page.photometric not in (photometric.RGB, photometric.YCBCR)
                    or page.samplesperpixel != 3 or page.bitspersample != 8
                    or page.planarconfig != 1 or page.tiledepth != 1 or page.imagedepth != 1
                    or not 0 < page.tilewidth <= MAX_TILE_SIDE
                    or not 0 < page.tilelength <= MAX_TILE_SIDE):
                return None
            return JpegTileLevel(
                path, tile_size=(page.tilewidth, page.tilelength), image_size=tuple(size),
                offsets=page.dataoffsets, byte_counts=page.databytecounts,
                jpeg_tables=page.jpegtables, rgb=page.photometric == photometric.RGB)
    except (OSError, ValueError, tifffile.TiffFileError) as error:
        log.debug("%s: not read tile by tile (%s)", path, error)
        return None


@functools.cache
def _say_no_decoder() -> None:
    """Once per process: what a slide is read at without tifffile and imagecodecs."""
    log.warning("histohub reads slides through OpenSlide alone, at less than half the patches/s "
                "of decoding their JPEG tiles itself: pip install tifffile imagecodecs (both in "
                "histohub's 'wsi' extra)")
