"""LARS / LAMB exclusions (BN and bias: no weight decay, no trust ratio), the paper's
learning rates and the warm-up + cosine schedule."""

import math

import pytest
import torch
from torch import nn

from histohub_training.simclr.optim import (WarmupCosine, build_optimizer, build_scheduler,
                                            paper_lr, split_parameters)

LR, WD, TRUST = 0.5, 0.1, 0.001


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _step(model: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One optimizer step on a fixed batch: {name: (weight before, update)}, grads kept."""
    optimizer = build_optimizer(model, name, lr=LR, weight_decay=WD, momentum=0.9,
                                trust_coeff=TRUST)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    model(x).square().sum().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    return {n: (before[n], p.detach() - before[n]) for n, p in model.named_parameters()}


EXCLUDED = {"0.bias", "1.weight", "1.bias", "5.bias"}


def test_split_puts_batchnorm_and_biases_aside():
    model = _model()
    adapted, excluded = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in excluded} == EXCLUDED
    assert {names[id(p)] for p in adapted} == {"0.weight", "5.weight"}


def test_lars_adapts_and_decays_only_weights():
    model = _model()
    updates = _step(model, "lars")
    for name, param in model.named_parameters():
        weight, update = updates[name]
        grad = param.grad
        if name in EXCLUDED:  # plain SGD step: no decay, no trust ratio
            expected = -LR * grad
        else:
            w_norm, g_norm = weight.norm(), grad.norm()
            trust = TRUST * w_norm / (g_norm + WD * w_norm + 1e-8)
            expected = -LR * trust * (grad + WD * weight)
        torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-7, msg=name)


def test_lamb_adapts_and_decays_only_weights():
    model = _model()
    updates = _step(model, "lamb")
    # timm's Lamb first clips the global gradient norm to 1 (as NVIDIA's FusedLAMB)
    clip = max(1.0, torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
    for name, param in model.named_parameters():
        weight, update = updates[name]
        grad = param.grad / clip
        direction = grad / (grad.abs() + 1e-6)  # Adam's first step: m / sqrt(v)
        if name in EXCLUDED:  # no decay, no trust ratio: an Adam step of size lr
            torch.testing.assert_close(update, -LR * direction, rtol=1e-3, atol=1e-6, msg=name)
        else:  # layer-wise trust ratio: the update's norm is lr x the weight's norm
            step = direction + WD * weight
            torch.testing.assert_close(update, -LR * weight.norm() / step.norm() * step,
                                       rtol=1e-3, atol=1e-6, msg=name)


def test_adam_decays_only_weights():
    model = _model()
    optimizer = build_optimizer(model, "adam", lr=1e-4, weight_decay=1e-6)
    groups = {len(g["params"]): g["weight_decay"] for g in optimizer.param_groups}
    assert groups == {2: 1e-6, 4: 0.0}


def test_paper_learning_rates():
    assert paper_lr("lars", 512) == pytest.approx(0.6)
    assert paper_lr("lars", 256) == pytest.approx(0.3)
    assert paper_lr("lamb", 512) == pytest.approx(4 / (8 * 100))
    assert paper_lr("lamb", 256) == pytest.approx(4 / (2 ** 3.5 * 100))
    assert paper_lr("lamb", 128) == pytest.approx(4 / (2 ** 4 * 100))
    assert paper_lr("adam", 512) == 1e-4
    with pytest.raises(ValueError, match="lars, lamb or adam"):
        paper_lr("sgd", 256)


def test_warmup_then_cosine_to_zero():
    factor = WarmupCosine(warmup_steps=4, total_steps=14)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(14) == pytest.approx(0.0)
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, "adam", lr=1.0)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:3] == [0.5, 1.0, 1.0] and seen[-1] < 0.05
    assert optimizer.param_groups[0]["lr"] == optimizer.param_groups[1]["lr"]
