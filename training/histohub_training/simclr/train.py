"""The SimCLR pretraining loop, from one CPU to many GPUs (``torchrun``).

One process per device. Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes join a
process group (NCCL on GPUs, gloo on CPUs) and the model is wrapped in
DistributedDataParallel; the loss draws its negatives from the global batch
(``simclr.loss``). Options: SyncBatchNorm (GPUs), bf16 / fp16 autocast (fp16 with a
gradient scaler), channels_last, ``torch.compile``.

Run folder (``out``): ``config.json``, ``pool.json`` (the images), ``log.csv`` (+
``tensorboard/``), ``checkpoint.pt`` (written atomically every ``checkpoint_every``
epochs and at the end), ``skipped.txt`` (unreadable images). ``resume=True`` restores the
model, optimizer, scheduler, scaler, epoch and every process's RNG states from
``checkpoint.pt``; the data order and augmentations are functions of (seed, epoch, step),
so the resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import histohub

from .augment import BatchAugment
from .cache import CachedPool, load_or_build_cache
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import PretrainConfig, config_from_dict, to_dict
from .data import Collate, EpochBatchSampler, Pool, PoolDataset, build_pool, parse_datasets
from .determinism import environment, loader_generator, reproducible, seed_worker
from .logger import RunLogger
from .loss import nt_xent_loss
from .model import SimCLRModel
from .optim import build_optimizer, build_scheduler, paper_lr

log = logging.getLogger("simclr")

#: Keys that may change when resuming (they do not change what is computed).
RESUMABLE_OVERRIDES = ("checkpoint_every", "log_every", "data.num_workers", "compile",
                       "epochs")


@dataclass(frozen=True)
class Distributed:
    """Where this process runs: rank among ``world_size`` processes, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Distributed:
    """Join the process group when launched by ``torchrun`` (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no GPU is visible; use device=auto or cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank, world_size, local_rank, target)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32). ``auto``: bf16 on GPUs that have it, else fp32."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision=fp16 needs a GPU; on the CPU use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Trainer:
    """Builds everything a run needs from a config and trains it; see :func:`train`."""

    def __init__(self, config: PretrainConfig, out: str | os.PathLike, *, resume: bool = False,
                 progress: bool = True,
                 on_step: Callable[[int, int, float], None] | None = None) -> None:
        self.config = config
        self.out = Path(out)
        self.progress = progress
        self.on_step = on_step
        self.dist = setup_distributed(config.device)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.out / "checkpoint.pt"
        if not resume and self.checkpoint_path.exists():
            raise FileExistsError(f"{self.out} already holds a run (checkpoint.pt): pass "
                                  "--resume to continue it, or choose another --out")
        self.state = load_checkpoint(self.checkpoint_path) if resume else None
        seed_everything(config.seed + self.dist.rank)
        self.environment = environment(torch.get_num_threads())
        if self.dist.device.type == "cpu":
            histohub.hub.tune_allocator()
        self.stored_size = config.data.cache_size or config.image_size
        self.skipped: dict[str, str] = {}
        self.pool = self._pool()
        self._build_model()
        self._build_data()
        self._build_optimizer()
        self.start_epoch, self.global_step = 0, 0
        if self.state is not None:
            self._restore(self.state)

    # -- building ------------------------------------------------------------------------

    def _pool(self) -> Pool:
        """The run's images: drawn once by rank 0 into pool.json, read by every process."""
        path = self.out / "pool.json"
        if self.dist.is_main and not (self.state is not None and path.is_file()):
            data = self.config.data
            specs = parse_datasets(data.datasets, patches_per_slide=data.patches_per_slide,
                                   mpp=data.slide_mpp, min_foreground=data.min_foreground)
            pool = build_pool(specs, patch_size=self.stored_size, percent=data.percent,
                              min_per_dataset=data.min_per_dataset,
                              max_per_dataset=data.max_per_dataset, seed=self.config.seed,
                              progress=self.progress)
            pool.save(path)
            (self.out / "config.json").write_text(json.dumps(to_dict(self.config), indent=2))
            log.info(pool.describe())
            for slide, reason in pool.skipped:
                log.warning("skipped slide %s: %s", slide, reason)
        self._barrier()
        return Pool.load(path)

    def _build_model(self) -> None:
        cfg, device = self.config, self.dist.device
        model = SimCLRModel(cfg.model.arch, projection_dim=cfg.model.projection_dim,
                            hidden_dim=cfg.model.projection_hidden_dim)
        if cfg.sync_bn and self.dist.world_size > 1:
            if device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                warnings.warn("sync_bn needs GPUs (NCCL); each CPU process keeps its own "
                              "BatchNorm statistics", stacklevel=2)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=memory_format)
        self.memory_format = memory_format
        wrapped: nn.Module = self.model
        if self.dist.world_size > 1:
            wrapped = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.step_model = torch.compile(wrapped) if cfg.compile else wrapped
        self.autocast_dtype = resolve_precision(cfg.precision, device)
        use_scaler = self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    def _build_data(self) -> None:
        cfg, dist = self.config, self.dist
        if cfg.batch_size % dist.world_size:
            raise ValueError(f"batch_size={cfg.batch_size} (the global batch) must be divisible "
                             f"by the {dist.world_size} processes")
        self.local_batch = cfg.batch_size // dist.world_size
        self.augment = BatchAugment.from_config(cfg.augment, cfg.image_size)
        where = cfg.augment.on
        if where == "auto":
            where = "device" if dist.device.type == "cuda" else "loader"
        self.augment_on_device = where == "device"
        self.sampler = EpochBatchSampler(len(self.pool), self.local_batch,
                                         world_size=dist.world_size, rank=dist.rank,
                                         seed=cfg.seed)
        workers = cfg.data.num_workers
        self.loader = torch.utils.data.DataLoader(
            self._dataset(), batch_sampler=self.sampler,
            collate_fn=Collate(None if self.augment_on_device else self.augment),
            num_workers=workers, pin_memory=dist.device.type == "cuda",
            persistent_workers=workers > 0, worker_init_fn=seed_worker,
            generator=loader_generator(cfg.seed, dist.rank))
        mean = torch.tensor(cfg.data.mean, device=dist.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.data.std, device=dist.device).view(1, 3, 1, 1)
        self.mean, self.std = mean, std

    def _dataset(self) -> torch.utils.data.Dataset:
        """The pool decoded once into memory (``data.cache``), else read file by file."""
        if not self.config.data.cache:
            return PoolDataset(self.pool.items, self.stored_size)
        if self.dist.is_main:   # rank 0 builds the cache; the others map the same file
            images, skipped = load_or_build_cache(self.pool, self.out / "pool.json",
                                                  self.stored_size, progress=self.progress)
            self.skipped.update(skipped)
        self._barrier()
        if not self.dist.is_main:
            images, _ = load_or_build_cache(self.pool, self.out / "pool.json",
                                            self.stored_size, progress=False)
        return CachedPool(images)

    def _build_optimizer(self) -> None:
        cfg = self.config
        lr = cfg.optim.lr if cfg.optim.lr is not None else paper_lr(cfg.optim.name,
                                                                    cfg.batch_size)
        self.base_lr = lr
        self.optimizer = build_optimizer(self.model, cfg.optim.name, lr=lr,
                                         weight_decay=cfg.optim.weight_decay,
                                         momentum=cfg.optim.momentum,
                                         trust_coeff=cfg.optim.trust_coeff)
        steps = len(self.sampler)
        self.scheduler = build_scheduler(
            self.optimizer, warmup_steps=round(cfg.optim.warmup_epochs * steps),
            total_steps=cfg.epochs * steps)

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the schedule's length follows the (possibly extended) epochs of this config
        self.scheduler.lr_lambdas[0].total_steps = self.config.epochs * len(self.sampler)
        self.scheduler.lr_lambdas[1].total_steps = self.config.epochs * len(self.sampler)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.global_step = state["epoch"], state["global_step"]
        states = state["rng"]
        if len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank])
        else:
            warnings.warn(f"checkpoint written by {len(states)} processes, resuming with "
                          f"{self.dist.world_size}: random states re-seeded", stacklevel=2)

    # -- training ------------------------------------------------------------------------

    def fit(self) -> list[float]:
        """Train from ``start_epoch`` to ``config.epochs``; returns this process's step losses."""
        cfg, dist = self.config, self.dist
        logger = RunLogger(self.out, resume_step=self.global_step) if dist.is_main else None
        losses: list[float] = []
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                losses.extend(self._epoch(epoch, logger))
                done = epoch + 1
                if done % cfg.checkpoint_every == 0 or done == cfg.epochs:
                    self._save(done)
        finally:
            if logger is not None:
                logger.close()
            self._report_skipped()
        return losses

    def _epoch(self, epoch: int, logger: RunLogger | None) -> list[float]:
        from tqdm.auto import tqdm

        cfg, dist = self.config, self.dist
        self.sampler.set_epoch(epoch)
        self.model.train()
        bar = tqdm(total=len(self.sampler), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="step", disable=not (self.progress and dist.is_main), leave=False)
        losses, window, tick = [], [], time.perf_counter()
        start = tick
        for step, (batch, seed, failures) in enumerate(self.loader):
            for item, reason in failures:
                self.skipped.setdefault(item, reason)
            loss = self._step(batch, seed)
            self.global_step += 1
            window.append(loss.detach())
            if self.on_step is not None:
                self.on_step(epoch, step, loss.item())
            bar.update(1)
            if len(window) == cfg.log_every or step == len(self.sampler) - 1:
                value = self._mean_loss(window)
                losses.extend(float(v) for v in torch.stack(window).cpu())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"loss became {value} at epoch {epoch + 1}, step {self.global_step}: "
                        "lower the learning rate, use bf16 instead of fp16, or check the data")
                if dist.device.type == "cuda":
                    torch.cuda.synchronize(dist.device)
                now = time.perf_counter()
                rate = len(window) * cfg.batch_size / (now - tick)
                lr = self.optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.1f}")
                if logger is not None:
                    logger.write(epoch=epoch + 1, step=self.global_step, loss=value, lr=lr,
                                 images_per_s=rate, elapsed_s=now - start)
                window, tick = [], now
        bar.close()
        return losses

    def _step(self, batch, seed: int) -> torch.Tensor:
        device = self.dist.device
        if self.augment_on_device:
            images = batch.to(device, non_blocking=True)
            view1, view2 = self.augment.two_views(images, torch.Generator().manual_seed(seed))
        else:
            view1, view2 = (v.to(device, non_blocking=True) for v in batch)
        views = ((torch.cat([view1, view2]) - self.mean) / self.std).contiguous(
            memory_format=self.memory_format)
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            z = self.step_model(views)
        z1, z2 = z.float().chunk(2)
        loss = nt_xent_loss(z1, z2, temperature=self.config.optim.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss

    def _mean_loss(self, window: list[torch.Tensor]) -> float:
        """Mean loss of the window over every process (the global batch's loss)."""
        value = torch.stack(window).mean()
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(value)
            value = value / self.dist.world_size
        return float(value)

    def _save(self, epoch: int) -> None:
        states = [rng_state()]
        if self.dist.world_size > 1:
            states = [None] * self.dist.world_size
            torch.distributed.all_gather_object(states, rng_state())
        if self.dist.is_main:
            save_checkpoint(self.checkpoint_path, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epoch, "global_step": self.global_step, "rng": states,
                "config": to_dict(self.config), "arch": self.config.model.arch,
                "pool_summary": self.pool.summary, "world_size": self.dist.world_size,
                "environment": self.environment})
        self._barrier()

    def _report_skipped(self) -> None:
        if not self.skipped:
            return
        path = self.out / (f"skipped.rank{self.dist.rank}.txt" if self.dist.world_size > 1
                           else "skipped.txt")
        path.write_text("".join(f"{item}\t{reason}\n" for item, reason in self.skipped.items()))
        first = next(iter(self.skipped.items()))
        log.warning("%d unreadable image(s) were skipped (replaced by the next readable one); "
                    "listed in %s. First: %s (%s)", len(self.skipped), path, *first)

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            torch.distributed.barrier()


