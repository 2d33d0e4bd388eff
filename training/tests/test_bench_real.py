"""Small real-data runs on ../shared/data (skipped without it).

Kather 2016 tiles (classification, grouped by source image), EBHI-Seg (UNet segmentation
with the real masks) and EBHI-Seg mask coverage as a 0-100 regression score. Small inputs
and few epochs keep them cheap; each asserts what a broken pipeline would miss: frozen
features that classify far above chance, a UNet that learns the masks, a regression in the
scores' own units that is never much worse than predicting the training mean, and one that
learns a score the images carry (their brightness) well below the mean's error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from histohub_training.downstream import datasets as ds
from histohub_training.downstream.cli import main
from histohub_training.downstream.splits import cross_validation_splits

pytest.importorskip("sklearn")


def _run(out: Path, *argv: str) -> dict:
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    (path,) = (out / "runs").glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_kather_linear_probe_random_vs_checkpoint(shared_data, other_seed, tmp_path):
    run = _run(tmp_path, "--model", "random", "--model", str(other_seed), "--task", "linear",
               "--data", "kather2016", "--data-root", str(shared_data), "--input-size", "64",
               "--fractions", "50,100", "--repeats", "2", "--epochs", "5")
    assert run["dataset"]["n_images"] == 240 and run["dataset"]["n_groups"] == 10
    assert run["split"]["kind"] == "grouped stratified" and run["split"]["n"] == 10
    # every class trains in every split (a test fold of 2 source images lacks some classes)
    assert run["split"]["missing_classes"]["train"] == []
    for label in ("random-resnet18", "other-seed"):
        summary = run["results"][label]["summary"]
        assert summary["1"]["macro_f1"]["n"] == 10 and summary["1"]["macro_f1"]["std"] > 0
        # frozen random features already separate the tissue types: far above chance (1/8);
        # shuffled labels or misread images land near 0.125
        assert summary["1"]["macro_f1"]["mean"] > 0.3
        assert len(run["results"][label]["runs"]["1"][0]["test"]["per_class_f1"]) == 8
    # the splits the run used keep every source image on one side
    data = ds.load_dataset("kather2016", root=shared_data)
    for split in cross_validation_splits(data.labels, data.groups, folds=5, repeats=2, seed=0,
                                         class_names=list(data.classes)):
        sides = [set(data.groups[p].tolist()) for p in (split.train, split.val, split.test)]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert "| 18 | Random |" in (tmp_path / "tables.md").read_text()


@pytest.mark.slow
def test_ebhi_segmentation_unet_learns_the_masks(shared_data, tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    run = _run(tmp_path, "--model", "random", "--task", "segmentation", "--data", "ebhi-seg",
               "--data-root", str(shared_data), "--input-size", "32", "--max-images", "64",
               "--fractions", "100", "--folds", "1", "--repeats", "1", "--epochs", "3",
               "--batch-size", "4")
    assert run["dataset"]["grouped"] and run["dataset"]["n_images"] <= 70
    result = run["results"]["random-resnet18"]
    assert result["metric"] == "macro_f1"
    (trained,) = result["runs"]["1"]
    assert len(trained["test"]["per_class_f1"]) == 2
    # Training moves validation (the best epoch is not the first) and the test pixels are
    # told apart better than chance (balanced accuracy 0.5): masks paired with the wrong
    # images, or a decoder that does not train, stay at 0.5.
    assert trained["best_epoch"] > 0
    assert trained["test"]["balanced_accuracy"] > 0.55


@pytest.mark.slow
def test_ebhi_mask_coverage_regression_random_vs_checkpoint(shared_data, other_seed, tmp_path):
    run = _run(tmp_path, "--model", "random", "--model", str(other_seed), "--task",
               "regression", "--data", "ebhi-seg", "--data-root", str(shared_data),
               "--input-size", "64", "--max-images", "120", "--fractions", "100",
               "--repeats", "2", "--epochs", "10")
    scores = run["dataset"]["scores"]
    assert 0 <= scores["min"] < scores["max"] <= 100
    reference = run["results"]["random-resnet18"]["reference"]["l1_predicting_training_mean"]
    assert reference > 5        # coverage in percent: scores read as fractions give ~0.1
    for label in ("random-resnet18", "other-seed"):
        result = run["results"][label]
        assert result["metric"] == "l1" and not result["higher_is_better"]
        l1 = result["summary"]["1"]["l1"]["mean"]
        # the ridge probe chooses its L2 on validation, so at worst it falls back to about
        # the training mean; predictions off in scale or offset land far above it
        assert np.isfinite(l1) and 0 < l1 < 1.1 * reference


@pytest.mark.slow
def test_regression_learns_a_score_the_images_carry(shared_data, tmp_path):
    """The coverage test above only bounds the error by the training mean's, which a probe
    that learned nothing also meets. Here the score is each image's mean brightness (0-100),
    which random convolutional features carry: the probe must land well below the mean's
    error, and a pipeline that scrambles images and scores, or their scale, cannot."""
    from PIL import Image

    images = sorted((shared_data / "ebhi-seg").glob("*/image/*.png"))[::5][:100]
    rows = ["path,score"] + [
        f"{path},{np.asarray(Image.open(path).convert('L'), np.float64).mean() / 2.55:.3f}"
        for path in images]
    table = tmp_path / "brightness.csv"
    table.write_text("\n".join(rows) + "\n")
    run = _run(tmp_path / "out", "--model", "random", "--task", "regression", "--data",
               str(table), "--input-size", "64", "--fractions", "100", "--repeats", "2",
               "--epochs", "10", "--no-groups")
    result = run["results"]["random-resnet18"]
    reference = result["reference"]["l1_predicting_training_mean"]
    l1 = result["summary"]["1"]["l1"]["mean"]
    assert reference > 2 and l1 < 0.75 * reference, (l1, reference)  # measured 0.55x
