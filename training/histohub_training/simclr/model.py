"""The SimCLR network: a histohub encoder plus the projection head (paper section 3.1, Fig. 1).

Attribute names are part of the checkpoint format: ``backbone.*`` keys are what histohub's
``DEFAULT_KEY_MAP`` strips, ``projection_head.*`` keys are what it drops, so a training
checkpoint loads with ``histohub.load_pretrained(path)`` as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from histohub.hub import FEATURE_DIMS, build_encoder


class ProjectionHead(nn.Sequential):
    """One-hidden-layer MLP ``p(h) = W2 ReLU(W1 h)``: (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class SimCLRModel(nn.Module):
    """``forward``: images (B, 3, H, W) -> projections z (B, projection_dim).

    ``backbone`` is the encoder f_theta whose pre-activation output (B, feature_dim) is
    what histohub serves; ``projection_head`` is p_theta-hat, dropped at export.
    """

    def __init__(self, arch: str = "resnet18", *, projection_dim: int = 128,
                 hidden_dim: int | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = build_encoder(arch)  # raises ValueError naming the known archs
        self.feature_dim = FEATURE_DIMS[arch]
        self.projection_head = ProjectionHead(self.feature_dim, hidden_dim or self.feature_dim,
                                              projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(images))
