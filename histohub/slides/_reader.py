"""Whole-slide images: open a slide and read its pixels.

- ``open_slide(path)`` wraps OpenSlide with a clear ``SlideError`` for files that are not
  slides, and reads microns per pixel (mpp) from the metadata, never guessing it.
- ``Slide`` reads levels of JPEG tiles (.svs, tiled TIFF) straight from their tiles
  (``_jpeg_tiles``), the mask's thumbnail as well as the patches, block by block.
- ``PatchReader`` reads one patch of a grid (``_tiling``) at the chosen pyramid level and
  resizes it to ``patch_size``; a tile that fails to decode is reported, not fatal.
  Batches of patches: ``_batches``; a picture of the grid: ``_preview``.
- ``slide_fingerprint(path)`` tells two slide files apart without reading them whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histohub.errors import SlideError, require
from histohub.slides._jpeg_tiles import JpegTileLevel, Unsupported, open_jpeg_level
from histohub.slides._tiff_checks import check_tiled_tiff

if TYPE_CHECKING:
    from histohub.slides._tiling import TileGrid

log = logging.getLogger(__name__)

#: File name endings OpenSlide reads (used by the CLI to find slides in folders).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
                    ".svslide", ".bif", ".dcm", ".qptiff")
#: Plausible microns per pixel; values outside are metadata defaults (e.g. 72 dpi), not scans.
#: Also the range allowed for ``mpp`` and ``target_mpp`` options (0.25 at 40x, 0.5 at 20x).
MPP_RANGE = (0.05, 50.0)
#: Bytes read at each end of a slide file for its fingerprint.
SLIDE_SAMPLE_BYTES = 1 << 20


class Slide:
    """An open whole-slide image: an OpenSlide handle plus the metadata histohub needs.

    ``dimensions``: level-0 (width, height). ``mpp``: microns per pixel at level 0 (the mean
    of x and y), or ``None`` when the file does not record it. Use as a context manager.

    Levels of JPEG tiles in an .svs or a tiled TIFF are read straight from their tiles
    (``histohub.slides._jpeg_tiles``: the same pixels, 2.74x the patches/s), once a piece of the
    first region read from a level is found identical to OpenSlide's; everything else, and
    a level where they differ, is read by OpenSlide.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        openslide = require("openslide", extra="wsi", purpose="Reading whole-slide images")
        self.path = Path(path)
        if not self.path.is_file():
            from histohub.slides._names import broken_link

            raise SlideError(broken_link(self.path) or f"{self.path}: no such file")
        check_tiled_tiff(self.path)  # before OpenSlide allocates what the tags declare
        try:
            self._handle = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, ValueError) as error:  # Unsupported is an OpenSlideError
            raise SlideError(
                f"{self.path} is not a slide OpenSlide can read ({error}); supported formats: "
                "https://openslide.org/formats/") from error
        self._openslide = openslide
        self.dimensions: tuple[int, int] = self._handle.dimensions
        self.level_count: int = self._handle.level_count
        self.level_dimensions: tuple[tuple[int, int], ...] = self._handle.level_dimensions
        self.level_downsamples: tuple[float, ...] = self._handle.level_downsamples
        self.properties: dict[str, str] = dict(self._handle.properties)
        self.mpp_xy, self.mpp_source = _read_mpp(self.properties)
        self._tiles: dict[int, JpegTileLevel | bool] = {}  # level -> its tiles, or False
        self._tiles_checked: set[int] = set()

    @property
    def mpp(self) -> float | None:
        return None if self.mpp_xy is None else (self.mpp_xy[0] + self.mpp_xy[1]) / 2

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]
                    ) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``size`` (w, h) at ``level``; ``location`` in level-0 px.

        Transparent pixels (outside the scanned area) come back white, as glass would.
        """
        region = self._read_tiles(location, level, size)
        if region is None:
            region = np.array(self._read_openslide(location, level, size))
        return region

    def read_image(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        """``read_region`` as an RGB ``PIL.Image`` (to resize before leaving PIL)."""
        from PIL import Image

        region = self._read_tiles(location, level, size)
        if region is not None:
            return Image.fromarray(region)
        return self._read_openslide(location, level, size)

    def _read_tiles(self, location: tuple[int, int], level: int, size: tuple[int, int]
                    ) -> np.ndarray | None:
        """The region decoded from the level's JPEG tiles, or None: OpenSlide reads it."""
        tiles = self._tiles.get(level)
        if tiles is None:
            tiles = self._tiles[level] = open_jpeg_level(
                self.path, self.properties.get("openslide.vendor"),
                self.level_dimensions[level]) or False
        downsample = self.level_downsamples[level]
        x, y = location[0] / downsample, location[1] / downsample
        if tiles is False or not (x.is_integer() and y.is_integer()):
            return None  # OpenSlide places such a region between the level's pixels
        try:
            region = tiles.read(int(x), int(y), *size)
        except Unsupported:
            return None
        if level not in self._tiles_checked:  # a tile's size of it, from OpenSlide too
            w, h = min(size[0], tiles.tile_w), min(size[1], tiles.tile_h)
            expected = np.asarray(self._read_openslide(location, level, (w, h)))
            if not np.array_equal(region[:h, :w], expected):
                log.info("%s: level %d's JPEG tiles decode differently from OpenSlide's "
                         "reading; reading it through OpenSlide", self.path.name, level)
                tiles.close()
                self._tiles[level] = False
                return None
            self._tiles_checked.add(level)
        return region

    def _read_openslide(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        """OpenSlide's region as an RGB ``PIL.Image``, transparent pixels made white."""
        from PIL import Image

        image = self._handle.read_region(location, level, size)
        if image.getchannel("A").getextrema()[0] == 255:  # opaque (nearly always): in C
            return image.convert("RGB")
        rgba = np.asarray(image)
        rgb = rgba[..., :3]
        if rgba[..., 3].min() < 255:  # OpenSlide returns premultiplied alpha
            alpha = rgba[..., 3:4].astype(np.uint16)
            rgb = (rgb + (255 - alpha)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(rgb))

    def thumbnail(self, downsample: float, *, block: int = 1024) -> np.ndarray:
        """RGB uint8 image of the whole slide at ``downsample`` (level-0 px per output px).

        Read block by block from the finest level not finer than needed, so memory is the
        output plus one block, whatever the slide size.
        """
        from PIL import Image

        width, height = self.dimensions
        out_w, out_h = max(1, round(width / downsample)), max(1, round(height / downsample))
        level = self._handle.get_best_level_for_downsample(downsample)
        level_ds = self.level_downsamples[level]
        scale = downsample / level_ds  # level px per output px
        level_w, level_h = self.level_dimensions[level]
        out = np.empty((out_h, out_w, 3), np.uint8)
        for oy in range(0, out_h, block):
            for ox in range(0, out_w, block):
                ow, oh = min(block, out_w - ox), min(block, out_h - oy)
                lx, ly = round(ox * scale), round(oy * scale)
                lw = max(1, min(round((ox + ow) * scale), level_w) - lx)
                lh = max(1, min(round((oy + oh) * scale), level_h) - ly)
                region = self._read_level_block(level, lx, ly, lw, lh)
                if (lw, lh) != (ow, oh):  # resized in PIL: only the small image is copied out
                    region = region.resize((ow, oh), Image.Resampling.BOX)
                out[oy:oy + oh, ox:ox + ow] = np.asarray(region)
        return out

    def _read_level_block(self, level: int, lx: int, ly: int, lw: int, lh: int):
        """RGB ``PIL.Image`` of a block in level px; a corrupt tile inside turns only itself
        white."""
        from PIL import Image

        level_ds = self.level_downsamples[level]
        try:
            return self.read_image((round(lx * level_ds), round(ly * level_ds)), level,
                                   (lw, lh))
        except self._openslide.OpenSlideError:
            self._reopen()
        tile_w = int(self.properties.get(f"openslide.level[{level}].tile-width", 256))
        tile_h = int(self.properties.get(f"openslide.level[{level}].tile-height", 256))
        out = np.full((lh, lw, 3), 255, np.uint8)
        for ty in range(ly - ly % tile_h, ly + lh, tile_h):  # retry tile by tile
            for tx in range(lx - lx % tile_w, lx + lw, tile_w):
                x0, y0 = max(tx, lx), max(ty, ly)
                x1, y1 = min(tx + tile_w, lx + lw), min(ty + tile_h, ly + lh)
                try:
                    out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = self.read_region(
                        (round(x0 * level_ds), round(y0 * level_ds)), level, (x1 - x0, y1 - y0))
                except self._openslide.OpenSlideError as error:
                    log.warning("%s: tile at level %d (%d, %d) unreadable (%s); treated as "
                                "background in the tissue mask", self.path.name, level, tx, ty,
                                error)
                    self._reopen()
        return Image.fromarray(out)

    def _reopen(self) -> None:
        """OpenSlide handles stay in an error state after any failed read: open a new one."""
        self._handle.close()
        self._handle = self._openslide.OpenSlide(str(self.path))

    def close(self) -> None:
        self._handle.close()
        for tiles in self._tiles.values():
            if tiles:
                tiles.close()
        self._tiles.clear()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, dimensions={self.dimensions}, "
                f"levels={self.level_count}, mpp={self.mpp})")


