"""Seeded 50/25/25 splits (stratified, grouped where groups are given) and label fractions.

Paper, section 4.2: "We use 50% of the original dataset as the training, 25% as
validation, and 25% as the test set"; section 5.2: {5, 10, 20, 50, 100}% of each training
set, each setting repeated five times with different samples.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .datasets import DatasetError

PAPER_FRACTIONS = (0.05, 0.10, 0.20, 0.50, 1.00)
PAPER_REPEATS = 5
CV_FOLDS = 5             # grouped cross-validation: folds per repeat ...
CV_REPEATS = 3           # ... and reshuffles of the folds (n = CV_FOLDS x CV_REPEATS)
MIN_PER_CLASS = 4        # 2 train + 1 validation + 1 test
_GROUPED_ATTEMPTS = 256
SPLIT_SHARES = (0.5, 0.25, 0.25)


@dataclass(frozen=True)
class Split:
    """Indices into the dataset, disjoint; ``missing`` lists classes absent from a part."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    missing: dict[str, list[int]]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def score_strata(scores: np.ndarray, *, bins: int = 4) -> np.ndarray:
    """``(N,)`` int quantile bins of continuous scores, to stratify a regression split."""
    edges = np.unique(np.quantile(scores, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, scores, side="right").astype(np.int64)


def split_dataset(strata: np.ndarray, groups: np.ndarray | None = None, *, seed: int,
                  class_names: Sequence[str] | None = None) -> Split:
    """A 50/25/25 split of ``(N,)`` ``strata`` (class ids, or score bins), seeded.

    Without groups: stratified (sklearn ``train_test_split``; every class at least
    2 / 1 / 1). With groups: no group straddles two parts; every class reaches train and
    test, and validation where the groups allow it (else it is listed in ``missing``).
    """
    strata = np.asarray(strata)
    names = list(class_names) if class_names else None
    counts = Counter(strata.tolist())
    if len(counts) < 2 and names is not None:
        raise DatasetError(f"A single class ({_name(next(iter(counts)), names)!r}): "
                           "classification needs at least two")
    if groups is None:
        return _stratified(strata, seed=seed, counts=counts, names=names)
    return _grouped(strata, np.asarray(groups), seed=seed, names=names)


def _name(label: int, names: list[str] | None) -> str:
    return names[label] if names and 0 <= label < len(names) else str(label)


def _stratified(strata: np.ndarray, *, seed: int, counts: Counter,
                names: list[str] | None) -> Split:
    from sklearn.model_selection import train_test_split

    small = {_name(c, names): n for c, n in counts.items() if n < MIN_PER_CLASS}
    if small:
        raise DatasetError(f"Class(es) too small for a 50/25/25 split: {small} (each needs "
                           f">= {MIN_PER_CLASS} images: 2 train, 1 validation, 1 test); add "
                           "images, merge or drop those classes")
    index = np.arange(len(strata))
    train, rest = train_test_split(index, test_size=0.5, stratify=strata, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=strata[rest],
                                 random_state=seed)
    return Split(np.sort(train), np.sort(val), np.sort(test), {"train": [], "val": [], "test": []})


def _grouped(strata: np.ndarray, groups: np.ndarray, *, seed: int,
             names: list[str] | None) -> Split:
    """A seeded search over random partitions of the groups (GroupShuffleSplit's move),
    keeping the one closest to 50/25/25 within every class.

    sklearn's StratifiedGroupKFold is greedy and its ``shuffle`` only breaks ties: on the
    Kather tiles (10 uneven source images) all 64 seeds tried gave the same test fold,
    and it left the 'empty' class (2 source images) out of train or test. Searching
    partitions keeps the seed meaningful and the classes covered.
    """
    unique, inverse = np.unique(groups.astype(str), return_inverse=True)
    if len(unique) < 3:
        raise DatasetError(f"Only {len(unique)} group(s): a grouped 50/25/25 split needs at "
                           "least 3; drop the grouping or use a finer group pattern")
    classes = np.unique(strata)
    per_class = {c: len(np.unique(inverse[strata == c])) for c in classes}
    small = {_name(c, names): n for c, n in per_class.items() if n < 2}
    if small:
        raise DatasetError(f"Class(es) too small for a grouped split: {small} group(s) "
                           "each; a class needs images from >= 2 groups to be in both train "
                           "and test; add images from other groups or drop those classes")
    counts = np.zeros((len(unique), len(classes)), dtype=np.float64)   # (G, K)
    np.add.at(counts, (inverse, np.searchsorted(classes, strata)), 1)
    target = np.array(SPLIT_SHARES)
    rng = np.random.default_rng([seed, len(unique)])
    best: tuple[tuple, np.ndarray] | None = None
    for _ in range(_GROUPED_ATTEMPTS):
        part = _partition(counts.sum(axis=1), rng.permutation(len(unique)))
        per_part = np.stack([counts[part == p].sum(axis=0) for p in range(3)])   # (3, K)
        if (per_part[0] == 0).any() or (per_part[2] == 0).any():
            continue
        shares = per_part / per_part.sum(axis=0, keepdims=True)
        sizes = per_part.sum(axis=1) / per_part.sum()
        score = (int((per_part[1] == 0).sum()),
                 float(np.abs(shares - target[:, None]).mean() + np.abs(sizes - target).sum()))
        if best is None or score < best[0]:
            best = (score, part)
    if best is None:
        raise DatasetError(f"No grouped split in {_GROUPED_ATTEMPTS} tries puts every class "
                           "in both train and test; the groups are too few or too uneven "
                           "(drop the grouping, or add data)")
    part = best[1][inverse]
    parts = [np.flatnonzero(part == p) for p in range(3)]
    missing = {k: sorted(set(classes.tolist()) - set(strata[v].tolist()))
               for k, v in zip(("train", "val", "test"), parts)}
    if missing["val"]:
        warnings.warn(f"Class(es) {[_name(c, names) for c in missing['val']]} have too few "
                      "groups to reach the validation set as well; model selection uses the "
                      "other classes", stacklevel=3)
    return Split(*parts, missing)


def _partition(sizes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``(G,)`` part (0 train, 1 val, 2 test) of each group: groups in ``order`` fill the
    parts by cumulative image count, each group going where its midpoint falls."""
    shares = np.cumsum(sizes[order]) - sizes[order] / 2
    bounds = np.cumsum(SPLIT_SHARES)[:-1] * sizes.sum()
    part = np.empty(len(sizes), dtype=np.int64)
    part[order] = np.searchsorted(bounds, shares, side="right")
    for p in (1, 2):    # never an empty part: steal the last group of the part before
        if not (part == p).any():
            candidates = order[part[order] == p - 1]
            part[candidates[-1]] = p
    return part


def label_fractions(strata: np.ndarray, *, fractions: Sequence[float] = PAPER_FRACTIONS,
                    repeats: int = PAPER_REPEATS, seed: int = 0
                    ) -> dict[tuple[float, int], np.ndarray]:
    """``{(fraction, repeat): positions into strata}``: stratified subsets of a training set.

    Each class keeps ``round(fraction * count)`` images (at least one). Repeats of one
    fraction are distinct subsets whenever the class sizes allow it; a fraction of 1.0
    keeps everything (its repeats then differ only in the training seed).
    """
    strata = np.asarray(strata)
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"Label fractions are in (0, 1] (e.g. 0.05 for 5%), got {fraction}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    by_class = {c: np.flatnonzero(strata == c) for c in np.unique(strata)}
    subsets: dict[tuple[float, int], np.ndarray] = {}
    for f_index, fraction in enumerate(fractions):
        rng = np.random.default_rng([seed, f_index, int(round(fraction * 1e6))])
        seen: set[bytes] = set()
        for repeat in range(repeats):
            for _ in range(100):           # re-draw until distinct, where possible
                chosen = np.sort(np.concatenate([
                    rng.choice(members, size=_take(len(members), fraction), replace=False)
                    for members in by_class.values()]))
                if chosen.tobytes() not in seen or fraction >= 1:
                    break
            seen.add(chosen.tobytes())
            subsets[(float(fraction), repeat)] = chosen
    return subsets


def _take(count: int, fraction: float) -> int:
    return min(count, max(1, int(round(fraction * count))))


def cross_validation_splits(strata: np.ndarray, groups: np.ndarray | None = None, *,
                            folds: int = 5, repeats: int = 3, seed: int,
                            class_names: Sequence[str] | None = None) -> list[Split]:
    """``folds x repeats`` seeded splits of ``(N,)`` ``strata``, so that no number rests on
    one split.

    ``folds >= 3``: (grouped where groups are given) stratified ``folds``-fold
    cross-validation, reshuffled for each repeat: fold k is the test part, another fold the
    validation part (the next one that leaves every class in training, where one does) and
    the rest the training part; every image is tested once per repeat. ``folds == 1``: a
    50/25/25 split (:func:`split_dataset`) per repeat, with seeds ``seed + repeat``. A
    group never straddles two parts. Returned in the order (repeat 0: fold 0, 1, ...), ...
    """
    if folds == 1:
        return [split_dataset(strata, groups, seed=seed + r, class_names=class_names)
                for r in range(repeats)]
    if folds < 3 or repeats < 1:
        raise ValueError(f"folds is 1 (repeated 50/25/25 splits) or >= 3 (test, validation "
                         f"and training folds), repeats >= 1; got folds={folds}, "
                         f"repeats={repeats}")
    strata = np.asarray(strata)
    names = list(class_names) if class_names else None
    if len(np.unique(strata)) < 2 and names is not None:
        raise DatasetError(f"A single class ({_name(int(strata[0]), names)!r}): "
                           "classification needs at least two")
    keys = (np.arange(len(strata)).astype(str) if groups is None
            else np.asarray(groups).astype(str))
    unique, inverse = np.unique(keys, return_inverse=True)
    if len(unique) < folds:
        what = "group(s)" if groups is not None else "image(s)"
        raise DatasetError(f"Only {len(unique)} {what} for {folds}-fold cross-validation: "
                           "choose fewer --folds (at least 3), or --folds 1 for repeated "
                           "50/25/25 splits")
    classes = np.unique(strata)
    counts = np.zeros((len(unique), len(classes)), dtype=np.float64)   # (G, K)
    np.add.at(counts, (inverse, np.searchsorted(classes, strata)), 1)
    splits = []
    for repeat in range(repeats):
        rng = np.random.default_rng([seed, repeat, len(unique), folds])
        fold_of = _assign_folds(counts, folds, rng)[inverse]        # (N,)
        for k in range(folds):
            splits.append(_fold_split(strata, fold_of, k, folds, classes))
    return splits


def _assign_folds(counts: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """``(G,)`` fold of each group: groups in a random order, each into the fold holding the
    smallest share of the group's classes so far (ties: the fold with the fewest images),
    which spreads every class over the folds (StratifiedGroupKFold's aim, with the seed
    deciding the order rather than only breaking ties)."""
    totals = counts.sum(axis=0)                                       # (K,)
    per_fold = np.zeros((folds, counts.shape[1]))
    assigned = np.empty(len(counts), dtype=np.int64)
    for g in rng.permutation(len(counts)):
        share = ((per_fold + counts[g]) / totals * (counts[g] > 0)).sum(axis=1)
        empty = per_fold.sum(axis=1) == 0
        cost = np.where(empty, -1.0, share)      # fill every fold before doubling up
        best = np.flatnonzero(np.isclose(cost, cost.min()))
        choice = best[np.argmin(per_fold[best].sum(axis=1))]
        per_fold[choice] += counts[g]
        assigned[g] = choice
    return assigned


def _fold_split(strata: np.ndarray, fold_of: np.ndarray, k: int, folds: int,
                classes: np.ndarray) -> Split:
    test = np.flatnonzero(fold_of == k)
    candidates = [(k + step) % folds for step in range(1, folds)]
    val_fold = candidates[0]
    for candidate in candidates:    # the first validation fold that leaves every class in train
        rest = (fold_of != k) & (fold_of != candidate)
        if set(classes.tolist()) <= set(strata[rest].tolist()):
            val_fold = candidate
            break
    val = np.flatnonzero(fold_of == val_fold)
    train = np.flatnonzero((fold_of != k) & (fold_of != val_fold))
    missing = {name: sorted(set(classes.tolist()) - set(strata[part].tolist()))
               for name, part in (("train", train), ("val", val), ("test", test))}
    return Split(train, val, test, missing)
