"""Frozen pre-activation features, computed once per (model, data, preprocessing), cached.

Paper, section 4.2: "we freeze each residual network at the pre-activation layer and only
train a linear classifier or a regressor on the learned representations". Every label
fraction, repeat and probe then reads the same ``(N, D)`` tensor from memory; the cache
on disk makes a second sweep (or another task on the same data) free.

Cache layout: ``<cache_dir>/<key>.safetensors`` holding ``features`` ``(N, D)`` float32,
with the key's ingredients in the file's metadata. ``key`` = sha256 of the model's identity
(weights sha256), the data's content hash, and the preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from histohub.files import atomic_path

from .datasets import DatasetError, ImageDataset
from .encoders import Encoder
from .images import read_image

logger = logging.getLogger(__name__)
CACHE_VERSION = 1


def cache_key(encoder: Encoder, data_hash: str, *, input_size: int) -> tuple[str, dict]:
    """The cache file's key and the facts it was made from."""
    facts = {
        "version": CACHE_VERSION, "model": encoder.identity, "arch": encoder.arch,
        "data": data_hash, "input_size": input_size, "resize": "PIL bilinear",
        "mean": list(encoder.preprocessing.mean), "std": list(encoder.preprocessing.std),
    }
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    return key, facts


def cached_features(encoder: Encoder, dataset: ImageDataset, *, data_hash: str,
                    input_size: int, cache_dir: Path | None, device: str = "cpu",
                    batch_size: int = 64, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """``(N, D)`` float32 features of every image of ``dataset``, and where they came from.

    Read from ``cache_dir`` when present, else computed and written there atomically.
    """
    key, facts = cache_key(encoder, data_hash, input_size=input_size)
    path = cache_dir / f"{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        features = _read(path)
        if features.shape == (len(dataset), encoder.feature_dim):
            logger.info("features of %s on %s read from %s", encoder.label, dataset.name, path)
            return features, {"key": key, "cached": True, "path": str(path), **facts}
        logger.warning("cache file %s has shape %s, expected %s: recomputing", path,
                       tuple(features.shape), (len(dataset), encoder.feature_dim))
    features = extract(encoder, dataset, input_size=input_size, device=device,
                       batch_size=batch_size, progress=progress)
    if path is not None:
        _write(path, features, facts)
    return features, {"key": key, "cached": False, "path": str(path) if path else None, **facts}


class PreprocessedImages(torch.utils.data.Dataset):
    """Image files -> normalised float ``(3, size, size)`` tensors (resized with PIL)."""

    def __init__(self, paths: Sequence[Path], size: int, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.paths, self.size = list(paths), size
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255.0
        self.std = torch.tensor(std).view(3, 1, 1) * 255.0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = torch.from_numpy(read_image(self.paths[index], self.size)).permute(2, 0, 1)
        return (image.float() - self.mean) / self.std


def extract(encoder: Encoder, dataset: ImageDataset, *, input_size: int, device: str = "cpu",
            batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Run the frozen encoder over every image: ``(N, D)`` float32 on the CPU.

    The batching is ``histohub.extract_features`` (eval, inference_mode, channels_last,
    decoding in a thread beside the model); non-finite features raise here rather than
    pass into a probe.
    """
    from histohub import extract_features

    pre = encoder.preprocessing
    images = PreprocessedImages(dataset.paths, input_size, pre.mean, pre.std)
    result = extract_features(encoder.build(), images, batch_size=batch_size, device=device,
                              progress=progress)
    if result.failed or len(result.features) != len(dataset):
        raise DatasetError(f"{len(result.failed)} image(s) of {dataset.name} could not be "
                           f"read: {result.failed[:3]}")
    if result.nonfinite:
        bad = [str(dataset.paths[i]) for i in result.nonfinite[:3]]
        raise DatasetError(f"{encoder.label} gave non-finite features for {bad}; check the "
                           "weights")
    return result.features


def _read(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)["features"]


def _write(path: Path, features: torch.Tensor, facts: dict) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as temporary:
        save_file({"features": features.contiguous()}, temporary,
                  metadata={k: json.dumps(v) for k, v in facts.items()})
