"""The five protocols, run over every model on one dataset with the same splits.

``linear`` (frozen features, Table 2 / D.8, Fig. 4), ``finetune`` (all layers, Table 1 /
D.7, Fig. 3), ``regression`` (L1 on a 0-100 score; frozen by default, all layers with
``finetune=True``), ``segmentation`` (UNet, Table 1 / D.7) and ``clustering`` (k-means on
the frozen features, section 5.3). A linear layer on frozen features is trained by
``probe``: ``converged`` (default) or ``paper`` (see :mod:`.linear`). The splits are the
same for every model: (grouped) ``folds``-fold cross-validation reshuffled ``repeats``
times (:func:`.splits.cross_validation_splits`), and each label fraction is drawn from
every split's training part, so every number is a mean ± sd over ``folds x repeats``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import datasets as ds
from .encoders import Encoder
from .features import cached_features
from .finetune import finetune
from .images import load_images, load_masks
from .linear import PROBES, paper_weight_decay, train_linear, train_linear_converged
from .metrics import clustering_metrics, kmeans_labels, summarize
from .segmentation import train_segmentation
from .selection import PRIMARY
from .splits import CV_FOLDS, CV_REPEATS, PAPER_FRACTIONS, Split, cross_validation_splits, \
    label_fractions, score_strata

TASKS = ("linear", "finetune", "regression", "segmentation", "clustering")
CONVERGED = {   # how the converged probe trains, as recorded
    "classification": {
        "optimizer": "L-BFGS, full batch, to a gradient below 1e-6: multinomial logistic "
                     "regression, L2 1 / n_train (scikit-learn's C = 1)",
        "selection": "none: the converged fit's test metrics"},
    "regression": {
        "optimizer": "exact ridge regression (SVD) for each L2 strength of a grid",
        "selection": "test metrics at the L2 strength with the best validation L1"},
}


@dataclass(frozen=True)
class Protocol:
    """Everything that fixes how a task is trained (recorded in the run's JSON)."""

    task: str
    fractions: tuple[float, ...] = PAPER_FRACTIONS
    repeats: int = CV_REPEATS        # reshuffles of the cross-validation folds
    folds: int = CV_FOLDS            # 1: a 50/25/25 split per repeat
    epochs: int = 100
    seed: int = 0
    probe: str = "converged"          # frozen linear / regression: "converged" or "paper"
    batch_size: int | None = None     # None: 128 (paper); 16 for segmentation on CPU memory
    lr: float = 1e-3
    weight_decay: float | None = None  # None: 1e-5 for ResNet18, 1e-4 otherwise (paper)
    input_size: int | None = None     # None: the model's own (224 for the paper's models)
    finetune: bool = False            # regression: train all layers instead of a linear layer
    augment: bool = False
    device: str = "cpu"
    feature_batch_size: int = 64
    progress: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.probe not in PROBES:
            raise ValueError(f"Unknown probe {self.probe!r}; choose one of {PROBES}")
        if self.folds not in (1,) and self.folds < 3 or self.repeats < 1:
            raise ValueError(f"--folds {self.folds} --repeats {self.repeats}: folds is 1 (a "
                             "50/25/25 split per repeat) or at least 3, repeats at least 1")

    @property
    def frozen(self) -> bool:
        """A linear layer on frozen features (trained by ``probe``)."""
        return self.task in ("linear", "regression") and not self.finetune

    @property
    def objective(self) -> str:
        return {"linear": "classification", "finetune": "classification",
                "regression": "regression", "segmentation": "segmentation",
                "clustering": "clustering"}[self.task]

    def batch(self) -> int:
        return self.batch_size or (16 if self.task == "segmentation" else 128)

    def decay(self, arch: str) -> float:
        return self.weight_decay if self.weight_decay is not None else paper_weight_decay(arch)

    def size(self, encoder: Encoder) -> int:
        return self.input_size or encoder.preprocessing.input_size


def prepare(dataset: ds.ImageDataset, task: str) -> ds.ImageDataset:
    """The dataset restricted and checked for ``task`` (labels, masks or scores)."""
    if task in ("linear", "finetune", "clustering"):
        return ds.for_classification(dataset)
    if task == "regression":
        return ds.for_regression(dataset)
    if task == "segmentation":
        return ds.for_segmentation(dataset)
    raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}")


