"""Evaluation metrics of the paper (Appendix A) and of clustering quality.

Macro F1 (A.3, each class weighted equally) for classification and segmentation, the
mean absolute error L1 for regression; accuracy, balanced accuracy and per-class F1 on
top; NMI, adjusted Rand index and purity of k-means clusters against the labels.
scikit-learn computes them wherever it has them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, *,
                           num_classes: int | None = None) -> dict:
    """Macro F1 (classes present in ``y_true`` or ``y_pred``), accuracy, balanced accuracy,
    per-class F1 (every class ``0..num_classes-1``; 0 where undefined)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    num_classes = num_classes or int(max(y_true.max(), y_pred.max())) + 1
    per_class = f1_score(y_true, y_pred, labels=list(range(num_classes)), average=None,
                         zero_division=0)
    import warnings

    with warnings.catch_warnings():   # a class absent from y_true: its recall is undefined
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(y_true, y_pred)
    return {
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "per_class_f1": [float(v) for v in per_class],
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """L1 (mean absolute error, Appendix A) and RMSE, in the scores' units (0-100)."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    return {"l1": float(mean_absolute_error(y_true, y_pred)),
            "rmse": float(np.sqrt(mean_squared_error(y_true, y_pred)))}


def confusion_counts(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` int64 confusion matrix (rows = truth) of two equal-shape label tensors."""
    index = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def metrics_from_confusion(confusion: torch.Tensor | np.ndarray) -> dict:
    """Classification metrics from a confusion matrix (pixels of a segmentation).

    Same definitions as :func:`classification_metrics`: macro F1 over the classes present
    in truth or prediction, balanced accuracy over the classes present in truth.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    denominator = support + predicted
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    present = denominator > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    total = cm.sum()
    return {
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "balanced_accuracy": float(recall[support > 0].mean()) if (support > 0).any() else 0.0,
        "per_class_f1": [float(v) for v in f1],
    }


def purity(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Share of samples whose cluster's majority class is their class."""
    from sklearn.metrics.cluster import contingency_matrix

    table = contingency_matrix(labels_true, labels_pred)
    return float(table.max(axis=0).sum() / table.sum())


def clustering_metrics(labels_true: np.ndarray, labels_pred: np.ndarray) -> dict:
    """NMI, adjusted Rand index and purity of a clustering against class labels."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"nmi": float(normalized_mutual_info_score(labels_true, labels_pred)),
            "ari": float(adjusted_rand_score(labels_true, labels_pred)),
            "purity": purity(labels_true, labels_pred)}


def kmeans_labels(features: np.ndarray, n_clusters: int, *, seed: int) -> np.ndarray:
    """k-means cluster ids of L2-normalised ``(N, D)`` features (mini-batch above 10,000;
    the paper clusters with mini-batch k-means, section 5.3)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if len(x) > 10_000:
        model = MiniBatchKMeans(n_clusters, random_state=seed, n_init=3, batch_size=4096)
    else:
        model = KMeans(n_clusters, random_state=seed, n_init=10)
    return model.fit_predict(x)


def summarize(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for a single run) of repeated runs."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": int(array.size)}
