"""Optimizers compared in the paper (Appendix C): LARS, LAMB and Adam, plus the schedule.

LARS and LAMB come from ``timm.optim`` (well-kept implementations). Batch-norm parameters
and biases go to a parameter group with weight decay 0 and ``always_adapt=False``, which
timm's optimizers read as "no weight decay and no trust-ratio adaptation" (SimCLR's
exclusion); every other parameter is adapted and decayed.

Learning rates (Appendix C): LARS ``0.3 x batch / 256``; LAMB
``4 / (2^(3 - (log2(batch) - 9) / 2) x 100)``; Adam ``1e-4``. Weight decay ``1e-6``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def paper_lr(name: str, batch_size: int) -> float:
    """The paper's learning rate for optimizer ``name`` at global ``batch_size``."""
    if name == "lars":
        return 0.3 * batch_size / 256
    if name == "lamb":
        return 4 / (2 ** (3 - (math.log2(batch_size) - 9) / 2) * 100)
    if name == "adam":
        return 1e-4
    raise ValueError(f"Unknown optimizer {name!r}: choose lars, lamb or adam")


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(adapted, excluded)``: excluded are normalisation-layer parameters and biases."""
    adapted, excluded = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, _NORM_TYPES) or name == "bias" or param.ndim <= 1:
                excluded.append(param)
            else:
                adapted.append(param)
    return adapted, excluded


def build_optimizer(model: nn.Module, name: str, *, lr: float, weight_decay: float = 1e-6,
                    momentum: float = 0.9, trust_coeff: float = 0.001) -> torch.optim.Optimizer:
    """LARS, LAMB or Adam over two parameter groups (adapted + decayed, excluded)."""
    adapted, excluded = split_parameters(model)
    if name == "adam":
        groups = [{"params": adapted, "weight_decay": weight_decay},
                  {"params": excluded, "weight_decay": 0.0}]
        return torch.optim.Adam(groups, lr=lr)
    groups = [{"params": adapted, "weight_decay": weight_decay, "always_adapt": True},
              {"params": excluded, "weight_decay": 0.0, "always_adapt": False}]
    if name == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=momentum, trust_coeff=trust_coeff)
    if name == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=lr)
    raise ValueError(f"Unknown optimizer {name!r}: choose lars, lamb or adam")


class WarmupCosine:
    """Learning-rate factor per step: linear warm-up, then cosine decay to zero.

    A picklable callable for ``torch.optim.lr_scheduler.LambdaLR`` (its state is saved).
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = max(0, int(warmup_steps))
        self.total_steps = max(1, int(total_steps))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up + cosine schedule (call ``.step()`` after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps))