def strata_of(dataset: ds.ImageDataset, task: str) -> np.ndarray:
    """What splits and label fractions are stratified by: classes, or score quartiles."""
    if task == "regression":
        return score_strata(dataset.scores)
    if dataset.labels is not None:
        return dataset.labels
    return np.zeros(len(dataset), dtype=np.int64)


def run_protocol(encoders: list[Encoder], dataset: ds.ImageDataset, protocol: Protocol) -> dict:
    """Run ``protocol`` for every encoder; the ``results`` and ``split`` parts of a run record."""
    task = protocol.task
    data_hash = dataset.content_hash()
    strata = strata_of(dataset, task)
    names = list(dataset.classes) if task != "regression" and dataset.labels is not None \
        else None
    splits: list[Split] | None = None
    if task == "segmentation":
        strata, splits = _segmentation_splits(dataset, strata, names, protocol)
        if strata is not dataset.labels:   # fell back to one stratum
            names = None
    elif task != "clustering":
        splits = _splits(strata, dataset.groups, protocol, names)
    results: dict[str, dict] = {}
    timings: dict[str, dict] = {}
    for encoder in encoders:
        start = time.perf_counter()
        results[encoder.label], timings[encoder.label] = _run_one(
            encoder, dataset, protocol, splits, strata, data_hash)
        timings[encoder.label]["total_s"] = round(time.perf_counter() - start, 3)
    return {"data_hash": data_hash,
            "split": _describe_splits(splits, dataset, names, protocol),
            "results": results, "timings": timings}


def _splits(strata: np.ndarray, groups: np.ndarray | None, protocol: Protocol,
            names: list[str] | None) -> list[Split]:
    return cross_validation_splits(strata, groups, folds=protocol.folds,
                                   repeats=protocol.repeats, seed=protocol.seed,
                                   class_names=names)


def _segmentation_splits(dataset: ds.ImageDataset, strata: np.ndarray,
                         names: list[str] | None, protocol: Protocol
                         ) -> tuple[np.ndarray, list[Split]]:
    """Splits stratified by image class where the classes allow it; the target is pixels,
    so a class too rare to stratify falls back to unstratified splits (with a warning)."""
    if dataset.labels is not None:
        try:
            return strata, _splits(strata, dataset.groups, protocol, names)
        except ds.DatasetError as error:
            warnings.warn(f"Segmentation split not stratified by class: {error}",
                          stacklevel=3)
    flat = np.zeros(len(dataset), dtype=np.int64)
    return flat, _splits(flat, dataset.groups, protocol, None)


