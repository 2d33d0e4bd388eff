"""``histohub extract --model <zoo ViT>``: tiles at the model's mpp and input size, writes
features of its dimension (a timm ViT-Ti/16 entry of an extra manifest, on the CMU slide)."""

from __future__ import annotations

import json

import pytest
import torch

from histohub.featurefile._layout import read_features
from histohub.hub._registry import reload_manifests
from histohub.cli import main

timm = pytest.importorskip("timm")


@pytest.mark.slow
def test_extract_with_a_zoo_vit_entry(cmu_slide, tmp_path, monkeypatch):
    from histohub.hub._zoo_archs import ZOO_ARCHS

    spec = ZOO_ARCHS["vit-t16"]
    torch.manual_seed(0)
    upstream = timm.create_model(spec.timm_name, **spec.timm_kwargs()).eval()
    torch.save(upstream.state_dict(), tmp_path / "vitt16.pth")
    entry = {
        "description": "a ViT-Ti/16 with random weights", "arch": "vit-t16",
        "feature_dim": 384, "pooling": "cls+mean", "commercial": False, "gated": False,
        "weights": [{"filename": "vitt16.pth", "format": "torch", "sha256": None, "size": None,
                     "sources": [{"url": (tmp_path / "vitt16.pth").as_uri()}],
                     "key_map": {"state_dict_key": None, "strip_prefixes": [], "drop": [],
                                 "layout": "timm"}}],
        "preprocessing": {"input_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "mpp": 1.0},
        "license": "CC-BY-NC-4.0", "citation": "Test.", "recipe": {}, "training_data": "x",
        "metrics": {},
    }
    manifest = tmp_path / "zoo.json"
    manifest.write_text(json.dumps({"schema_version": 1, "models": {"tiny-vit-t16": entry}}))
    monkeypatch.setenv("HISTOHUB_MANIFEST", str(manifest))
    reload_manifests()
    out = tmp_path / "out"
    argv = ["extract", str(cmu_slide), "--model", "tiny-vit-t16", "--out", str(out),
            "--max-patches", "4", "--batch-size", "4", "--compile", "off", "--quiet"]
    assert main(argv) == 2  # licence first, nothing written
    assert not out.exists() or not any(out.iterdir())
    assert main(argv + ["--accept-licence"]) == 0
    result = read_features(out / f"{cmu_slide.stem}.h5")
    attrs = result["attrs"]
    assert result["features"].shape == (4, 384)
    assert attrs["model_name"] == "tiny-vit-t16" and attrs["arch"] == "vit-t16"
    assert attrs["target_mpp"] == 1.0 and attrs["patch_size"] == 224
    assert len(attrs["model_sha256"]) == 64
    reload_manifests()
