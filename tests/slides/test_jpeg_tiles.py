"""JPEG tiles decoded straight from the TIFF: the same pixels as OpenSlide, or OpenSlide."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

import histohub.slides._jpeg_tiles as jpeg_tiles
from histohub.slides._jpeg_tiles import Unsupported, check_scan, open_jpeg_level
from histohub.slides._reader import PatchReader, Slide, TileReadError, open_slide
from histohub.slides._tiling import tile_grid
from wsi_factory import tile_byte_range, tissue_image, write_slide

openslide = pytest.importorskip("openslide")
pytest.importorskip("tifffile")
pytest.importorskip("imagecodecs")


@pytest.fixture(autouse=True)
def _no_tiles_cached():
    """Each test decodes its tiles (the cache is the process's)."""
    jpeg_tiles.TILE_CACHE.clear()
    yield
    jpeg_tiles.TILE_CACHE.clear()


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """1300 x 1100 px (partial tiles at the right and bottom edges), 3 levels of 0.5 um/px x
    2^k, 256 px YCbCr JPEG tiles: what OpenSlide calls generic-tiff."""
    image = tissue_image(1100, 1300, [(0, 0, 1300, 1100)], seed=3)
    return write_slide(tmp_path_factory.mktemp("tiles") / "pyramid.tif", image, mpp=0.5)


def _level(path, level=0) -> jpeg_tiles.JpegTileLevel:
    with open_slide(path) as slide:
        tiles = open_jpeg_level(path, slide.properties.get("openslide.vendor"),
                                slide.level_dimensions[level])
    assert tiles is not None
    return tiles


def _openslide(path, level, x, y, w, h) -> np.ndarray:
    """What OpenSlide alone reads at level px (x, y)."""
    handle = openslide.OpenSlide(str(path))
    try:
        ds = handle.level_downsamples[level]
        location = (round(x * ds), round(y * ds))
        return np.asarray(handle.read_region(location, level, (w, h)).convert("RGB"))
    finally:
        handle.close()


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("region", [(0, 0, 224, 224), (200, 250, 100, 300), (1, 1, 255, 255),
                                    (256, 256, 256, 256), (1076, 876, 224, 224),
                                    (0, 0, 1300, 1100)])
def test_regions_equal_openslide(pyramid, level, region):
    x, y, w, h = (v // 2 ** level for v in region)
    tiles = _level(pyramid, level)
    if x + w > tiles.width or y + h > tiles.height:
        w, h = tiles.width - x, tiles.height - y
    np.testing.assert_array_equal(tiles.read(x, y, w, h), _openslide(pyramid, level, x, y, w, h))
    tiles.close()


def test_aperio_rgb_tiles_with_shared_tables_equal_openslide(cmu_slide):
    """CMU-1-Small-Region: Aperio, JPEG tiles stored as RGB (not YCbCr) with JPEGTables."""
    with open_slide(cmu_slide) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        grid = tile_grid(slide, target_mpp=0.5, min_foreground=0)
    tiles = _level(cmu_slide)
    assert tiles._colorspace == jpeg_tiles.imagecodecs.JPEG8.CS.RGB and tiles._prefix
    for x, y in grid.coords.tolist()[::7]:
        np.testing.assert_array_equal(tiles.read(x, y, 224, 224),
                                      _openslide(cmu_slide, 0, x, y, 224, 224))
    tiles.close()


def test_slide_reads_tiles_once_a_piece_is_checked(pyramid, monkeypatch):
    """The first region from a level is compared with OpenSlide's on one tile's size of it;
    then patches and the mask's thumbnail come from the tiles alone, equal to OpenSlide's."""
    with open_slide(pyramid) as slide:
        grid = tile_grid(slide, target_mpp=0.5, min_foreground=0)
    calls = []
    real = Slide._read_openslide
    monkeypatch.setattr(Slide, "_read_openslide",
                        lambda self, *a: calls.append(a) or real(self, *a))
    reader = PatchReader(grid)
    patches = [reader.read(i) for i in range(len(grid))]
    reader.close()
    assert [size for _, _, size in calls] == [(224, 224)]
    with open_slide(pyramid) as slide:
        thumbnail = slide.thumbnail(3)
    assert [size for _, _, size in calls[1:]] == [(256, 256)]  # level 1, checked
    monkeypatch.setattr(jpeg_tiles, "VENDORS", ())  # OpenSlide alone
    reader = PatchReader(grid)
    for i, patch in enumerate(patches):
        np.testing.assert_array_equal(patch, reader.read(i))
    reader.close()
    with open_slide(pyramid) as slide:
        np.testing.assert_array_equal(thumbnail, slide.thumbnail(3))


def test_slide_keeps_to_openslide_where_the_tiles_differ(pyramid, monkeypatch, caplog):
    real = jpeg_tiles.JpegTileLevel._decode
    monkeypatch.setattr(jpeg_tiles.JpegTileLevel, "_decode",
                        lambda self, index: real(self, index) ^ np.uint8(1))
    reader_log = caplog.at_level(logging.INFO, logger="histohub.slides._reader")
    with open_slide(pyramid) as slide, reader_log:
        first = slide.read_region((0, 0), 0, (224, 224))
        assert "reading it through OpenSlide" in caplog.text
        assert slide._tiles[0] is False
        second = slide.read_region((224, 0), 0, (224, 224))
    np.testing.assert_array_equal(first, _openslide(pyramid, 0, 0, 0, 224, 224))
    np.testing.assert_array_equal(second, _openslide(pyramid, 0, 224, 0, 224, 224))


def test_positions_between_level_pixels_are_read_by_openslide(pyramid, monkeypatch):
    calls = []
    real = Slide._read_openslide
    monkeypatch.setattr(Slide, "_read_openslide",
                        lambda self, *a: calls.append(a) or real(self, *a))
    with open_slide(pyramid) as slide:
        region = slide.read_region((3, 5), 1, (224, 224))  # level 1 is x2: (1.5, 2.5)
        assert calls == [((3, 5), 1, (224, 224))] and slide._tiles[1]
    handle = openslide.OpenSlide(str(pyramid))
    expected = np.asarray(handle.read_region((3, 5), 1, (224, 224)).convert("RGB"))
    handle.close()
    np.testing.assert_array_equal(region, expected)


def test_formats_not_handled(pyramid, tmp_path, tcga_slide_or_none, monkeypatch):
    size = (1300, 1100)
    assert open_jpeg_level(pyramid, "ventana", size) is None  # overlapping tiles
    assert open_jpeg_level(pyramid, "generic-tiff", (1299, 1100)) is None  # no such level
    assert open_jpeg_level(tmp_path / "missing.tif", "generic-tiff", size) is None
    import tifffile

    with monkeypatch.context() as patch:  # tiles larger than the cap (256 px > 128)
        patch.setattr(jpeg_tiles, "MAX_TILE_SIDE", 128)
        assert open_jpeg_level(pyramid, "generic-tiff", size) is None
    deflate = tmp_path / "deflate.tif"
    tifffile.imwrite(deflate, np.zeros((512, 512, 3), np.uint8), tile=(256, 256),
                     compression="zlib")
    assert open_jpeg_level(deflate, "generic-tiff", (512, 512)) is None
    if tcga_slide_or_none is not None:  # Aperio JPEG 2000 tiles
        with open_slide(tcga_slide_or_none) as slide:
            assert open_jpeg_level(tcga_slide_or_none, "aperio", slide.dimensions) is None
    monkeypatch.setenv("HISTOHUB_JPEG_TILES", "0")
    assert open_jpeg_level(pyramid, "generic-tiff", size) is None
    monkeypatch.delenv("HISTOHUB_JPEG_TILES")
    monkeypatch.delattr(jpeg_tiles.os, "pread")  # Windows
    assert open_jpeg_level(pyramid, "generic-tiff", size) is None


@pytest.fixture
def tcga_slide_or_none(request):
    try:
        return request.getfixturevalue("tcga_slide")
    except pytest.skip.Exception:
        return None


def test_without_imagecodecs_openslide_reads_and_says_so_once(pyramid, monkeypatch, caplog):
    monkeypatch.setattr(jpeg_tiles, "imagecodecs", None)
    jpeg_tiles._say_no_decoder.cache_clear()
    for _ in range(2):
        with open_slide(pyramid) as slide:
            assert open_jpeg_level(pyramid, slide.properties.get("openslide.vendor"),
                                   slide.level_dimensions[0]) is None
            assert slide.read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)  # by OpenSlide
    assert caplog.text.count("pip install tifffile imagecodecs") == 1
    jpeg_tiles._say_no_decoder.cache_clear()

def test_regions_the_tiles_do_not_cover_are_unsupported(pyramid):
    tiles = _level(pyramid)
    for region in [(-1, 0, 10, 10), (1200, 0, 101, 10), (0, 1000, 10, 101), (0, 0, 0, 5)]:
        with pytest.raises(Unsupported):
            tiles.read(*region)
    tiles._counts = tiles._counts.copy()
    tiles._counts[0] = 0  # a tile the scanner did not write (OpenSlide: transparent)
    with pytest.raises(Unsupported, match="not in the file"):
        tiles.read(0, 0, 10, 10)
    tiles._offsets = tiles._offsets.copy()
    tiles._offsets[1] = pyramid.stat().st_size - 10  # a file cut off inside the tile
    with pytest.raises(Unsupported, match="past the end"):
        tiles.read(256, 0, 10, 10)
    tiles._counts[2] = 1 << 40  # a byte count no JPEG tile has: nothing that size is read
    with pytest.raises(Unsupported, match="claims"):
        tiles.read(512, 0, 10, 10)
    tiles.close()
    with pytest.raises(ValueError, match="closed"):
        tiles.read(300, 300, 10, 10)


def _damaged(source, tmp_path, name, edit) -> tuple:
    path = tmp_path / name
    path.write_bytes(source.read_bytes())
    offset, length = tile_byte_range(path, level=0, x=300, y=300)
    with open(path, "r+b") as handle:
        edit(handle, offset, length)
    return path


def _bogus_huffman_table(handle, offset: int, length: int) -> None:
    """Well-formed segments (``check_scan`` passes them), but a Huffman table whose code
    counts add up to more codes than there are: libjpeg's decoder raises."""
    handle.seek(offset)
    table = offset + handle.read(length).index(b"\xff\xc4")
    handle.seek(table + 5)  # marker, length, class and id, then 16 code counts
    handle.write(b"\xff" * 16)


@pytest.mark.parametrize("edit", [
    pytest.param(lambda f, o, n: (f.seek(o + n // 2), f.write(b"\xff\xd9" + b"\0" * 40)),
                 id="cut-short-by-a-marker"),
    pytest.param(lambda f, o, n: (f.seek(o + 2), f.write(b"\0" * 64)), id="headers-overwritten"),
    pytest.param(lambda f, o, n: _bogus_huffman_table(f, o, n), id="libjpeg-refuses-it"),
])
def test_damaged_tiles_are_left_to_openslide(pyramid, tmp_path, edit):
    """What OpenSlide reports as an error is not decoded here: the patch fails as before."""
    path = _damaged(pyramid, tmp_path, "damaged.tif", edit)
    tiles = _level(path)
    with pytest.raises(Unsupported):
        tiles.read(256, 256, 10, 10)
    np.testing.assert_array_equal(tiles.read(0, 0, 256, 256), _openslide(path, 0, 0, 0, 256, 256))
    tiles.close()
    with open_slide(path) as slide:
        grid = tile_grid(slide, target_mpp=0.5, min_foreground=0)
    reader = PatchReader(grid)
    index = grid.coords.tolist().index([224, 224])
    with pytest.raises(TileReadError, match="could not be read"):
        reader.read(index)
    assert reader.read(0).shape == (224, 224, 3)
    reader.close()


def test_check_scan():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    assert check_scan(data) == (64, 64, 3)
    for options in ({"mode": "L"}, {"progressive": True}):
        other = io.BytesIO()
        image = Image.new("RGB", (48, 32), (200, 100, 50))
        image = image.convert(options.pop("mode")) if "mode" in options else image
        image.save(other, format="JPEG", **options)
        if options:  # progressive: not baseline
            with pytest.raises(Unsupported, match="baseline"):
                check_scan(other.getvalue())
        else:  # grey: one component, which _decode refuses
            assert check_scan(other.getvalue()) == (32, 48, 1)
    for bad in [data[:-2], b"\0" + data[1:], data[:-20] + b"\xff\xc4" + data[-18:],
                data[:30]]:
        with pytest.raises(Unsupported):
            check_scan(bad)
    restart = data[:-20] + b"\xff\xd3" + data[-18:]  # restart markers belong in a scan
    check_scan(restart)


def test_tile_cache_is_bounded(pyramid, monkeypatch):
    monkeypatch.setattr(jpeg_tiles, "CACHE_BYTES", 3 * 256 * 256 * 3)
    tiles = _level(pyramid)
    whole = tiles.read(0, 0, 1300, 1100)
    cache = jpeg_tiles.TILE_CACHE
    assert len(cache) == 3 and cache.nbytes == 3 * 256 * 256 * 3
    np.testing.assert_array_equal(whole, _openslide(pyramid, 0, 0, 0, 1300, 1100))
    tiles.close()


def test_a_files_tiles_leave_the_cache_with_its_last_reader(pyramid, tmp_path):
    other = write_slide(tmp_path / "other.tif", tissue_image(512, 512, [(0, 0, 512, 512)]),
                        levels=1)
    cache = jpeg_tiles.TILE_CACHE
    first, second, third = _level(pyramid), _level(pyramid), _level(other)
    first.read(0, 0, 300, 300)
    third.read(0, 0, 300, 300)
    assert len(cache) == 8
    first.close()  # another reader still has the file open: its tiles stay
    second.read(0, 0, 300, 300)
    assert len(cache) == 8
    second.close()
    assert len(cache) == 4 and cache.nbytes == 4 * 256 * 256 * 3  # the other file's
    third.close()
    assert len(cache) == 0 and cache.nbytes == 0


def test_threads_decode_each_tile_once(pyramid, monkeypatch):
    """Reader threads share the process's tiles: one decodes, the others wait for it."""
    import threading

    decoded = []
    real = jpeg_tiles.JpegTileLevel._decode

    def slow_decode(self, index):
        decoded.append(index)
        threading.Event().wait(0.05)  # long enough for every thread to ask for it
        return real(self, index)

    monkeypatch.setattr(jpeg_tiles.JpegTileLevel, "_decode", slow_decode)
    levels = [_level(pyramid) for _ in range(4)]
    out: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda t=t: out.append(t.read(200, 200, 100, 100)))
               for t in levels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(decoded) == [0, 1, 6, 7]  # the four tiles under (200-299, 200-299)
    for region in out:
        np.testing.assert_array_equal(region, out[0])
    for level in levels:
        level.close()


def test_a_failing_disk_is_left_to_openslide(pyramid, monkeypatch):
    tiles = _level(pyramid)

    def failing_pread(fd, n, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(jpeg_tiles.os, "pread", failing_pread)
    with pytest.raises(Unsupported, match="Input/output error"):
        tiles.read(0, 0, 10, 10)
    tiles.close()


def test_a_tile_that_failed_is_tried_again(pyramid, monkeypatch):
    tiles = _level(pyramid)
    real = jpeg_tiles.JpegTileLevel._decode
    monkeypatch.setattr(jpeg_tiles.JpegTileLevel, "_decode",
                        lambda self, index: (_ for _ in ()).throw(Unsupported("busy disk")))
    with pytest.raises(Unsupported, match="busy disk"):
        tiles.read(0, 0, 10, 10)
    monkeypatch.setattr(jpeg_tiles.JpegTileLevel, "_decode", real)
    np.testing.assert_array_equal(tiles.read(0, 0, 10, 10), _openslide(pyramid, 0, 0, 0, 10, 10))
    tiles.close()


def test_a_rewritten_file_is_not_served_from_the_cache(tmp_path):
    """The cache knows a file by its identity and times: new contents are decoded anew."""
    path = tmp_path / "slide.tif"
    for seed in (5, 6):
        write_slide(path, tissue_image(512, 512, [(0, 0, 512, 512)], seed=seed), levels=1)
        tiles = _level(path)
        np.testing.assert_array_equal(tiles.read(0, 0, 512, 512),
                                      _openslide(path, 0, 0, 0, 512, 512))
        tiles.close()


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="no fork here")
def test_a_forked_reader_does_not_wait_for_the_parents_threads(pyramid):
    """DataLoader workers fork while the thread preparing the next slide may hold the cache's
    lock: the child reads anyway."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    jpeg_tiles.TILE_CACHE._lock.acquire()  # as a parent's thread in the middle of a read
    try:
        child = context.Process(target=_read_one_region, args=(str(pyramid),))
        child.start()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    finally:
        jpeg_tiles.TILE_CACHE._lock.release()
    assert child.exitcode == 0


def _read_one_region(path: str) -> None:
    tiles = _level(path)
    assert tiles.read(0, 0, 300, 300).shape == (300, 300, 3)
    tiles.close()
