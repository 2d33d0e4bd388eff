"""Fine-tuning: every layer of the encoder trained, with a linear head on top.

Paper, section 5: "validation experiments were conducted without freezing any layers of
the network" (Table 1, D.7, Fig. 3): Adam, batch 128, weight decay 1e-5 for ResNet18 and
1e-4 otherwise, up to 100 epochs, test metric at the best validation epoch. Regression
fits scores / 100 with an L1 loss and reports L1 in 0-100 units.
"""

from __future__ import annotations

import torch
from torch import nn

from .encoders import Encoder
from .linear import SCORE_SCALE, head_objective
from .metrics import (classification_metrics, confusion_counts, metrics_from_confusion,
                      regression_metrics)
from .selection import BestEpoch, RunResult


class Normalise(nn.Module):
    """uint8 ``(B, 3, H, W)`` -> normalised float, inside the model so callers pass bytes."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal / vertical flips and 90-degree rotations of a ``(B, C, H, W)``
    batch (one draw per batch; histology has no canonical orientation)."""
    flips = torch.randint(0, 2, (2,), generator=generator).tolist()
    turns = int(torch.randint(0, 4, (1,), generator=generator))
    if flips[0]:
        x = x.flip(-1)
    if flips[1]:
        x = x.flip(-2)
    return torch.rot90(x, turns, dims=(-2, -1)) if turns else x


def finetune(encoder: Encoder, train: tuple[torch.Tensor, torch.Tensor],
             val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             *, objective: str, num_classes: int = 0, weight_decay: float, epochs: int = 100,
             batch_size: int = 128, lr: float = 1e-3, seed: int = 0, device: str = "cpu",
             augment: bool = False, eval_batch_size: int = 64) -> RunResult:
    """Train encoder + linear head on ``(uint8 images (N, 3, S, S), targets (N,))`` pairs."""
    regression = objective == "regression"
    torch.manual_seed(seed)  # the head's initialisation
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(encoder.feature_dim, 1 if regression else num_classes)
    model = nn.Sequential(Normalise(encoder.preprocessing.mean, encoder.preprocessing.std),
                          encoder.build(), head).to(device).to(memory_format=torch.channels_last)
    images, targets = train
    target, loss_fn = head_objective(head, targets, regression=regression)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    tracker = BestEpoch(objective)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for batch in _batches(order, batch_size):
            x = images[batch].to(device)
            if augment:
                x = augment_batch(x, generator)
            output = model(x)
            loss = loss_fn(output.squeeze(1) if regression else output, target[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        tracker.update(epoch, evaluate(model, *val, regression=regression, num_classes=num_classes,
                                       device=device, batch_size=eval_batch_size), model)
    model.load_state_dict(tracker.state)
    test_metrics = evaluate(model, *test, regression=regression, num_classes=num_classes,
                            device=device, batch_size=eval_batch_size, full=True)
    return RunResult(tracker.epoch, epochs, tracker.val, test_metrics, tracker.history)


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Mini-batches of ``order``; a last batch of one joins the previous (BatchNorm needs 2)."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    return batches


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, *, device: str = "cpu",
            batch_size: int = 64) -> torch.Tensor:
    """Eval-mode outputs ``(N, K)`` of ``model`` over uint8 ``(N, 3, S, S)`` images."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


def evaluate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, regression: bool,
             num_classes: int, device: str = "cpu", batch_size: int = 64,
             full: bool = False) -> dict:
    """Metrics of ``model`` on one part of the split (``full``: per-class F1 via sklearn)."""
    output = predict(model, images, device=device, batch_size=batch_size)
    if regression:
        return regression_metrics(targets.numpy(), (output.squeeze(1) * SCORE_SCALE).numpy())
    predicted = output.argmax(dim=1)
    if full:
        return classification_metrics(targets.numpy(), predicted.numpy(), num_classes=num_classes)
    return metrics_from_confusion(confusion_counts(targets, predicted, num_classes))
