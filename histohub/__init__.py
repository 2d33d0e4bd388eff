"""histohub: self-supervised histopathology encoders in one line.

>>> import histohub
>>> model = histohub.load_pretrained("resnet18-ssl")     # eval mode, 512-d features
>>> transform = histohub.get_transform("resnet18-ssl")   # mean = std = 0.5, 224 px

Heavier parts (slides, feature extraction, clustering) are imported on first use, so
``import histohub`` costs little beyond ``import torch, torchvision``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._manifest import ModelEntry, get_entry, list_models
from .errors import HistohubError
from .pretrained import DEFAULT_MODEL, ModelInfo, load_pretrained
from .transforms import get_transform

__version__ = "0.1.0"

# Public names served lazily: name -> module that defines it.
_LAZY = {
    "extract_features": "histohub.features",
    "extract_slide": "histohub.features",
    "open_slide": "histohub.wsi",
    "tissue_mask": "histohub.wsi",
    "tune_allocator": "histohub.features",
}

__all__ = [
    "DEFAULT_MODEL", "HistohubError", "ModelEntry", "ModelInfo", "__version__", "get_entry",
    "get_transform", "list_models", "load_pretrained", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'histohub' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