def open_slide(path: str | os.PathLike) -> Slide:
    """Open a whole-slide image; ``SlideError`` if it is missing or not a slide."""
    return Slide(path)


def _read_mpp(properties: dict[str, str]) -> tuple[tuple[float, float] | None, str | None]:
    """Microns per pixel (x, y) from slide metadata, and where it came from; never guessed.

    ``openslide.mpp-x/y`` first (vendor metadata OpenSlide normalises), then the TIFF
    resolution tags when their unit is a length (centimetre or inch). Objective power is
    NOT used: 20x means 0.5 um/px on one scanner and 0.46 on another.
    """
    try:
        mpp = (float(properties["openslide.mpp-x"]), float(properties["openslide.mpp-y"]))
        if all(MPP_RANGE[0] <= m <= MPP_RANGE[1] for m in mpp):
            return mpp, "openslide.mpp"
    except (KeyError, ValueError):
        pass
    unit = properties.get("tiff.ResolutionUnit", "").lower()
    microns_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    try:
        res = (float(properties["tiff.XResolution"]), float(properties["tiff.YResolution"]))
    except (KeyError, ValueError):
        return None, None
    if microns_per_unit is None or min(res) <= 0:
        return None, None
    mpp = (microns_per_unit / res[0], microns_per_unit / res[1])
    if all(MPP_RANGE[0] <= m <= MPP_RANGE[1] for m in mpp):
        return mpp, "tiff.resolution"
    return None, None

