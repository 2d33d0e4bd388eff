"""The linear probes: the converged default against scikit-learn's converged logistic
regression and a NumPy transcription of ridge regression; the paper's Adam probe where it
falls short (issue 8, item 5); which probe a run used, in its JSON and tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from histohub_training.downstream.linear import (RIDGE_GRID, fit_logistic, fit_ridge,
                                                 paper_weight_decay, train_linear,
                                                 train_linear_converged)

sklearn = pytest.importorskip("sklearn")


def _standardised(train, *others):
    """The probe's standardisation in NumPy: the training part's mean and std (ddof 1)."""
    x = train.double().numpy()
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0, ddof=1), 1e-6)
    return [(a.double().numpy() - mean) / std for a in (train, *others)]


def _sklearn_macro_f1(train, test) -> float:
    """scikit-learn's LogisticRegression (C = 1, L-BFGS) converged far past its defaults."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from threadpoolctl import threadpool_limits

    x_train, x_test = _standardised(train[0], test[0])
    with threadpool_limits(1):    # tiny matrices: extra threads only wait on a busy machine
        model = LogisticRegression(C=1.0, tol=1e-8, max_iter=10_000).fit(x_train, train[1])
    return float(f1_score(test[1], model.predict(x_test), average="macro"))


def _few_samples_many_dims(n: int, *, seed: int, dim: int = 512, classes: int = 9):
    """9 classes that differ in 3 directions of a 512-d feature space, plus noise in all
    512: a linear probe on 72 images, like issue 8's 69 tiles."""
    layout = np.random.default_rng(0)
    centres = layout.normal(0, 2.0, (classes, 3))
    mixing = layout.normal(0, 1, (3, dim)) / np.sqrt(3)
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = (centres[labels] + rng.normal(0, 1, (n, 3))) @ mixing + 0.5 * rng.normal(0, 1, (n, dim))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(labels)


def test_converged_probe_matches_sklearn_where_the_paper_probe_falls_short():
    train, val, test = (_few_samples_many_dims(n, seed=s) for n, s in ((72, 1), (72, 2),
                                                                         (144, 3)))
    reference = _sklearn_macro_f1(train, test)
    result = train_linear_converged(train, val, test, objective="classification",
                                    num_classes=9)
    assert result.fit["converged"] and result.l2 == pytest.approx(1 / 72)
    assert abs(result.test["macro_f1"] - reference) <= 0.03
    paper = train_linear(train, val, test, objective="classification", num_classes=9,
                         weight_decay=1e-5)    # Adam, batch 128, 100 epochs: 100 steps
    assert paper.test["macro_f1"] < reference - 0.03      # what issue 8 measured
    assert result.to_json()["probe"] == "converged"


@pytest.mark.slow
def test_converged_probe_matches_sklearn_on_real_kather_features(shared_data):
    """Random ResNet18 features of the Kather 2016 tiles at 64 px, the benchmark's split."""
    from histohub_training.downstream import datasets as ds
    from histohub_training.downstream.encoders import random_encoder
    from histohub_training.downstream.features import extract
    from histohub_training.downstream.splits import split_dataset

    data = ds.for_classification(ds.load_dataset("kather2016", root=shared_data))
    features = extract(random_encoder("resnet18", seed=0), data, input_size=64,
                       progress=False)
    with pytest.warns(UserWarning, match="too few groups"):
        split = split_dataset(data.labels, data.groups, seed=0, class_names=list(data.classes))
    labels = torch.from_numpy(data.labels)
    train, val, test = ((features[torch.from_numpy(p)], labels[torch.from_numpy(p)])
                        for p in (split.train, split.val, split.test))
    result = train_linear_converged(train, val, test, objective="classification",
                                    num_classes=len(data.classes))
    assert result.fit["converged"]
    assert abs(result.test["macro_f1"] - _sklearn_macro_f1(train, test)) <= 0.03


def test_logistic_probe_is_the_penalised_optimum():
    """At the fit, the gradient of mean cross-entropy + l2 / 2 ||W||^2 (NumPy) is ~0."""
    train, val, test = (_few_samples_many_dims(n, seed=s, dim=32, classes=4)
                        for n, s in ((60, 1), (20, 2), (20, 3)))
    (x,) = _standardised(train[0])
    onehot = np.eye(4)[train[1].numpy()]
    for l2 in (None, 10.0):
        result = fit_logistic(train, val, test, num_classes=4, l2=l2)
        logits = x @ result.weight.T + result.bias
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad_weight = (p - onehot).T @ x / len(x) + result.l2 * result.weight
        grad_bias = (p - onehot).mean(axis=0)
        assert result.fit["converged"] and result.l2 == (l2 or 1 / 60)
        assert np.abs(grad_weight).max() < 1e-5 and np.abs(grad_bias).max() < 1e-5
    with pytest.raises(ValueError, match="finite and > 0"):
        fit_logistic(train, val, test, num_classes=4, l2=0.0)


