#!/usr/bin/env python
"""SimCLR training throughput: histohub's training/ against lightly, in the same run.

Run from the repository root with ``training/`` on the import path (as the tests have it):

    export PYTHONPATH=training
    python training/benchmarks/bench_train.py                 # 64 and 96 px, batch 32, CPU
    python training/benchmarks/bench_train.py --sizes 224 --steps 3
    python training/benchmarks/bench_train.py --gpu-only      # ResNet18, 224 px, 512, bf16

Both arms train the same thing: torchvision ResNet18 + a 512-512-128 MLP head (no BN),
NT-Xent at temperature 0.1, LARS, the same source images, batch and resolution, with
augmentation in the training process (no DataLoader workers: on 2 cores they take CPU
from the model). lightly's arm is its documented SimCLR recipe: ``SimCLRTransform`` per
PIL image (set to the paper's augmentations as far as it can express them), two forward
passes, ``NTXentLoss``, lightly's ``LARS``. Ours: ``BatchAugment`` on the uint8 batch, one
channels_last forward over both views, ``nt_xent_loss``, timm's ``Lars``.

Rounds interleave A, B, A, B; the ratio reported is the median of per-round ratios. A
matrix-multiply probe before and after tells whether the machine was in a slow spell, and
sets the ceiling: the step's FLOPs (forward and backward of both views, counted by
``torch.utils.flop_counter``) at the probe's rate. A data-path section compares reading
the pool file by file (decode + resize every step) with the decoded uint8 cache that
``run_pretrain.py`` uses (``simclr.cache``).
lightly parts are skipped with a message where lightly is not installed
(``pip install --no-deps lightly lightning-utilities``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from _matmul import matmul_gflops
from histohub_training.simclr.augment import BatchAugment
from histohub_training.simclr.loss import nt_xent_loss
from histohub_training.simclr.model import SimCLRModel
from histohub_training.simclr.optim import build_optimizer

KATHER = Path(__file__).resolve().parents[3] / "shared" / "data" / "kather2016-tiles"


def have_lightly() -> bool:
    try:
        import lightly.loss  # noqa: F401
        import lightly.transforms  # noqa: F401
    except ImportError as error:
        print(f"lightly is not importable ({error}): lightly comparisons skipped. "
              "Install with: pip install --no-deps lightly lightning-utilities")
        return False
    return True


def source_images(count: int, size: int) -> torch.Tensor:
    """uint8 (count, 3, size, size): Kather 2016 tiles when present, else textured noise."""
    from PIL import Image

    if KATHER.is_dir():
        paths = sorted(KATHER.rglob("*.tif"))[:count]
        arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size),
                                                               Image.Resampling.BILINEAR))
                  for p in paths]
        print(f"images: {len(arrays)} Kather 2016 tiles resized to {size} px")
    else:
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
        print(f"images: {count} random {size} px images ({KATHER} absent)")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def paper_augment(size: int) -> BatchAugment:
    return BatchAugment(size, crop_min_area=0.01, jitter="medium")


def lightly_transform(size: int):
    from lightly.transforms import SimCLRTransform

    # The paper's augmentations as far as SimCLRTransform expresses them: its rotation is a
    # single 90-degree turn with probability rr_prob (no 0/90/180/270 choice).
    return SimCLRTransform(input_size=size, cj_prob=0.8, cj_strength=1.0, cj_bright=0.8,
                           cj_contrast=0.8, cj_sat=0.8, cj_hue=0.2, min_scale=0.01,
                           random_gray_scale=0.0, gaussian_blur=0.5, sigmas=(0.1, 2.0),
                           vf_prob=0.5, hf_prob=0.5, rr_prob=0.5,
                           normalize={"mean": [0.5] * 3, "std": [0.5] * 3})


class Ours:
    """histohub training/: batched augmentation, one channels_last forward, timm LARS."""

    name = "histohub"

    def __init__(self, images: torch.Tensor, batch: int, *, device: str = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.batch = batch
        self.dtype = dtype
        self.model = SimCLRModel("resnet18", projection_dim=128).to(
            self.device, memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, "lars", lr=0.3 * batch / 256)
        self.augment = paper_augment(images.shape[-1])
        self.generator = torch.Generator().manual_seed(0)

    def step(self, index: torch.Tensor) -> float:
        view1, view2 = self.augment.two_views(self.images[index.to(self.device)],
                                              self.generator)
        x = ((torch.cat([view1, view2]) - 0.5) / 0.5).contiguous(
            memory_format=torch.channels_last)
        if self.dtype is not None:
            with torch.autocast(self.device.type, dtype=self.dtype):
                z = self.model(x)
        else:
            z = self.model(x)
        loss = nt_xent_loss(*z.float().chunk(2), temperature=0.1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


class Lightly:
    """lightly's documented SimCLR: SimCLRTransform per PIL image, two forwards, its LARS."""

    name = "lightly"

    def __init__(self, images: torch.Tensor, batch: int) -> None:
        import torchvision
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
        from lightly.utils.lars import LARS
        from PIL import Image

        torch.manual_seed(0)
        self.pil = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in images]
        backbone = torchvision.models.resnet18()
        backbone.fc = nn.Identity()
        self.model = nn.Sequential(backbone, SimCLRProjectionHead(512, 512, 128,
                                                                  batch_norm=False))
        self.criterion = NTXentLoss(temperature=0.1)
        self.optimizer = LARS(self.model.parameters(), lr=0.3 * batch / 256, momentum=0.9,
                              weight_decay=1e-6)
        self.transform = lightly_transform(images.shape[-1])

    def step(self, index: torch.Tensor) -> float:
        views = [self.transform(self.pil[i]) for i in index.tolist()]
        x0 = torch.stack([v[0] for v in views])
        x1 = torch.stack([v[1] for v in views])
        loss = self.criterion(self.model(x0), self.model(x1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def timed_steps(arm, batches: list[torch.Tensor], *, sync: bool = False) -> float:
    """Source images per second over ``batches``."""
    start = time.perf_counter()
    for index in batches:
        arm.step(index)
    if sync:
        torch.cuda.synchronize()
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def interleaved(arms: list, images: torch.Tensor, *, batch: int, steps: int, rounds: int
                ) -> dict[str, list[float]]:
    generator = torch.Generator().manual_seed(1)

    def batches() -> list[torch.Tensor]:
        return [torch.randint(0, len(images), (batch,), generator=generator)
                for _ in range(steps)]

    for arm in arms:  # warm-up: allocator, first-call costs
        arm.step(batches()[0])
    rates: dict[str, list[float]] = {arm.name: [] for arm in arms}
    for r in range(rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            rates[arm.name].append(timed_steps(arm, batches()))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()),
              flush=True)
    return rates


def step_gflop(size: int) -> float:
    """GFLOP of one training step per source image: forward + backward of two views."""
    from torch.utils.flop_counter import FlopCounterMode

    model = SimCLRModel("resnet18", projection_dim=128)
    x = torch.rand(4, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 4 * 2 / 1e9


def bench_training(images: torch.Tensor, args, lightly: bool, probe: float) -> None:
    size = images.shape[-1]
    print(f"\n== training step, ResNet18, {size} px, batch {args.batch} "
          f"(x2 views), {torch.get_num_threads()} threads ==")
    arms = [Ours(images, args.batch)] + ([Lightly(images, args.batch)] if lightly else [])
    rates = interleaved(arms, images, batch=args.batch, steps=args.steps, rounds=args.rounds)
    ours = statistics.median(rates["histohub"])
    print(f"histohub: {ours:.1f} source images/s (median of {args.rounds} rounds)")
    gflop = step_gflop(size)
    ceiling = probe / gflop
    print(f"ceiling: {gflop:.2f} GFLOP per source image at the probe's {probe:.0f} GFLOP/s = "
          f"{ceiling:.1f} images/s; histohub reaches {ours / ceiling:.2f}x of it")
    if lightly:
        ratios = [a / b for a, b in zip(rates["histohub"], rates["lightly"])]
        print(f"lightly:  {statistics.median(rates['lightly']):.1f} source images/s")
        print(f"ratio histohub / lightly: {statistics.median(ratios):.2f}x "
              f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")


def bench_augment(args, lightly: bool) -> None:
    for size in args.augment_sizes:
        images = source_images(args.batch, size)
        augment = paper_augment(size)
        generator = torch.Generator().manual_seed(0)
        ours, theirs = [], []
        if lightly:
            from PIL import Image

            transform = lightly_transform(size)
            pil = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in images]
        augment.two_views(images, generator)
        for _ in range(args.rounds):
            start = time.perf_counter()
            augment.two_views(images, generator)
            ours.append(len(images) / (time.perf_counter() - start))
            if lightly:
                start = time.perf_counter()
                [transform(p) for p in pil]
                theirs.append(len(images) / (time.perf_counter() - start))
        line = (f"augmentation, two views, {size} px, batch {len(images)}: histohub "
                f"{statistics.median(ours):.0f} images/s")
        if lightly:
            ratio = statistics.median(a / b for a, b in zip(ours, theirs))
            line += (f", lightly SimCLRTransform {statistics.median(theirs):.0f} images/s, "
                     f"ratio {ratio:.2f}x")
        print(line, flush=True)


def bench_data_path(args) -> None:
    """Pool images/s out of the loader: files decoded every step vs the uint8 cache."""
    import tempfile

    from histohub_training.simclr.cache import CachedPool, load_or_build_cache
    from histohub_training.simclr.data import (Collate, EpochBatchSampler, PoolDataset, build_pool,
                                               parse_datasets)

    if not KATHER.is_dir():
        print(f"\n{KATHER} absent: data-path comparison skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        pool = build_pool(parse_datasets([str(KATHER)]), patch_size=96)
        pool.save(Path(tmp) / "pool.json")
        cached = CachedPool(load_or_build_cache(pool, Path(tmp) / "pool.json", 96,
                                                progress=False)[0])
        files = PoolDataset(pool.items, 96)
        augment = BatchAugment(64, crop_min_area=0.08, jitter="light")
        rates: dict[str, list[float]] = {"files": [], "cache": []}
        for r in range(args.rounds):
            for name, dataset in (("files", files), ("cache", cached))[:: 1 if r % 2 else -1]:
                loader = torch.utils.data.DataLoader(
                    dataset, batch_sampler=EpochBatchSampler(len(pool), args.batch, seed=r),
                    collate_fn=Collate(augment))
                start, count = time.perf_counter(), 0
                for (view1, _), _, _ in loader:
                    count += len(view1)
                rates[name].append(count / (time.perf_counter() - start))
    ratio = statistics.median(c / f for c, f in zip(rates["cache"], rates["files"]))
    print(f"\ndata path (Kather tiles stored at 96 px, two 64 px views, in the training "
          f"process): files {statistics.median(rates['files']):.0f} images/s, cache "
          f"{statistics.median(rates['cache']):.0f} images/s, ratio {ratio:.2f}x")


def bench_gpu(args) -> None:
    if not torch.cuda.is_available():
        print("\nno GPU: the ResNet18 / 224 px / batch 512 / bf16 measurement is skipped")
        return
    images = source_images(1024, 224)
    arm = Ours(images, 512, device="cuda", dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, len(images), (512,), generator=generator) for _ in range(13)]
    for index in batches[:3]:
        arm.step(index)
    torch.cuda.synchronize()
    rate = timed_steps(arm, batches[3:], sync=True)
    print(f"\nGPU {torch.cuda.get_device_name()}: ResNet18, 224 px, batch 512, bf16, "
          f"augmentation on the GPU: {rate:.0f} source images/s (paper: about 5,800 images/s "
          "on four P100s, i.e. 500k images x 1000 epochs in 24 h)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 96],
                        help="training resolutions (px)")
    parser.add_argument("--batch", type=int, default=32, help="source images per step")
    parser.add_argument("--steps", type=int, default=4, help="steps per arm per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--augment-sizes", type=int, nargs="*", default=[224, 96])
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--gpu-only", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_only:
        bench_gpu(args)
        return 0
    lightly = have_lightly()
    probe = matmul_gflops()
    print(f"matmul probe before: {probe:.0f} GFLOP/s (about 170 when the machine is idle)")
    bench_augment(args, lightly)
    bench_data_path(args)
    if not args.skip_training:
        for size in args.sizes:
            bench_training(source_images(256, size), args, lightly, matmul_gflops())
    print(f"matmul probe after: {matmul_gflops():.0f} GFLOP/s")
    bench_gpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