def train(config: PretrainConfig, out: str | os.PathLike, *, resume: bool = False,
          progress: bool = True, on_step: Callable[[int, int, float], None] | None = None
          ) -> list[float]:
    """Pretrain; returns this process's per-step losses (of this invocation).

    ``resume``: continue the run in ``out`` from its ``checkpoint.pt``. ``on_step(epoch,
    step_in_epoch, loss)`` is called after every step (tests use it to interrupt a run).
    Runs with ``config.threads`` threads and deterministic kernels (``simclr.determinism``):
    the same seed, thread count and machine type give bit-identical weights.
    """
    cuda = config.device == "cuda" or config.device == "auto" and torch.cuda.is_available()
    with reproducible(threads=config.threads, deterministic=config.deterministic,
                      device=torch.device("cuda" if cuda else "cpu")) as threads:
        log.info("%d thread(s), deterministic algorithms %s", threads,
                 "on" if config.deterministic else "off")
        return Trainer(config, out, resume=resume, progress=progress, on_step=on_step).fit()


def resume_config(out: str | os.PathLike, overrides: list[str] = ()) -> PretrainConfig:
    """The config a run in ``out`` was started with, with the allowed overrides applied."""
    from .config import apply_overrides

    path = Path(out) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {out} a run folder?")
    for item in overrides:
        key = item.partition("=")[0]
        if key not in RESUMABLE_OVERRIDES:
            raise ValueError(f"{key!r} cannot change when resuming (it would change what is "
                             f"computed); allowed: {', '.join(RESUMABLE_OVERRIDES)}")
    data = json.loads(path.read_text(encoding="utf-8"))
    return config_from_dict(apply_overrides(data, list(overrides)))