def test_ridge_probe_is_the_closed_form_and_chooses_on_validation():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(0, 1, (120, 40)), dtype=torch.float32)
    score = (50 + 10 * x[:, 0] - 5 * x[:, 1] + 4 * torch.tensor(rng.normal(0, 1, 120))
             ).clamp(0, 100).float()
    train, val, test = ((x[s], score[s]) for s in (slice(0, 40), slice(40, 80),
                                                  slice(80, 120)))
    x_train, x_val, x_test = _standardised(train[0], val[0], test[0])
    y = train[1].double().numpy()
    val_l1 = []
    for l2 in RIDGE_GRID:   # (X^T X + n l2 I) w = X^T (y - mean y)
        w = np.linalg.solve(x_train.T @ x_train + len(y) * l2 * np.eye(40),
                            x_train.T @ (y - y.mean()))
        val_l1.append(np.abs(x_val @ w + y.mean() - val[1].numpy()).mean())
        single = fit_ridge(train, val, test, l2_grid=[l2])
        assert single.test["l1"] == pytest.approx(
            np.abs(x_test @ w + y.mean() - test[1].numpy()).mean(), rel=1e-6)
    result = train_linear_converged(train, val, test, objective="regression")
    assert result.l2 == RIDGE_GRID[int(np.argmin(val_l1))]
    assert result.val["l1"] == pytest.approx(min(val_l1), rel=1e-6)
    assert result.fit["val_history"] == pytest.approx(val_l1, rel=1e-6)
    constant = float((test[1] - train[1].mean()).abs().mean())
    assert result.test["l1"] < 0.7 * constant     # better than predicting the mean


def test_ridge_probe_on_scores_the_features_do_not_predict_stays_near_the_mean():
    """Noise features: the strongest L2 (close to predicting the training mean) wins
    instead of an interpolating fit (what a fixed weak prior did on EBHI: L1 20 vs 11)."""
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(0, 1, (150, 256)), dtype=torch.float32)
    score = torch.tensor(rng.uniform(0, 100, 150), dtype=torch.float32)
    parts = [(x[s], score[s]) for s in (slice(0, 50), slice(50, 100), slice(100, 150))]
    result = train_linear_converged(*parts, objective="regression")
    constant = float((parts[2][1] - parts[0][1].mean()).abs().mean())
    assert result.test["l1"] < 1.1 * constant


# --------------------------------------------------------------------------- the paper's probe

def _blobs(n: int, *, seed: int, dim: int = 32, classes: int = 3):
    centres = np.random.default_rng(0).normal(0, 1, (classes, dim))
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = centres[labels] + rng.normal(0, 1, (n, dim))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(labels)


def test_linear_probe_on_separable_features_reaches_high_f1():
    train, val, test = _blobs(120, seed=1), _blobs(60, seed=2), _blobs(60, seed=3)
    result = train_linear(train, val, test, objective="classification", num_classes=3,
                          weight_decay=1e-5, epochs=100, seed=0)   # the paper's protocol
    assert result.test["macro_f1"] > 0.95
    assert len(result.history) == 100 and result.history[result.best_epoch] == max(result.history)
    assert len(result.test["per_class_f1"]) == 3


def test_linear_regression_fits_a_linear_score_in_0_100_units():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(0, 1, (300, 8)), dtype=torch.float32)
    score = (50 + 10 * x[:, 0] - 5 * x[:, 1]).clamp(0, 100)
    parts = [(x[s], score[s]) for s in (slice(0, 150), slice(150, 225), slice(225, 300))]
    result = train_linear(*parts, objective="regression", weight_decay=1e-5, epochs=100,
                          lr=1e-2, seed=0)
    constant = float((parts[2][1] - parts[0][1].mean()).abs().mean())
    assert result.test["l1"] < 2.0 < constant     # far better than predicting the mean


def test_paper_weight_decay():
    assert paper_weight_decay("resnet18") == 1e-5 and paper_weight_decay("resnet50") == 1e-4


# --------------------------------------------------------------------------- records

def test_run_json_tables_and_manifest_item_name_the_probe(tmp_path, class_tiles):
    from histohub_training.downstream import report
    from histohub_training.downstream.cli import main

    data, out = class_tiles(tmp_path / "tiles", per_class=8), tmp_path / "out"
    common = ["--model", "random", "--task", "linear", "--data", str(data), "--input-size",
              "32", "--fractions", "100", "--repeats", "1", "--epochs", "2", "--out",
              str(out), "--quiet"]
    assert main(common) == 0
    converged = report.load_runs(out)[-1]
    assert converged["protocol"]["probe"] == "converged"
    assert "L-BFGS" in converged["protocol"]["optimizer"]
    assert converged["protocol"]["epochs"] is None       # not used: not recorded as used
    run = converged["results"]["random-resnet18"]["runs"]["1"][0]
    assert run["probe"] == "converged" and run["converged"] and run["l2"] > 0
    assert "trained by the converged probe" in (out / "tables.md").read_text()
    assert report.manifest_metrics(converged, "random-resnet18")[
        "linear/tiles"]["probe"] == "converged"

    assert main(common + ["--probe", "paper"]) == 0
    paper = report.load_runs(out)[-1]
    assert paper["protocol"]["probe"] == "paper" and paper["protocol"]["optimizer"] == "Adam"
    assert paper["protocol"]["epochs"] == 2
    assert paper["results"]["random-resnet18"]["runs"]["1"][0]["epochs"] == 2
    assert "trained by the paper's probe (Adam" in (out / "tables.md").read_text()
    assert json.loads(json.dumps(paper)) == paper


def test_runs_recorded_before_probes_were_named_read_as_the_paper_probe():
    from histohub_training.downstream.report import probe_of

    assert probe_of({"task": "linear", "protocol": {"optimizer": "Adam"}}) == "paper"
    assert probe_of({"task": "regression", "protocol": {"finetune": True}}) is None
    assert probe_of({"task": "clustering", "protocol": {}}) is None
    assert probe_of({"task": "linear", "protocol": {"probe": "converged"}}) == "converged"
