"""NT-Xent against a plain NumPy transcription of the paper's equation (1)."""

import itertools

import numpy as np
import pytest
import torch

from simclr.loss import NTXentLoss, nt_xent_loss


def numpy_nt_xent(z1: np.ndarray, z2: np.ndarray, temperature: float) -> float:
    """Eq. (1), literally: views 2k and 2k+1 of image k are positives; mean over all 2N."""
    n = len(z1)
    z = np.empty((2 * n, z1.shape[1]))
    z[0::2], z[1::2] = z1, z2

    def similarity(u, v):
        return u @ v / (np.linalg.norm(u) * np.linalg.norm(v))

    total = 0.0
    for i in range(2 * n):
        j = i + 1 if i % 2 == 0 else i - 1
        numerator = np.exp(similarity(z[i], z[j]) / temperature)
        denominator = sum(np.exp(similarity(z[i], z[k]) / temperature)
                          for k in range(2 * n) if k != i)
        total += -np.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("batch, dim, temperature",
                         list(itertools.product([2, 5, 16], [3, 32, 128], [0.05, 0.1, 0.5, 2.0])))
def test_matches_equation_1(batch, dim, temperature):
    rng = np.random.default_rng(batch * 1000 + dim)
    z1, z2 = rng.normal(size=(batch, dim)), rng.normal(size=(batch, dim))
    expected = numpy_nt_xent(z1, z2, temperature)
    got = nt_xent_loss(torch.from_numpy(z1), torch.from_numpy(z2), temperature=temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_positive_pairs_lower_the_loss_and_scale_does_not_matter():
    rng = np.random.default_rng(0)
    z1 = torch.from_numpy(rng.normal(size=(8, 16)))
    noisy = z1 + 0.05 * torch.from_numpy(rng.normal(size=(8, 16)))
    random = torch.from_numpy(rng.normal(size=(8, 16)))
    aligned = nt_xent_loss(z1, noisy, temperature=0.1)
    assert aligned < nt_xent_loss(z1, random, temperature=0.1)
    # cosine similarity: rescaling a projection changes nothing
    assert nt_xent_loss(z1 * 7.0, noisy, temperature=0.1).item() == pytest.approx(aligned.item(),
                                                                                rel=1e-5)


def test_module_and_gradients():
    z1 = torch.randn(4, 8, requires_grad=True)
    z2 = torch.randn(4, 8, requires_grad=True)
    loss = NTXentLoss(0.1)(z1, z2)
    loss.backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)
    with pytest.raises(ValueError, match="must both be"):
        nt_xent_loss(torch.randn(4, 8), torch.randn(3, 8))
