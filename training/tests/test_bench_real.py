"""Small real-data runs on ../shared/data: random init vs a checkpoint (skipped without it).

Kather 2016 tiles (classification, grouped by source image), EBHI-Seg (UNet segmentation
with the real masks) and EBHI-Seg mask coverage as a 0-100 regression score. 64 px inputs
and a few epochs keep them small; the numbers are not the point, the pipeline is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from downstream import datasets as ds
from downstream.cli import main
from downstream.encoders import random_encoder
from downstream.splits import split_dataset

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A ResNet18 checkpoint that differs from ``random`` (another seed): no pretrained
    weights can be downloaded here."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "encoder-seed7.safetensors"
    save_file(random_encoder("resnet18", seed=7).state_dict, path)
    return path


def _run(out: Path, *argv: str) -> dict:
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    (path,) = (out / "runs").glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_kather_linear_probe_random_vs_checkpoint(shared_data, checkpoint, tmp_path):
    run = _run(tmp_path, "--model", "random", "--model", str(checkpoint), "--task", "linear",
               "--data", "kather2016", "--data-root", str(shared_data), "--input-size", "64",
               "--fractions", "50,100", "--repeats", "2", "--epochs", "5")
    assert run["dataset"]["n_images"] == 240 and run["dataset"]["n_groups"] == 10
    assert run["split"]["kind"] == "grouped stratified"
    assert run["split"]["missing_classes"]["train"] == run["split"]["missing_classes"]["test"] == []
    for label in ("random-resnet18", "encoder-seed7"):
        summary = run["results"][label]["summary"]
        assert summary["1"]["macro_f1"]["n"] == 2
        assert 0.125 < summary["1"]["macro_f1"]["mean"] <= 1     # above chance (8 classes)
        assert len(run["results"][label]["runs"]["1"][0]["test"]["per_class_f1"]) == 8
    # the split the run used keeps every source image on one side
    data = ds.load_dataset("kather2016", root=shared_data)
    split = split_dataset(data.labels, data.groups, seed=0, class_names=list(data.classes))
    sides = [set(data.groups[p].tolist()) for p in (split.train, split.val, split.test)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert "| 18 | Random |" in (tmp_path / "tables.md").read_text()


@pytest.mark.slow
def test_ebhi_segmentation_unet_random_vs_checkpoint(shared_data, checkpoint, tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    run = _run(tmp_path, "--model", "random", "--model", str(checkpoint), "--task",
               "segmentation", "--data", "ebhi-seg", "--data-root", str(shared_data),
               "--input-size", "32", "--max-images", "64", "--fractions", "100",
               "--repeats", "1", "--epochs", "1", "--batch-size", "32")
    assert run["dataset"]["grouped"] and run["dataset"]["n_images"] <= 70
    for label in ("random-resnet18", "encoder-seed7"):
        test = run["results"][label]["runs"]["1"][0]["test"]
        assert 0 < test["macro_f1"] <= 1 and len(test["per_class_f1"]) == 2
        assert run["results"][label]["metric"] == "macro_f1"


@pytest.mark.slow
def test_ebhi_mask_coverage_regression_random_vs_checkpoint(shared_data, checkpoint, tmp_path):
    run = _run(tmp_path, "--model", "random", "--model", str(checkpoint), "--task",
               "regression", "--data", "ebhi-seg", "--data-root", str(shared_data),
               "--input-size", "64", "--max-images", "120", "--fractions", "100",
               "--repeats", "2", "--epochs", "10")
    scores = run["dataset"]["scores"]
    assert 0 <= scores["min"] < scores["max"] <= 100
    reference = run["results"]["random-resnet18"]["reference"]["l1_predicting_training_mean"]
    for label in ("random-resnet18", "encoder-seed7"):
        result = run["results"][label]
        assert result["metric"] == "l1" and not result["higher_is_better"]
        l1 = result["summary"]["1"]["l1"]["mean"]
        assert np.isfinite(l1) and 0 < l1 < 2 * reference   # 0-100 units, not 0-1
