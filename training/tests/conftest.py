"""Fixtures shared by training's tests: small image folders and a ResNet18 checkpoint that
differs from ``random``. The repository's ``conftest.py`` adds the isolated environment
(empty caches, no user manifest) and the real-data fixtures (``shared_data``, slides)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _write_images(folder: Path, count: int, *, nested: bool = False, size: int = 20) -> None:
    """``count`` random RGB PNGs ``img000.png``, ... of ``size`` x ``size + 4`` px in
    ``folder`` (or spread over ``case<k>/deeper/`` sub-folders when ``nested``)."""
    rng = np.random.default_rng(count)
    for i in range(count):
        sub = folder / f"case{i % 3}" / "deeper" if nested else folder
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img{i:03d}.png")


@pytest.fixture(scope="session")
def write_images() -> Callable[..., None]:
    """``write_images(folder, count, *, nested=False, size=20)``: random RGB PNGs."""
    return _write_images


def _class_tiles(root: Path, per_class: int = 12) -> Path:
    """Two colour classes (``class0`` red, ``class1`` blue) of noisy RGB tiles of mixed
    sizes (24 and 40 px), the source in the name (``slide<k>_tile<i>.png``); returns ``root``."""
    rng = np.random.default_rng(0)
    for c, base in enumerate(((190, 60, 60), (60, 60, 190))):
        for i in range(per_class):
            size = 24 if i % 2 else 40
            pixels = np.clip(np.array(base) + rng.normal(0, 25, (size, size, 3)), 0, 255)
            path = root / f"class{c}" / f"slide{i % 6}_tile{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path)
    return root


@pytest.fixture(scope="session")
def class_tiles() -> Callable[..., Path]:
    """``class_tiles(root, per_class=12)``: a two-class image folder a benchmark can learn."""
    return _class_tiles


@pytest.fixture(scope="session")
def other_seed(tmp_path_factory) -> Path:
    """``other-seed.safetensors``: a ResNet18 encoder that differs from ``random`` (another
    seed; no pretrained weights can be downloaded here). Benchmarks label it ``other-seed``."""
    from safetensors.torch import save_file

    from histohub_training.downstream.encoders import random_encoder

    path = tmp_path_factory.mktemp("ckpt") / "other-seed.safetensors"
    save_file(random_encoder("resnet18", seed=123).state_dict, path)
    return path
