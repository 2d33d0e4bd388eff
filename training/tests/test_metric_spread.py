"""Every recorded metric carries its spread: grouped cross-validation folds x repeats, the
mean ± sd (n) a manifest records, ``compare_metrics.py`` judging a difference against it,
and the quick probe grouping a dataset as the benchmark does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import compare_metrics
import histohub
from histohub_training.downstream.datasets import DatasetError
from histohub_training.downstream.report import manifest_metrics
from histohub_training.downstream.splits import cross_validation_splits


def _grouped_classes() -> tuple[np.ndarray, np.ndarray]:
    """60 images of 3 classes from 12 uneven groups (a group holds one or two classes)."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 5, 5]).astype(str)
    strata = np.array([int(g) % 3 if rng.random() < 0.8 else (int(g) + 1) % 3
                       for g in groups])
    return strata, groups


def test_cross_validation_splits_are_grouped_complete_and_seeded():
    strata, groups = _grouped_classes()
    splits = cross_validation_splits(strata, groups, folds=5, repeats=3, seed=0)
    assert len(splits) == 15
    for repeat in range(3):
        tested = np.concatenate([s.test for s in splits[repeat * 5:(repeat + 1) * 5]])
        assert sorted(tested.tolist()) == list(range(len(strata)))   # each image once
    for s in splits:
        sides = [set(groups[p].tolist()) for p in (s.train, s.val, s.test)]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
        assert len(s.train) + len(s.val) + len(s.test) == len(strata)
        assert s.missing["train"] == []
    again = cross_validation_splits(strata, groups, folds=5, repeats=3, seed=0)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(splits, again))
    # repeats reshuffle the folds, and another seed gives other folds
    assert not all(np.array_equal(a.test, b.test) for a, b in zip(splits[:5], splits[5:10]))
    other = cross_validation_splits(strata, groups, folds=5, repeats=1, seed=1)
    assert not all(np.array_equal(a.test, b.test) for a, b in zip(splits[:5], other))
    # folds=1: a 50/25/25 split per repeat, each with its own seed
    holdout = cross_validation_splits(strata, groups, folds=1, repeats=2, seed=0)
    assert len(holdout) == 2 and not np.array_equal(holdout[0].test, holdout[1].test)


def test_too_few_groups_or_folds_are_clear_errors():
    strata, groups = _grouped_classes()
    with pytest.raises(DatasetError, match="Only 12 group"):
        cross_validation_splits(strata, groups, folds=13, repeats=1, seed=0)
    with pytest.raises(ValueError, match="folds is 1"):
        cross_validation_splits(strata, groups, folds=2, repeats=1, seed=0)


def _run(values: dict[str, list[float]], *, folds: int = 5, repeats: int = 3) -> dict:
    """A run record of one model whose test macro F1 over the splits are ``values``."""
    from histohub_training.downstream.metrics import summarize

    summary = {f: {"macro_f1": summarize(v)} for f, v in values.items()}
    return {"task": "linear", "dataset": {"name": "toy"}, "data_hash": "d" * 64,
            "protocol": {"seed": 0, "folds": folds, "repeats": repeats, "epochs": None,
                         "probe": "converged"},
            "split": {"kind": "grouped stratified"}, "finished_utc": "2026-12-07T00:00:00",
            "argv": ["--task", "linear"], "file": "run.json",
            "models": [{"label": "m", "sha256": "e" * 64}],
            "results": {"m": {"metric": "macro_f1", "higher_is_better": True,
                              "summary": summary}}}


def test_a_recorded_metric_is_a_mean_with_its_sd_and_n():
    scores = [0.50, 0.62, 0.55, 0.70, 0.48, 0.58, 0.61, 0.52, 0.66, 0.57, 0.49, 0.63, 0.60,
              0.54, 0.59]
    item = manifest_metrics(_run({"0.5": scores[:14] + [0.3], "1": scores}), "m")
    recorded = item["linear/toy"]
    assert recorded["n"] == 15 and recorded["folds"] == 5 and recorded["repeats"] == 3
    assert recorded["mean"] == pytest.approx(np.mean(scores))
    assert recorded["std"] == pytest.approx(np.std(scores, ddof=1))    # sample sd, > 0
    assert recorded["by_fraction"]["0.5"]["n"] == 15
    assert "5-fold cross-validation x 3 repeats" in recorded["split"]


def _manifest(tmp_path, name: str, means: dict[str, float], sd: float, n: int = 15):
    """A copy of histohub's manifest whose entry ``resnet18-ssl-mini`` records ``means``."""
    path = tmp_path / f"{name}.json"
    shutil.copy(histohub.hub.MANIFEST_PATH, path)
    item = {"metric": "macro_f1", "higher_is_better": True, "mean": means["1"], "std": sd,
            "n": n, "label_fraction": 1.0,
            "by_fraction": {f: {"mean": m, "std": sd, "n": n} for f, m in means.items()}}
    data = json.loads(path.read_text())
    data["models"]["resnet18-ssl-mini"]["metrics"] = {"linear/toy": item}
    path.write_text(json.dumps(data))
    return path


def test_compare_metrics_judges_each_difference_against_the_spread(tmp_path, capsys):
    shipped = _manifest(tmp_path, "a", {"0.1": 0.40, "1": 0.60}, sd=0.05)
    close = _manifest(tmp_path, "b", {"0.1": 0.43, "1": 0.58}, sd=0.04)
    argv = ["resnet18-ssl-mini", str(close), "resnet18-ssl-mini", "--shipped-manifest",
            str(shipped)]
    assert compare_metrics.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("within noise") == 2 and "2 of 2 within the recorded spread" in out
    moved = _manifest(tmp_path, "c", {"0.1": 0.40, "1": 0.71}, sd=0.05)   # +0.11 > 0.05
    argv[1] = str(moved)
    assert compare_metrics.main(argv) == 1
    out = capsys.readouterr().out
    assert "MOVED by more than sd 0.050" in out and "not within: linear/toy at 100%" in out
    single = _manifest(tmp_path, "d", {"1": 0.60}, sd=0.0, n=1)    # one split: no spread
    argv[1] = str(single)
    assert compare_metrics.main(argv) == 1
    assert "NO SPREAD" in capsys.readouterr().out
    assert compare_metrics.main(["resnet18-ssl-mini", str(close), "nope",
                                 "--shipped-manifest", str(shipped)]) == 2
    assert "has no model 'nope'" in capsys.readouterr().err


def test_quick_probe_groups_as_the_benchmark_does(shared_data):
    from benchmarks import quick_probe

    from histohub_training.downstream import datasets as ds

    sets = quick_probe.probe_sets(shared_data, idc_count=200)
    for name, preset in (("kather", "kather2016"), ("ebhi", "ebhi-seg")):
        paths, _, groups = sets[name]
        dataset = ds.for_classification(ds.load_dataset(preset, root=shared_data))
        by_path = dict(zip(map(str, dataset.paths), dataset.groups.tolist()))
        assert [by_path[str(p)] for p in paths] == groups
    # EBHI's case 2012118 is one group whether its files say GT or GTxc
    assert len(set(sets["ebhi"][2])) == len(set(
        ds.load_dataset("ebhi-seg", root=shared_data).groups.tolist()))
