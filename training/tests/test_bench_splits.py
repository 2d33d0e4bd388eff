"""50/25/25 splits (stratified, grouped) and label fractions x repeats."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest

from histohub_training.downstream.datasets import DatasetError
from histohub_training.downstream.splits import label_fractions, score_strata, split_dataset

pytest.importorskip("sklearn")


def _parts(split):
    return split.train, split.val, split.test


def test_stratified_split_is_50_25_25_disjoint_complete_and_seeded():
    labels = np.repeat(np.arange(4), [40, 40, 20, 100])
    split = split_dataset(labels, seed=0, class_names=list("abcd"))
    train, val, test = _parts(split)
    assert len(train) == 100 and len(val) == 50 and len(test) == 50
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(200))
    for part, share in ((train, 0.5), (val, 0.25), (test, 0.25)):
        counts = np.bincount(labels[part], minlength=4)
        assert np.allclose(counts, np.bincount(labels) * share, atol=1)
    again = split_dataset(labels, seed=0, class_names=list("abcd"))
    assert np.array_equal(again.test, split.test)
    assert not np.array_equal(split_dataset(labels, seed=1, class_names=list("abcd")).test,
                              split.test)


def test_grouped_split_never_straddles_groups_and_covers_every_class():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 10).astype(str)
    labels = np.concatenate([rng.choice(3, 10, p=[0.6, 0.3, 0.1]) for _ in range(40)])
    tests = set()
    for seed in range(4):
        split = split_dataset(labels, groups, seed=seed, class_names=["a", "b", "c"])
        sets = [set(groups[p]) for p in _parts(split)]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert sum(len(p) for p in _parts(split)) == len(labels)
        for part in _parts(split):
            assert set(labels[part]) == {0, 1, 2}
        assert 0.4 < len(split.train) / len(labels) < 0.6
        tests.add(tuple(split.test))
    assert len(tests) == 4      # the seed changes the split


def test_grouped_split_with_a_class_in_two_groups_reaches_train_and_test():
    # Like the Kather tiles' 'empty' class: only two source images hold it.
    groups = np.repeat(np.arange(8), 10).astype(str)
    labels = np.tile(np.arange(2), 40)
    labels[(groups == "0") | (groups == "5")] = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = split_dataset(labels, groups, seed=0, class_names=["a", "b", "c"])
    assert 2 in labels[split.train] and 2 in labels[split.test]
    assert split.missing["train"] == [] and split.missing["test"] == []


def test_single_class_and_too_small_classes_are_clear_errors():
    with pytest.raises(DatasetError, match="single class"):
        split_dataset(np.zeros(20, dtype=int), seed=0, class_names=["tumor"])
    labels = np.array([0] * 20 + [1] * 3)
    with pytest.raises(DatasetError, match=r"too small.*'rare': 3"):
        split_dataset(labels, seed=0, class_names=["common", "rare"])
    groups = np.array([str(i % 5) for i in range(20)] + ["x"] * 3)
    with pytest.raises(DatasetError, match=r"grouped split.*'rare': 1"):
        split_dataset(labels, groups, seed=0, class_names=["common", "rare"])
    with pytest.raises(DatasetError, match="Only 2 group"):
        split_dataset(np.tile([0, 1], 10), np.repeat(["a", "b"], 10), seed=0,
                      class_names=["x", "y"])


def test_label_fractions_are_stratified_and_distinct_across_repeats():
    strata = np.repeat(np.arange(3), [100, 60, 40])
    subsets = label_fractions(strata, fractions=(0.05, 0.1, 0.2, 0.5, 1.0), repeats=5, seed=0)
    assert len(subsets) == 25
    for fraction in (0.05, 0.1, 0.2, 0.5):
        drawn = [subsets[(fraction, r)] for r in range(5)]
        assert len({d.tobytes() for d in drawn}) == 5
        for subset in drawn:
            assert len(set(subset)) == len(subset)
            counts = Counter(strata[subset].tolist())
            for c, total in enumerate((100, 60, 40)):
                assert counts[c] == max(1, round(fraction * total))
    assert all(len(subsets[(1.0, r)]) == 200 for r in range(5))
    assert np.array_equal(subsets[(0.05, 0)],
                          label_fractions(strata, fractions=(0.05, 0.1, 0.2, 0.5, 1.0),
                                          repeats=5, seed=0)[(0.05, 0)])
    small = label_fractions(np.array([0] * 10 + [1] * 3), fractions=(0.05,), repeats=2)
    assert Counter(np.array([0] * 10 + [1] * 3)[small[(0.05, 0)]].tolist()) == {0: 1, 1: 1}


def test_label_fractions_reject_bad_fractions():
    with pytest.raises(ValueError, match="0.05 for 5%"):
        label_fractions(np.zeros(10), fractions=(5,))


def test_score_strata_bins_scores_into_quartiles():
    strata = score_strata(np.linspace(0, 100, 40, dtype=np.float32))
    assert np.bincount(strata).tolist() == [10, 10, 10, 10]