# --------------------------------------------------------------------------- reading patches

class PatchReader:
    """Reads the patches of a ``TileGrid`` as RGB uint8 ``(patch_size, patch_size, 3)``.

    Opens its own OpenSlide handle (one per process or thread that reads), or takes over
    ``slide``, one already open (whose tile cache may hold the tiles just read for the
    mask), and closes it when done. A tile that fails to decode raises ``TileReadError``;
    OpenSlide's handle is unusable after any error, so the reader reopens it and the next
    patch reads normally.
    """

    def __init__(self, grid: TileGrid, *, interpolation: str = "bilinear",
                 slide: Slide | None = None) -> None:
        from PIL import Image

        self.grid = grid
        self._resample = getattr(Image.Resampling, interpolation.upper())
        self._slide: Slide | None = slide

    def _handle(self) -> Slide:
        if self._slide is None:
            self._slide = Slide(self.grid.slide_path)
        return self._slide

    def read(self, index: int) -> np.ndarray:
        """Patch ``index`` of the grid -> uint8 ``(S, S, 3)``; ``TileReadError`` if undecodable."""
        x, y = self.grid.coords[index].tolist()
        return self.read_at(x, y)

    def read_at(self, x: int, y: int) -> np.ndarray:
        from PIL import Image

        g = self.grid
        try:
            region = self._handle().read_region((x, y), g.level, (g.read_size, g.read_size))
        except Exception as error:  # OpenSlideError; the handle is now in an error state
            self.close()
            raise TileReadError(x, y, error) from error
        if g.read_size != g.patch_size:
            region = np.asarray(Image.fromarray(region).resize((g.patch_size, g.patch_size),
                                                               self._resample))
        return region

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


class TileReadError(SlideError):
    """One patch could not be read or decoded (e.g. a corrupt JPEG tile)."""

    def __init__(self, x: int, y: int, cause: BaseException) -> None:
        super().__init__(f"patch at level-0 ({x}, {y}) could not be read: {cause}")
        self.x, self.y = x, y


def slide_fingerprint(path: str | os.PathLike) -> tuple[int, str]:
    """``(size in bytes, sha256 of the size and the first and last MiB)`` of a slide file:
    tells two slides apart (the header holds the tile offsets, the end the last tiles)
    without reading tens of GB, and stays the same when the file is moved or copied. For
    formats with companion files (.mrxs, .vms) only the named file is covered."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(f"{size}\0".encode())
    with open(path, "rb") as f:
        digest.update(f.read(SLIDE_SAMPLE_BYTES))
        if size > SLIDE_SAMPLE_BYTES:
            f.seek(max(SLIDE_SAMPLE_BYTES, size - SLIDE_SAMPLE_BYTES))
            digest.update(f.read(SLIDE_SAMPLE_BYTES))
    return size, digest.hexdigest()

