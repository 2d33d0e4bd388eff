"""NT-Xent against a plain NumPy transcription of the paper's equation (1), and under DDP:
two gloo processes with batch B give the loss and gradients of one process with 2 x B."""

import itertools

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from histohub_training.simclr.loss import NTXentLoss, nt_xent_loss


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


# --------------------------------------------------------------------------- DDP

BATCH, DIM, WORLD = 6, 12, 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, 8)).double()


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x1 = torch.randn(WORLD * BATCH, DIM, generator=generator, dtype=torch.float64)
    return x1, x1 + 0.3 * torch.randn(x1.shape, generator=generator, dtype=torch.float64)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}",
                                         rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        x1, x2 = (x[rank * BATCH:(rank + 1) * BATCH] for x in _global_batch())
        z1, z2 = model(x1), model(x2)
        with torch.no_grad():  # the negative control: negatives from this process only
            local = nt_xent_loss(z1, z2, temperature=0.1, gather=False)
        loss = nt_xent_loss(z1, z2, temperature=0.1)
        loss.backward()
        torch.save({"loss": loss.detach(), "local": local, "grads": _grads(model.module)},
                   f"{out}.{rank}")
        # both ranks done before either tears gloo down: without it, a rank could destroy
        # the group while the other's gloo thread still talked to it ("terminate called
        # without an active exception", SIGABRT; seen once in CI). train.py ends likewise.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _run_two_processes(tmp_path) -> list[dict]:
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(WORLD)]


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    model = _model()
    x1, x2 = _global_batch()
    single = nt_xent_loss(model(x1), model(x2), temperature=0.1)
    single.backward()
    expected = _grads(model)

    results = _run_two_processes(tmp_path)
    mean_loss = sum(r["loss"] for r in results) / WORLD  # what the trainer logs
    assert mean_loss.item() == pytest.approx(single.item(), rel=1e-6)
    for result in results:  # DDP averaged: every rank holds the global batch's gradient
        for got, want in zip(result["grads"], expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    # Without gathering, each process sees only its own negatives: a different loss.
    local = sum(r["local"] for r in results) / WORLD
    assert local.item() != pytest.approx(single.item(), rel=1e-3)