def _run_one(encoder: Encoder, dataset: ds.ImageDataset, protocol: Protocol,
             splits: list[Split] | None, strata: np.ndarray, data_hash: str) -> tuple[dict, dict]:
    timing: dict = {}
    if protocol.task == "clustering" or protocol.frozen:
        start = time.perf_counter()
        cache = None if protocol.cache_dir is None else Path(protocol.cache_dir)
        features, feature_info = cached_features(
            encoder, dataset, data_hash=data_hash, input_size=protocol.size(encoder),
            cache_dir=cache, device=protocol.device,
            batch_size=protocol.feature_batch_size, progress=protocol.progress)
        timing["features_s"] = round(time.perf_counter() - start, 3)
        timing["features_cached"] = feature_info["cached"]
        start = time.perf_counter()
        if protocol.task == "clustering":
            result = _clustering(features, dataset, protocol)
        else:
            result = _sweep(protocol, encoder, splits, strata,
                            lambda idx: features[idx], _targets(dataset, protocol.task),
                            trainer="linear")
        result["features"] = {"cache_key": feature_info["key"], "dim": int(features.shape[1])}
        timing["train_s"] = round(time.perf_counter() - start, 3)
        return result, timing
    start = time.perf_counter()
    images = load_images(dataset.paths, protocol.size(encoder), progress=protocol.progress,
                         desc=f"images {dataset.name}")
    if protocol.task == "segmentation":
        targets = load_masks(dataset.masks, protocol.size(encoder))
    else:
        targets = _targets(dataset, protocol.task)
    timing["load_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    trainer = "segmentation" if protocol.task == "segmentation" else "finetune"
    result = _sweep(protocol, encoder, splits, strata, lambda idx: images[idx], targets,
                    trainer=trainer)
    timing["train_s"] = round(time.perf_counter() - start, 3)
    return result, timing


def _targets(dataset: ds.ImageDataset, task: str) -> torch.Tensor:
    if task == "regression":
        return torch.from_numpy(dataset.scores.astype(np.float32))
    return torch.from_numpy(dataset.labels)


def _sweep(protocol: Protocol, encoder: Encoder, splits: list[Split], strata: np.ndarray,
           inputs, targets: torch.Tensor, *, trainer: str) -> dict:
    """Every (split, fraction): one training run on that fraction of the split's training
    part, tested on its test part; ``summary`` is the mean ± sd over the splits."""
    from tqdm.auto import tqdm

    objective = "regression" if protocol.task == "regression" else (
        "segmentation" if protocol.task == "segmentation" else "classification")
    num_classes = int(strata.max()) + 1 if objective == "classification" else 0
    jobs = [(index, split, fraction, positions) for index, split in enumerate(splits)
            for (fraction, _), positions in label_fractions(
                strata[split.train], fractions=protocol.fractions, repeats=1,
                seed=protocol.seed * 1000 + index).items()]
    runs: dict[str, list[dict]] = {}
    for index, split, fraction, positions in tqdm(
            jobs, desc=f"{protocol.task} {encoder.label}", disable=not protocol.progress):
        parts = {k: (inputs(torch.from_numpy(v)), targets[torch.from_numpy(v)])
                 for k, v in (("val", split.val), ("test", split.test))}
        train_idx = torch.from_numpy(split.train[positions])
        train = (inputs(train_idx), targets[train_idx])
        seed = protocol.seed * 1000 + index
        result = _train(trainer, protocol, encoder, train, parts, objective=objective,
                        num_classes=num_classes, seed=seed)
        runs.setdefault(_fraction_key(fraction), []).append(
            {"repeat": index // protocol.folds, "fold": index % protocol.folds, "seed": seed,
             "n_train": int(len(train_idx)), "n_test": int(len(split.test)),
             "train_sha256": _indices_hash(split.train[positions]), **result.to_json()})
    metric, higher = PRIMARY[objective]
    result = {"metric": metric, "higher_is_better": higher, "runs": runs,
              "summary": {f: _summary(rs) for f, rs in runs.items()}}
    if objective == "regression":   # what a model that learned nothing scores
        result["reference"] = {"l1_predicting_training_mean": float(np.mean([
            (targets[torch.from_numpy(s.test)].float()
             - targets[torch.from_numpy(s.train)].float().mean()).abs().mean()
            for s in splits]))}
    return result


def _train(trainer: str, protocol: Protocol, encoder: Encoder, train, parts: dict, *,
           objective: str, num_classes: int, seed: int):
    """One training run of ``trainer`` on ``train``, selected on / tested on ``parts``."""
    common = dict(weight_decay=protocol.decay(encoder.arch), epochs=protocol.epochs,
                  batch_size=protocol.batch(), lr=protocol.lr, seed=seed)
    if trainer == "linear" and protocol.probe == "converged":
        return train_linear_converged(train, parts["val"], parts["test"],
                                      objective=objective, num_classes=num_classes)
    if trainer == "linear":
        return train_linear(train, parts["val"], parts["test"], objective=objective,
                            num_classes=num_classes, **common)
    if trainer == "finetune":
        return finetune(encoder, train, parts["val"], parts["test"], objective=objective,
                        num_classes=num_classes, device=protocol.device,
                        augment=protocol.augment, **common)
    return train_segmentation(encoder, train, parts["val"], parts["test"],
                              device=protocol.device, augment=protocol.augment, **common)


def _summary(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0]["test"].items() if isinstance(v, (int, float))]
    return {k: summarize([r["test"][k] for r in runs]) for k in keys}


