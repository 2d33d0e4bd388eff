"""Two gloo processes with batch B give the loss and gradients of one process with 2 x B."""


import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from simclr.loss import nt_xent_loss

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
