"""NT-Xent, the normalised temperature-scaled cross-entropy (paper section 3.1, eq. 1).

With several processes the negatives come from the global batch: the projections of every
process are all-gathered with ``torch.distributed.nn.functional.all_gather``, whose
backward pass sends each process the gradients its projections received elsewhere. Each
process averages the loss over its own 2B rows; DDP's gradient averaging then yields the
gradient of the mean over all 2NB rows, i.e. exactly the one-process loss on the
concatenated batch.

- [0] Chen, Kornblith, Norouzi, Hinton. SimCLR, 2020, arXiv:2002.05709.
- [1] Ciga, Xu, Martel. Self supervised contrastive learning for digital histopathology, 2022.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _gather(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' ``z`` concatenated in rank order, and this process's rank.

    Shape: (B, D) -> (world_size * B, D). Gradients flow back to every process.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z), dim=0), dist.get_rank()


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float = 0.1,
                 gather: bool = True) -> torch.Tensor:
    """Mean NT-Xent over this process's 2B views (eq. 1), negatives from the global batch.

    Shape: ``z1``, ``z2``: (B, D), the projections of two views of the same B images
    (row i of ``z1`` and row i of ``z2`` are positives). Returns a scalar (float32).
    Similarity is cosine similarity; the denominator sums over all 2N - 1 other views.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (B, D); got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    batch = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    a, b = local[:batch], local[batch:]
    if gather:
        a_all, rank = _gather(a)
        b_all, _ = _gather(b)
    else:
        a_all, b_all, rank = a, b, 0
    total = a_all.shape[0]  # N: the global batch
    every = torch.cat([a_all, b_all])  # (2N, D): first views, then second views
    logits = local @ every.T / temperature  # (2B, 2N)
    own = torch.arange(batch, device=z1.device) + rank * batch  # row positions in a_all
    self_index = torch.cat([own, own + total])
    positive = torch.cat([own + total, own])
    rows = torch.arange(2 * batch, device=z1.device)
    logits[rows, self_index] = float("-inf")  # the indicator 1[k != i]
    return F.cross_entropy(logits, positive)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent_loss`; ``forward(z1, z2)`` with (B, D) inputs."""

    def __init__(self, temperature: float = 0.1, *, gather: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.gather = gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent_loss(z1, z2, temperature=self.temperature, gather=self.gather)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather={self.gather}"