def _clustering(features: torch.Tensor, dataset: ds.ImageDataset, protocol: Protocol) -> dict:
    """k-means with k = number of classes, ``repeats`` seeds, scored against the labels."""
    k = len(dataset.classes)
    runs = []
    for repeat in range(protocol.repeats):
        seed = protocol.seed * 1000 + repeat
        predicted = kmeans_labels(features.numpy(), k, seed=seed)
        runs.append({"repeat": repeat, "seed": seed,
                     "test": clustering_metrics(dataset.labels, predicted)})
    return {"metric": "nmi", "higher_is_better": True, "runs": {"1": runs},
            "summary": {"1": _summary(runs)}, "k": k}


def _fraction_key(fraction: float) -> str:
    return f"{fraction:g}"


def _indices_hash(indices: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def scheme_of(protocol: dict) -> str:
    """How a run's splits were made, in words, from its recorded protocol: ``5-fold
    cross-validation x 3 repeats (seed 0)``; runs recorded before folds: one split."""
    seed, repeats = protocol.get("seed", 0), protocol.get("repeats", 1)
    folds = protocol.get("folds")
    if folds is None:
        return f"one 50/25/25 split (seed {seed})"
    if folds == 1:
        return f"50/25/25 split x {repeats} repeats (seeds {seed}-{seed + repeats - 1})"
    return f"{folds}-fold cross-validation x {repeats} repeats (seed {seed})"


def _describe_splits(splits: list[Split] | None, dataset: ds.ImageDataset,
                     names: list[str] | None, protocol: Protocol) -> dict:
    if splits is None:
        return {"kind": "none (clustering uses every image)", "sizes": {"all": len(dataset)}}
    described = {"kind": "grouped stratified" if dataset.groups is not None else "stratified",
                 "scheme": scheme_of(asdict(protocol)), "folds": protocol.folds,
                 "repeats": protocol.repeats, "n": len(splits),
                 "sizes": [s.sizes() for s in splits],
                 "stratified_by": "class" if names else (
                     "score quartile" if dataset.scores is not None else "nothing"),
                 "missing_classes": {k: sorted({names[c] if names else int(c)
                                                for s in splits for c in s.missing[k]})
                                     for k in ("train", "val", "test")},
                 "indices_sha256": [{k: _indices_hash(getattr(s, k))
                                     for k in ("train", "val", "test")} for s in splits]}
    if dataset.groups is not None:
        described["groups"] = [{k: len(set(dataset.groups[getattr(s, k)].tolist()))
                                for k in ("train", "val", "test")} for s in splits]
    return described


def protocol_json(protocol: Protocol) -> dict:
    """The protocol as recorded in a run's JSON: ``probe`` is None where no linear layer is
    trained on frozen features; settings a converged probe does not use are None."""
    record = asdict(protocol)
    record["fractions"] = list(protocol.fractions)
    record["batch_size"] = protocol.batch()
    record["optimizer"] = "Adam"
    record["selection"] = "test metrics at the best validation epoch"
    if not protocol.frozen:
        record["probe"] = None
    elif protocol.probe == "converged":
        record.update(epochs=None, batch_size=None, lr=None, weight_decay=None,
                      **CONVERGED[protocol.objective])
    return record

