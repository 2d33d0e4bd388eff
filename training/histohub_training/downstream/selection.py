"""Model selection shared by every protocol: test metrics at the best validation epoch.

Paper, section 4.2: "The test metrics corresponding to the maximum validation metrics are
reported": macro F1 for classification and segmentation (higher is better), L1 for
regression (lower is better). Ties keep the earlier epoch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

PRIMARY = {"classification": ("macro_f1", True), "segmentation": ("macro_f1", True),
           "regression": ("l1", False)}


@dataclass
class RunResult:
    """One training run: the best validation epoch and the metrics there."""

    best_epoch: int
    epochs: int
    val: dict
    test: dict
    history: list[float] = field(default_factory=list)   # validation metric per epoch

    def to_json(self) -> dict:
        return {"best_epoch": self.best_epoch, "epochs": self.epochs, "val": self.val,
                "test": self.test, "val_history": self.history}


class BestEpoch:
    """Tracks the best validation metric and keeps a copy of the weights there."""

    def __init__(self, objective: str) -> None:
        self.metric, self.higher = PRIMARY[objective]
        self.best: float | None = None
        self.epoch = -1
        self.val: dict = {}
        self.state: dict | None = None
        self.history: list[float] = []

    def update(self, epoch: int, val: dict, model: nn.Module | None = None) -> bool:
        """Record epoch ``epoch``'s validation metrics; True when it is the best so far."""
        value = val[self.metric]
        self.history.append(value)
        better = (self.best is None or (value > self.best if self.higher else value < self.best))
        if better:
            self.best, self.epoch, self.val = value, epoch, val
            if model is not None:
                self.state = copy.deepcopy(model.state_dict())
        return better
