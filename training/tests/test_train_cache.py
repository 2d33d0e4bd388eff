"""The pool decoded once (simclr.cache): same pixels as reading file by file, reused while it
matches its pool, rebuilt when it does not, never left half-written; dataset patterns."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from histohub_training.simclr.cache import CACHE_NAME, CachedPool, load_or_build_cache
from histohub_training.simclr.data import Pool, PoolDataset, build_pool, list_images, parse_datasets


@pytest.fixture
def saved_pool(tmp_path, write_images) -> tuple[Pool, Path]:
    """Six images, the third unreadable, as a pool saved in ``run/pool.json``."""
    images = tmp_path / "images"
    write_images(images, 6)
    (images / "img002.png").write_bytes(b"\x89PNG truncated")  # unreadable: replaced
    pool = build_pool(parse_datasets([str(images)]), patch_size=16)
    run = tmp_path / "run"
    run.mkdir()
    pool.save(run / "pool.json")
    return pool, run / "pool.json"


def test_cache_holds_what_the_file_reader_reads_and_reports_replacements(saved_pool):
    pool, pool_path = saved_pool
    images, skipped = load_or_build_cache(pool, pool_path, 16, progress=False)
    reader = PoolDataset(pool.items, 16)
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    for i in range(6):
        torch.testing.assert_close(images[i], reader[i][0])
    assert list(skipped) == [pool.items[2]]
    image, seed, failures = CachedPool(images)[(3, 9)]
    torch.testing.assert_close(image, images[3])
    assert seed == 9 and failures == []


def test_cache_is_reused_while_it_matches_and_rebuilt_when_not(saved_pool):
    pool, pool_path = saved_pool
    load_or_build_cache(pool, pool_path, 16, progress=False)
    cache = pool_path.parent / CACHE_NAME
    os.utime(cache, ns=(1, 1))
    _, skipped = load_or_build_cache(pool, pool_path, 16, progress=False)
    assert cache.stat().st_mtime_ns == 1 and skipped == {}  # reused, not decoded again
    bigger, _ = load_or_build_cache(pool, pool_path, 20, progress=False)  # another side
    assert bigger.shape == (6, 3, 20, 20) and cache.stat().st_mtime_ns != 1
    smaller = Pool(pool.items[:4], pool.sources[:4])   # another pool in the same folder
    smaller.save(pool_path)
    assert load_or_build_cache(smaller, pool_path, 20, progress=False)[0].shape[0] == 4
    meta = json.loads((pool_path.parent / "pool_cache.json").read_text())
    assert meta["count"] == 4 and meta["size"] == 20


def test_an_interrupted_build_leaves_no_cache_behind(saved_pool, monkeypatch):
    pool, pool_path = saved_pool

    def fail(self, index):
        raise KeyboardInterrupt
    monkeypatch.setattr(PoolDataset, "__getitem__", fail)
    with pytest.raises(KeyboardInterrupt):
        load_or_build_cache(pool, pool_path, 16, progress=False)
    assert sorted(p.name for p in pool_path.parent.iterdir()) == ["pool.json"]


def test_pattern_keeps_images_and_leaves_out_masks(tmp_path):
    for kind in ("image", "label"):
        folder = tmp_path / "Polyp" / kind
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "a.png")
    assert len(list_images(tmp_path)) == 2
    kept = list_images(tmp_path, "*/image/*")
    assert [Path(p).parent.name for p in kept] == ["image"]
    spec, = parse_datasets([{"path": str(tmp_path), "pattern": "*/image/*"}])
    assert build_pool([spec], patch_size=8).items == kept
