"""histohub.hub._manifest_writer: the one way manifests change (pin, metrics, export)."""

from __future__ import annotations

import json

import pytest

import histohub
from histohub.hub._manifest_writer import read_manifest_entry
from histohub.errors import ManifestError


def shipped(name: str = "resnet18-ssl") -> dict:
    raw = dict(histohub.hub.read_manifest_json(histohub.hub.MANIFEST_PATH)["models"][name])
    raw.pop("default", None)
    return raw


def test_new_manifest_holds_the_entry(tmp_path):
    path = tmp_path / "sub" / "mine.json"
    entry = histohub.hub.write_manifest_entry(path, "mine", shipped())
    assert entry.name == "mine" and entry.manifest_path == path
    assert list(histohub.hub.read_manifest(path)) == ["mine"]
    assert json.loads(path.read_text())["schema_version"] == histohub.hub.SCHEMA_VERSION


def test_existing_name_needs_replace(tmp_path):
    path = tmp_path / "mine.json"
    histohub.hub.write_manifest_entry(path, "mine", shipped())
    with pytest.raises(ManifestError, match="already lists 'mine'"):
        histohub.hub.write_manifest_entry(path, "mine", shipped())
    changed = {**shipped(), "description": "second"}
    written = histohub.hub.write_manifest_entry(path, "mine", changed, replace=True)
    assert written.description == "second"


def test_invalid_entry_writes_nothing(tmp_path):
    path = tmp_path / "mine.json"
    histohub.hub.write_manifest_entry(path, "mine", shipped())
    before = path.read_bytes()
    with pytest.raises(ManifestError, match="arch"):
        histohub.hub.write_manifest_entry(path, "other", {**shipped(), "arch": "vit"})
    assert path.read_bytes() == before


def test_record_metrics_merges_and_keeps_other_fields(tmp_path):
    path = tmp_path / "mine.json"
    histohub.hub.write_manifest_entry(path, "mine", {**shipped(), "metrics": {"a": 1, "b": 2}})
    histohub.hub.write_manifest_entry(path, "other", shipped("resnet18-ssl"))
    histohub.hub.record_metrics(path, "mine", {"b": 3, "c": 4})
    assert read_manifest_entry(path, "mine")["metrics"] == {"a": 1, "b": 3, "c": 4}
    assert read_manifest_entry(path, "other") == shipped()
    with pytest.raises(ManifestError, match="no model 'nobody'"):
        histohub.hub.record_metrics(path, "nobody", {})


def test_pin_weights_sets_sha256_and_size(tmp_path):
    path = tmp_path / "mine.json"
    histohub.hub.write_manifest_entry(path, "mine", shipped())
    filename = shipped()["weights"][0]["filename"]
    entry = histohub.hub.pin_weights(path, "mine", {filename: ("ab" * 32, 123)})
    assert (entry.weights[0].sha256, entry.weights[0].size) == ("ab" * 32, 123)
    with pytest.raises(ManifestError, match="no weights file"):
        histohub.hub.pin_weights(path, "mine", {"absent.pt": ("ab" * 32, 1)})


def test_symlinked_manifest_stays_a_link(tmp_path):
    real = tmp_path / "real.json"
    histohub.hub.write_manifest_entry(real, "mine", shipped())
    link = tmp_path / "link.json"
    link.symlink_to(real)
    histohub.hub.record_metrics(link, "mine", {"x": 1})
    assert link.is_symlink() and read_manifest_entry(real, "mine")["metrics"]["x"] == 1
