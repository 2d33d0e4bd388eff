"""Feature files for the clustering tests: the layout `histohub extract` writes, filled
with synthetic blobs or with colour statistics of a real slide's patches."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from PIL import Image

PATCH = 224


def write_features(path: Path, features: np.ndarray, coords: np.ndarray | None = None,
                   **attrs) -> Path:
    """A feature file in the layout `histohub extract` writes (CLAM/TRIDENT)."""
    if coords is None:
        coords = np.stack([np.arange(len(features)) * PATCH, np.zeros(len(features))], 1)
    with h5py.File(path, "w") as handle:
        handle["features"] = np.asarray(features, np.float32)
        handle["coords"] = np.asarray(coords, np.int64)
        handle.attrs.update({"level": 0, "model_name": "resnet18-ssl", **attrs})
    return path


def blobs(groups: int, per_group: int, dim: int, *, seed: int, spread: float = 0.3):
    """Well separated Gaussian blobs: features (N, dim) and true group (N,), shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dim)) * 10
    truth = np.repeat(np.arange(groups), per_group)
    x = centres[truth] + rng.normal(size=(len(truth), dim)) * spread
    order = rng.permutation(len(truth))
    return x[order].astype(np.float32), truth[order]


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))
