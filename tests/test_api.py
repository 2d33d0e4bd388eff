"""histohub's public API (``histohub/__init__.py``): every name training and users rely on
exists, is in ``__all__``, and is the implementation itself, not a copy."""

from __future__ import annotations

import importlib

import pytest

import histohub

# name -> the module that implements it (the public name must be that very object).
PUBLIC = {
    "read_checkpoint": "histohub._checkpoint",
    "map_state_dict": "histohub._checkpoint",
    "sha256_file": "histohub._download",
    "read_manifest": "histohub._manifest",
    "read_manifest_json": "histohub._manifest",
    "parse_entry": "histohub._manifest_schema",
    "load_manifest": "histohub._manifest",
    "reload_manifests": "histohub._manifest",
    "get_entry": "histohub._manifest",
    "list_models": "histohub._manifest",
    "Preprocessing": "histohub._manifest_schema",
    "KeyMap": "histohub._manifest_schema",
    "ModelEntry": "histohub._manifest_schema",
    "MANIFEST_PATH": "histohub._manifest",
    "SCHEMA_VERSION": "histohub._manifest_schema",
    "build_encoder": "histohub.models",
    "FEATURE_DIMS": "histohub.models",
    "write_manifest_entry": "histohub._manifest_writer",
    "record_metrics": "histohub._manifest_writer",
    "pin_weights": "histohub._manifest_writer",
    "load_pretrained": "histohub.pretrained",
    "ModelInfo": "histohub.pretrained",
    "DEFAULT_MODEL": "histohub.pretrained",
    "get_transform": "histohub.transforms",
    "HistohubError": "histohub.errors",
    "__version__": "histohub._version",
    "extract_features": "histohub.features",
    "extract_slide": "histohub.slide_features",
    "SlideExtractor": "histohub.slide_features",
    "SlideJob": "histohub.slide_features",
    "Tiling": "histohub.slide_features",
    "tune_allocator": "histohub.model_runner",
    "open_slide": "histohub.wsi",
    "slide_patches": "histohub.slide_batches",
    "cohort_patches": "histohub.slide_batches",
    "PatchBatch": "histohub.slide_batches",
    "tissue_mask": "histohub.tissue",
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_name_is_the_implementation(name):
    assert name in histohub.__all__
    assert getattr(histohub, name) is getattr(importlib.import_module(PUBLIC[name]), name)


def test_all_names_resolve():
    for name in histohub.__all__:
        getattr(histohub, name)
    assert set(histohub.__all__) <= set(dir(histohub))


def test_reload_manifests_rereads_the_files(tmp_path, monkeypatch):
    extra = tmp_path / "extra.json"
    monkeypatch.setenv("HISTOHUB_MANIFEST", str(extra))
    histohub.write_manifest_entry(extra, "mine", _shipped_entry("resnet18-ssl"))
    assert "mine" in histohub.list_models()
    extra.write_text('{"schema_version": 1, "models": {}}')
    assert "mine" in histohub.list_models()  # still cached
    histohub.reload_manifests()
    assert "mine" not in histohub.list_models()


def _shipped_entry(name: str) -> dict:
    """The raw JSON of a shipped entry (its first weights file), without ``default``."""
    raw = dict(histohub.read_manifest_json(histohub.MANIFEST_PATH)["models"][name])
    raw.pop("default", None)
    raw["weights"] = raw["weights"][:1]
    return raw


def test_no_public_function_is_shadowed_by_its_module():
    """Importing a submodule sets it as an attribute of the package: a lazy public name
    equal to its module's name would then be the module, not the function."""
    for name, module in histohub._LAZY.items():
        assert module.rsplit(".", 1)[1] != name, (name, module)
