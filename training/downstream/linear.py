"""Last-layer training: a linear layer on frozen pre-activation features.

Paper, sections 4.2 and 5.3: the encoder is frozen at the pre-activation layer (512
features for ResNet18/34, 2048 for ResNet50/101) and only a linear classifier (or one
regression output) is trained: Adam, batch 128, weight decay 1e-5 for ResNet18 and 1e-4
otherwise, up to 100 epochs, test metric at the best validation epoch.

Two reparametrisations that keep the model a single linear map, for a well-conditioned
fit with Adam's default step: features are standardised with the training set's mean and
standard deviation, and regression targets (0-100) are fitted divided by 100 (the L1
reported is in the original 0-100 units), the regressor starting at the training mean (zero weights).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .metrics import (classification_metrics, confusion_counts, metrics_from_confusion,
                      regression_metrics)
from .selection import BestEpoch, RunResult

SCORE_SCALE = 100.0


def paper_weight_decay(arch: str) -> float:
    """1e-5 for ResNet18, 1e-4 otherwise (section 4.2)."""
    return 1e-5 if arch == "resnet18" else 1e-4


def train_linear(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], *, objective: str,
                 num_classes: int = 0, weight_decay: float, epochs: int = 100,
                 batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> RunResult:
    """Fit a linear layer on ``(features (N, D), targets (N,))`` pairs; select on validation.

    ``objective``: ``classification`` (targets int64 class ids, cross-entropy) or
    ``regression`` (targets float scores 0-100, L1 loss).
    """
    if objective not in ("classification", "regression"):
        raise ValueError(f"objective is 'classification' or 'regression', got {objective!r}")
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = train
    mean = x_train.mean(dim=0, keepdim=True)
    std = x_train.std(dim=0, keepdim=True).clamp_min(1e-6) if len(x_train) > 1 \
        else torch.ones_like(mean)
    standardise = lambda x: (x - mean) / std  # noqa: E731
    x_train, x_val, x_test = standardise(x_train), standardise(val[0]), standardise(test[0])
    regression = objective == "regression"
    layer = nn.Linear(x_train.shape[1], 1 if regression else num_classes)
    with torch.no_grad():   # seeded, not the global RNG
        bound = 1 / np.sqrt(x_train.shape[1])
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    target = y_train.float() / SCORE_SCALE if regression else y_train.long()
    if regression:   # start at the training mean (weights 0): a random start is +-50 points
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.fill_(float(target.mean()))
    loss_fn = nn.L1Loss() if regression else nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    tracker = BestEpoch(objective)
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            output = layer(x_train[batch])
            loss = loss_fn(output.squeeze(1) if regression else output, target[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            tracker.update(epoch, _evaluate(layer, x_val, val[1], regression, num_classes),
                           layer)
    layer.load_state_dict(tracker.state)
    with torch.no_grad():
        test_metrics = _evaluate(layer, x_test, test[1], regression, num_classes, full=True)
    return RunResult(tracker.epoch, epochs, tracker.val, test_metrics, tracker.history)


def _evaluate(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, regression: bool,
              num_classes: int, *, full: bool = False) -> dict:
    output = layer(x)
    if regression:
        return regression_metrics(y.numpy(), (output.squeeze(1) * SCORE_SCALE).numpy())
    predicted = output.argmax(dim=1)
    if full:
        return classification_metrics(y.numpy(), predicted.numpy(), num_classes=num_classes)
    return metrics_from_confusion(confusion_counts(y, predicted, num_classes))
