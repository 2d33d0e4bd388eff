"""histohub's public API: ``histohub.__all__`` and each wing's ``__all__`` are pinned here;
every public name is the implementation itself, not a copy."""

from __future__ import annotations

import importlib

import pytest

import histohub

#: histohub.__all__, pinned: a name added or removed here is a decision about the API.
TOP_LEVEL = {
    "HistohubError": "histohub.errors",
    "__version__": "histohub._version",
    "list_models": "histohub.hub._registry",
    "get_entry": "histohub.hub._registry",
    "load_pretrained": "histohub.hub._pretrained",
    "get_transform": "histohub.hub._transforms",
    "extract_features": "histohub._features",
    "extract_slide": "histohub.slides._extract",
    "Tiling": "histohub.slides._jobs",
    "open_slide": "histohub.slides._reader",
    "tissue_mask": "histohub.slides._tissue",
    "slide_patches": "histohub.slides._patches",
    "cohort_patches": "histohub.slides._patches",
    "PatchBatch": "histohub.slides._patches",
}

#: Each wing's __all__, pinned the same way: name -> the module that implements it.
WINGS = {
    "histohub.hub": {
        "read_checkpoint": "histohub.hub._checkpoint",
        "map_state_dict": "histohub.hub._checkpoint",
        "sha256_file": "histohub.hub._verify",
        "read_manifest": "histohub.hub._registry",
        "read_manifest_json": "histohub.hub._registry",
        "parse_entry": "histohub.hub._parse",
        "load_manifest": "histohub.hub._registry",
        "reload_manifests": "histohub.hub._registry",
        "get_entry": "histohub.hub._registry",
        "list_models": "histohub.hub._registry",
        "Preprocessing": "histohub.hub._schema",
        "KeyMap": "histohub.hub._schema",
        "ModelEntry": "histohub.hub._schema",
        "MANIFEST_PATH": "histohub.hub._registry",
        "SCHEMA_VERSION": "histohub.hub._schema",
        "build_encoder": "histohub.hub._archs",
        "FEATURE_DIMS": "histohub.hub._archs",
        "write_manifest_entry": "histohub.hub._manifest_writer",
        "record_metrics": "histohub.hub._manifest_writer",
        "pin_weights": "histohub.hub._manifest_writer",
        "load_pretrained": "histohub.hub._pretrained",
        "ModelDescriptor": "histohub.hub._descriptor",
        "describe_model": "histohub.hub._descriptor",
        "DEFAULT_MODEL": "histohub.hub._pretrained",
        "get_transform": "histohub.hub._transforms",
        "normalize_batch": "histohub.hub._transforms",
        "tune_allocator": "histohub.hub._runner",
        "export_hf": "histohub.hub._export",
        "push": "histohub.hub._export",
    },
    "histohub.slides": {
        "MASK_METHODS": "histohub._options",
        "PatchBatch": "histohub.slides._patches",
        "PatchReader": "histohub.slides._reader",
        "SLIDE_EXTENSIONS": "histohub.slides._reader",
        "Slide": "histohub.slides._reader",
        "SlideExtractor": "histohub.slides._extract",
        "SlideJob": "histohub.slides._jobs",
        "SlideResult": "histohub.slides._jobs",
        "TileGrid": "histohub.slides._tiling",
        "Tiling": "histohub.slides._jobs",
        "cohort_patches": "histohub.slides._patches",
        "extract_slide": "histohub.slides._extract",
        "open_slide": "histohub.slides._reader",
        "slide_patches": "histohub.slides._patches",
        "tile_grid": "histohub.slides._tiling",
        "tissue_mask": "histohub.slides._tissue",
    },
    "histohub.featurefile": {
        "FORMAT": "histohub.featurefile._layout",
        "FORMAT_VERSION": "histohub.featurefile._layout",
        "is_complete": "histohub.featurefile._layout",
        "read_features": "histohub.featurefile._layout",
        "read_header": "histohub.featurefile._layout",
    },
    "histohub.files": {
        "IMAGE_EXTENSIONS": "histohub.files",
        "atomic_path": "histohub.files",
        "write_bytes_atomic": "histohub.files",
        "write_text_atomic": "histohub.files",
    },
}
PUBLIC = {"histohub": TOP_LEVEL, **WINGS}


def test_the_top_level_api_is_small_and_pinned():
    assert sorted(histohub.__all__) == sorted(TOP_LEVEL)
    assert len(histohub.__all__) <= 16


@pytest.mark.parametrize("package, name",
                         sorted((p, n) for p, names in PUBLIC.items() for n in names))
def test_public_name_is_the_implementation(package, name):
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(PUBLIC[package])
    assert getattr(module, name) is getattr(importlib.import_module(PUBLIC[package][name]), name)


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_all_names_resolve(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        getattr(module, name)
    assert set(module.__all__) <= set(dir(module))


def test_reload_manifests_rereads_the_files(tmp_path, monkeypatch):
    extra = tmp_path / "extra.json"
    monkeypatch.setenv("HISTOHUB_MANIFEST", str(extra))
    histohub.hub.write_manifest_entry(extra, "mine", _shipped_entry("resnet18-ssl"))
    assert "mine" in histohub.list_models()
    extra.write_text('{"schema_version": 1, "models": {}}')
    assert "mine" in histohub.list_models()  # still cached
    histohub.hub.reload_manifests()
    assert "mine" not in histohub.list_models()


def _shipped_entry(name: str) -> dict:
    """The raw JSON of a shipped entry (its first weights file), without ``default``."""
    raw = dict(histohub.hub.read_manifest_json(histohub.hub.MANIFEST_PATH)["models"][name])
    raw.pop("default", None)
    raw["weights"] = raw["weights"][:1]
    return raw


def test_no_public_function_is_shadowed_by_its_module():
    """Importing a submodule sets it as an attribute of the package: a lazy public name
    equal to its module's name would then be the module, not the function."""
    for names in PUBLIC.values():
        for name, module in names.items():
            assert module.rsplit(".", 1)[1] != name, (name, module)


def test_every_error_histohub_defines_is_public():
    import inspect

    import histohub.errors as errors

    defined = {name for name, value in vars(errors).items() if inspect.isclass(value)
               and issubclass(value, errors.HistohubError) and value.__module__ == errors.__name__}
    assert defined <= set(errors.__all__), defined - set(errors.__all__)
