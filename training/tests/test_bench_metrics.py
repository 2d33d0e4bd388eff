"""Benchmark metrics against scikit-learn (and the paper's formulas) on random labels."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from histohub_training.downstream import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed,classes", [(0, 2), (1, 5), (2, 9)])
def test_classification_metrics_match_sklearn_and_formula(seed, classes):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, classes, 300)
    y_pred = np.where(rng.random(300) < 0.5, y_true, rng.integers(0, classes, 300))
    got = metrics.classification_metrics(y_true, y_pred, num_classes=classes)
    assert got["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y_true, y_pred,
                                                                     average="macro"))
    assert got["accuracy"] == pytest.approx((y_true == y_pred).mean())
    assert got["balanced_accuracy"] == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(y_true, y_pred))
    # Appendix A: F1 = precision * recall / ((precision + recall) / 2), per class, averaged
    per_class = []
    for c in range(classes):
        tp = np.sum((y_pred == c) & (y_true == c))
        precision, recall = tp / np.sum(y_pred == c), tp / np.sum(y_true == c)
        per_class.append(precision * recall / ((precision + recall) / 2))
    assert got["per_class_f1"] == pytest.approx(per_class)
    assert got["macro_f1"] == pytest.approx(np.mean(per_class))


@pytest.mark.parametrize("seed,classes", [(3, 2), (4, 4)])
def test_pixel_metrics_from_confusion_match_sklearn(seed, classes):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (4, 16, 16), generator=generator)
    pred = torch.randint(0, classes, (4, 16, 16), generator=generator)
    pred[target == 0] = 0      # some agreement, not all
    cm = metrics.confusion_counts(target, pred, classes)
    assert np.array_equal(cm.numpy(), sklearn_metrics.confusion_matrix(
        target.flatten(), pred.flatten(), labels=list(range(classes))))
    got = metrics.metrics_from_confusion(cm)
    expected = metrics.classification_metrics(target.flatten().numpy(), pred.flatten().numpy(),
                                              num_classes=classes)
    for key in ("macro_f1", "accuracy", "balanced_accuracy", "per_class_f1"):
        assert got[key] == pytest.approx(expected[key])


def test_macro_f1_ignores_classes_absent_from_truth_and_prediction():
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    cm = metrics.confusion_counts(torch.tensor(y_true), torch.tensor(y_pred), 4)
    assert metrics.metrics_from_confusion(cm)["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(y_true, y_pred, average="macro"))


def test_regression_l1_is_the_mean_absolute_error():
    rng = np.random.default_rng(5)
    y, p = rng.uniform(0, 100, 50), rng.uniform(0, 100, 50)
    got = metrics.regression_metrics(y, p)
    assert got["l1"] == pytest.approx(np.abs(y - p).mean())
    assert got["rmse"] == pytest.approx(np.sqrt(((y - p) ** 2).mean()))


def test_clustering_metrics_match_sklearn_and_purity_by_hand():
    rng = np.random.default_rng(6)
    truth, clusters = rng.integers(0, 3, 200), rng.integers(0, 5, 200)
    got = metrics.clustering_metrics(truth, clusters)
    assert got["nmi"] == pytest.approx(sklearn_metrics.normalized_mutual_info_score(truth,
                                                                                    clusters))
    assert got["ari"] == pytest.approx(sklearn_metrics.adjusted_rand_score(truth, clusters))
    majority = sum(np.bincount(truth[clusters == k]).max() for k in np.unique(clusters))
    assert got["purity"] == pytest.approx(majority / len(truth))
    perfect = metrics.clustering_metrics(truth, (truth + 1) % 3)   # relabelled, same partition
    assert perfect == pytest.approx({"nmi": 1.0, "ari": 1.0, "purity": 1.0})


def test_kmeans_finds_well_separated_clusters():
    rng = np.random.default_rng(7)
    centres = np.eye(3, 16) * 10
    labels = np.repeat(np.arange(3), 30)
    features = centres[labels] + rng.normal(0, 0.1, (90, 16))
    found = metrics.kmeans_labels(features, 3, seed=0)
    assert metrics.clustering_metrics(labels, found)["ari"] == pytest.approx(1.0)


def test_summary_uses_the_sample_standard_deviation():
    assert metrics.summarize([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert metrics.summarize([4.0])["std"] == 0.0
