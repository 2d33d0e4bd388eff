"""The hub wing: a model's name or file -> verified weights -> an eval-mode encoder.

A pipeline, one module per step: the manifest's schema (``_schema``) and the registry of
manifests in use (``_registry``), the one manifest writer (``_manifest_writer``), fetching
and verifying weights (settings in ``histohub._env``; ``_fetch`` over ``_cache``, ``_verify``,
``_sources``, ``_http``, ``_hf``, ``_redact``), reading checkpoints as data (``_checkpoint``),
architectures (``_archs``), what a name or a file is (``_descriptor``: the one place that
decides which it is), name or file -> encoder (``_pretrained``), preprocessing
(``_transforms``), the model as it runs (``_runner``), and export to timm and the Hugging
Face Hub (``_export``). The public names are this package's ``__all__``; the modules are
private. Nothing here imports the slide or feature-file wings.
"""

from __future__ import annotations

from histohub._lazy import lazy_exports
from histohub.hub._manifest_writer import pin_weights, record_metrics, write_manifest_entry
from histohub.hub._registry import (MANIFEST_PATH, get_entry, list_models, load_manifest,
                                    read_manifest, read_manifest_json, reload_manifests)
from histohub.hub._parse import parse_entry
from histohub.hub._schema import SCHEMA_VERSION, KeyMap, ModelEntry, Preprocessing

_LAZY = {
    "DEFAULT_MODEL": "histohub.hub._pretrained",
    "FEATURE_DIMS": "histohub.hub._archs",
    "ModelDescriptor": "histohub.hub._descriptor",
    "build_encoder": "histohub.hub._archs",
    "describe_model": "histohub.hub._descriptor",
    "export_hf": "histohub.hub._export",
    "get_transform": "histohub.hub._transforms",
    "load_pretrained": "histohub.hub._pretrained",
    "map_state_dict": "histohub.hub._checkpoint",
    "normalize_batch": "histohub.hub._transforms",
    "push": "histohub.hub._export",
    "read_checkpoint": "histohub.hub._checkpoint",
    "sha256_file": "histohub.hub._verify",
    "tune_allocator": "histohub.hub._runner",
}

__all__ = [
    "KeyMap", "MANIFEST_PATH", "ModelEntry", "Preprocessing", "SCHEMA_VERSION", "get_entry",
    "list_models", "load_manifest", "parse_entry", "pin_weights", "read_manifest",
    "read_manifest_json", "record_metrics", "reload_manifests", "write_manifest_entry",
    *_LAZY,
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
