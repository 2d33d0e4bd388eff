"""Dataset pool: per-dataset caps (section 5.4), any folder nesting, slide patches through
histohub.slides._reader, unreadable images skipped and reported, rank slices of global batches."""

from pathlib import Path

import pytest
import torch

from histohub_training.simclr.data import (Collate, EpochBatchSampler, PoolDataset, build_pool,
                         capped_count, list_images, parse_datasets, sample_slide_patches)


def test_capped_count_follows_the_paper():
    assert capped_count(4_000_000, percent=10) == 2000  # max 2000 per dataset
    assert capped_count(50_000, percent=1) == 500
    assert capped_count(50_000, percent=0.01) == 10  # at least 10
    assert capped_count(6, percent=10) == 6  # never more than there is
    assert capped_count(1000, percent=100, max_count=None) == 1000


def test_pool_caps_each_dataset_and_finds_nested_images(tmp_path, write_images):
    sizes = {"small": 4, "mid": 30, "large": 120}
    for name, count in sizes.items():
        write_images(tmp_path / name, count, nested=name == "large")
    (tmp_path / "mid" / "notes.txt").write_text("not an image")
    specs = parse_datasets([str(tmp_path / n) for n in sizes])
    pool = build_pool(specs, patch_size=16, percent=10, min_per_dataset=10, max_per_dataset=11)
    assert [s["selected"] for s in pool.summary] == [4, 10, 11]
    assert [s["available"] for s in pool.summary] == [4, 30, 120]
    assert len(pool) == 25 and pool.sources.count(2) == 11
    assert all(Path(p).suffix == ".png" for p in pool.items)
    assert len(set(pool.items)) == 25
    again = build_pool(specs, patch_size=16, percent=10, min_per_dataset=10, max_per_dataset=11)
    assert again.items == pool.items  # seeded
    pool.save(tmp_path / "pool.json")
    assert type(pool).load(tmp_path / "pool.json").items == pool.items
    assert "large (images): 11 of 120" in pool.describe()
    own_cap = parse_datasets([str(tmp_path / "small"),
                              {"path": str(tmp_path / "large"), "max_images": 3}])
    capped = build_pool(own_cap, patch_size=16, percent=100, min_per_dataset=10,
                        max_per_dataset=11)
    assert [s["selected"] for s in capped.summary] == [4, 3]


def test_dataset_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="data.datasets"):
        parse_datasets([])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_datasets([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable images"):
        build_pool(parse_datasets([str(tmp_path / "empty")]), patch_size=16)
    spec, = parse_datasets([f"slides:{tmp_path / 'empty'}"])
    assert spec.kind == "slides" and spec.patches_per_slide == 100


def test_unreadable_images_are_replaced_counted_and_reported(tmp_path, write_images):
    write_images(tmp_path, 4, size=16)
    (tmp_path / "img001.png").write_bytes(b"\x89PNG truncated")
    items = list_images(tmp_path)
    dataset = PoolDataset(items, 12)
    image, seed, failures = dataset[(1, 42)]
    assert image.shape == (3, 12, 12) and image.dtype == torch.uint8 and seed == 42
    assert len(failures) == 1 and failures[0][0].endswith("img001.png")
    torch.testing.assert_close(image, dataset[2][0])  # replaced by the next readable image
    images, _, collected = Collate()([dataset[(i, 7)] for i in range(4)])
    assert images.shape == (4, 3, 12, 12) and len(collected) == 1


def test_ranks_take_slices_of_the_same_global_batches():
    single = list(EpochBatchSampler(50, 8, seed=3))
    ranks = [list(EpochBatchSampler(50, 4, world_size=2, rank=r, seed=3)) for r in range(2)]
    assert len(single) == len(ranks[0]) == 6  # the incomplete last batch is dropped
    for step, batch in enumerate(single):
        merged = [i for i, _ in ranks[0][step]] + [i for i, _ in ranks[1][step]]
        assert merged == [i for i, _ in batch]
    sampler = EpochBatchSampler(50, 8, seed=3)
    sampler.set_epoch(1)
    assert [i for i, _ in next(iter(sampler))] != [i for i, _ in single[0]]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(7, 4, world_size=2)


def test_collate_can_augment_in_the_loader(tmp_path, write_images):
    from histohub_training.simclr.augment import BatchAugment

    write_images(tmp_path, 4, size=16)
    dataset = PoolDataset(list_images(tmp_path), 16)
    (view1, view2), _, _ = Collate(BatchAugment(12))([dataset[(i, 5)] for i in range(4)])
    assert view1.shape == view2.shape == (4, 3, 12, 12) and not torch.equal(view1, view2)


def test_slide_patches_at_most_n_per_slide(cmu_slide, tmp_path):
    not_a_slide = tmp_path / "broken.svs"
    not_a_slide.write_bytes(b"nope")
    patches, skipped = sample_slide_patches([str(cmu_slide), str(not_a_slide)],
                                            patch_size=224, mpp=0.5, max_patches=5)
    assert len(patches) == 5 and {p["slide"] for p in patches} == {str(cmu_slide)}
    assert len(skipped) == 1 and skipped[0][0] == str(not_a_slide)
    image, _, failures = PoolDataset(patches, 64)[(0, 0)]
    assert image.shape == (3, 64, 64) and not failures
    assert image.float().std() > 5  # tissue, not blank
