"""Architectures: torchvision ResNets as headless encoders.

The encoder returns the paper's "pre-activation layer output" (Ciga et al. 2022, section
3.1): the pooled features before the classifier, so ``fc`` is replaced by ``nn.Identity``.

``FEATURE_DIMS`` is the one list of architectures histohub knows (the manifest validates
``arch`` against it). torch and torchvision are imported when an encoder is built, so
reading the list costs nothing.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Architecture name -> feature dimension of its encoder.
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def build_encoder(arch: str) -> nn.Module:
    """A randomly initialised ResNet encoder: ``(B, 3, H, W) -> (B, FEATURE_DIMS[arch])``."""
    import torchvision
    from torch import nn

    if arch not in FEATURE_DIMS:
        raise ValueError(f"Unknown architecture {arch!r}; choose one of {sorted(FEATURE_DIMS)}")
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    return model


def encoder_shapes(arch: str) -> dict[str, torch.Size]:
    """``{key: shape}`` of an ``arch`` encoder's ``state_dict`` (buffers included), built on
    the meta device (no memory, no random initialisation) once per architecture."""
    return dict(_encoder_shapes(arch))


@functools.lru_cache(maxsize=None)
def _encoder_shapes(arch: str) -> tuple[tuple[str, torch.Size], ...]:
    import torch

    with torch.device("meta"):
        return tuple((key, value.shape) for key, value in build_encoder(arch).state_dict().items())
