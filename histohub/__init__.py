"""histohub: self-supervised histopathology encoders in one line.

>>> import histohub
>>> model = histohub.load_pretrained("resnet18-ssl")     # eval mode, 512-d features
>>> transform = histohub.get_transform("resnet18-ssl")   # mean = std = 0.5, 224 px

The public API is this module's ``__all__``. Names that need torch, torchvision or the
slide libraries are imported on first use, so ``import histohub`` (and ``histohub list``)
reads the manifest without loading torch.

Manifests: :func:`list_models`, :func:`get_entry`, :func:`load_manifest` and
:func:`reload_manifests` read the manifests in use (``MANIFEST_PATH`` plus
``HISTOHUB_MANIFEST``); :func:`read_manifest`, :func:`read_manifest_json` and
:func:`parse_entry` read and validate one file or entry; :func:`write_manifest_entry`,
:func:`record_metrics` and :func:`pin_weights` are the only writers.
Weights: :func:`read_checkpoint` reads a checkpoint as data, :func:`map_state_dict` maps it
strictly onto :func:`build_encoder`'s keys (``FEATURE_DIMS``: the architectures), and
:func:`sha256_file` hashes a file in chunks.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._manifest import (MANIFEST_PATH, get_entry, list_models, load_manifest, read_manifest,
                        read_manifest_json, reload_manifests)
from ._manifest_schema import SCHEMA_VERSION, KeyMap, ModelEntry, Preprocessing, parse_entry
from ._files import atomic_path, write_bytes_atomic, write_text_atomic
from ._manifest_writer import pin_weights, record_metrics, write_manifest_entry
from ._version import __version__
from .errors import HistohubError

# Public names served lazily (they import torch, torchvision or slide libraries):
# name -> module that defines it.
_LAZY = {
    "DEFAULT_MODEL": "histohub.pretrained",
    "FEATURE_DIMS": "histohub.models",
    "ModelInfo": "histohub.pretrained",
    "SlideExtractor": "histohub.slide_features",
    "SlideJob": "histohub.slide_features",
    "Tiling": "histohub.slide_features",
    "build_encoder": "histohub.models",
    "cohort_patches": "histohub.slide_batches",
    "extract_features": "histohub.features",
    "extract_slide": "histohub.slide_features",
    "get_transform": "histohub.transforms",
    "load_pretrained": "histohub.pretrained",
    "map_state_dict": "histohub._checkpoint",
    "open_slide": "histohub.wsi",
    "PatchBatch": "histohub.slide_batches",
    "read_checkpoint": "histohub._checkpoint",
    "sha256_file": "histohub._download",
    "slide_patches": "histohub.slide_batches",
    "tissue_mask": "histohub.tissue",
    "tune_allocator": "histohub.model_runner",
}

__all__ = [
    "HistohubError", "KeyMap", "MANIFEST_PATH", "ModelEntry", "Preprocessing",
    "SCHEMA_VERSION", "__version__", "get_entry", "list_models", "load_manifest",
    "parse_entry", "pin_weights", "read_manifest", "read_manifest_json", "record_metrics",
    "reload_manifests", "write_manifest_entry", "atomic_path", "write_bytes_atomic",
    "write_text_atomic", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'histohub' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
