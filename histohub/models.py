"""Architectures: torchvision ResNets as headless encoders.

The encoder returns the paper's "pre-activation layer output" (section 3.1): the pooled
features before the classifier, so ``fc`` is replaced by ``nn.Identity``.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def build_encoder(arch: str) -> nn.Module:
    """A randomly initialised ResNet encoder: ``(B, 3, H, W) -> (B, FEATURE_DIMS[arch])``."""
    import torchvision

    if arch not in FEATURE_DIMS:
        raise ValueError(f"Unknown architecture {arch!r}; choose one of {sorted(FEATURE_DIMS)}")
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    return model


def backbone_keys(arch: str) -> set[str]:
    """The ``state_dict`` keys an encoder of ``arch`` must be given (buffers included)."""
    with torch.device("meta"):
        return set(build_encoder(arch).state_dict())
