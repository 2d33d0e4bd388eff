"""``describe_model``: the one place that decides whether a string is a model name or a
checkpoint file, and the one ``ModelDescriptor`` every front door reads (issue 20, item 3).

A file named like a model means the file, with a warning, in ``load_pretrained``,
``SlideExtractor`` (``local_model_spec``), ``histohub convert`` and ``export_hf`` alike:
before, convert and export disagreed (export stamped the manifest model's licence and
citation on the file's weights)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

import histohub
from histohub.errors import InputNotFoundError, OptionError, UnknownModelError
from histohub.hub import ModelDescriptor, describe_model, get_entry
from histohub.hub._descriptor import default_preprocessing, describe_module

BUNDLED = "resnet18-ssl-mini"   # shipped inside the package: describing it reads nothing


@pytest.fixture
def _empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOHUB_HOME", str(tmp_path / "home"))


@pytest.fixture
def file_named_like_a_model(tmp_path, monkeypatch, resnet18_file) -> Path:
    """A random ResNet18 saved in the working folder as ``resnet18-ssl-mini``."""
    monkeypatch.chdir(tmp_path)
    return Path(shutil.copy(resnet18_file, tmp_path / BUNDLED))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the four cases


def test_a_name_is_described_from_its_manifest_entry():
    entry = get_entry(BUNDLED)
    described = describe_model(BUNDLED)
    assert isinstance(described, ModelDescriptor) and not described.is_file
    assert described.entry is entry and described.source is entry and described.file is None
    assert (described.name, described.arch, described.feature_dim) == (BUNDLED, "resnet18", 512)
    assert described.preprocessing == entry.preprocessing
    assert described.sha256 == entry.weights[0].sha256 and len(entry.weights) == 1
    assert (described.license, described.citation) == (entry.license, entry.citation)
    assert described.weights_path is None   # not fetched: known once loaded


def test_a_file_is_described_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "my-encoder.pt"
    path.write_bytes(b"not read yet")
    monkeypatch.chdir(tmp_path)
    described = describe_model("my-encoder.pt")
    assert described.is_file and described.entry is None
    assert described.file == path and described.file.is_absolute() and described.source == path
    assert (described.name, described.arch, described.feature_dim) == ("my-encoder", None, None)
    assert described.preprocessing == default_preprocessing()
    assert (described.sha256, described.license, described.citation) == (None, None, None)
    assert describe_model(path, arch="resnet50").feature_dim == 2048


def test_a_file_named_like_a_model_is_the_file_with_a_warning(file_named_like_a_model, caplog):
    with caplog.at_level(logging.WARNING, logger="histohub"):
        described = describe_model(BUNDLED)
    assert described.is_file and described.file == file_named_like_a_model.absolute()
    assert described.entry is None and described.license is None
    assert "loading the file" in caplog.text and BUNDLED in caplog.text


@pytest.mark.parametrize("given", ["missing.pt", "weights/encoder", "~/no-such-histohub-ckpt",
                                   "."], ids=["suffix", "separator", "home", "folder"])
def test_a_path_that_is_no_file_says_so(tmp_path, monkeypatch, given):
    """Something that reads as a path is not looked up as a name: the error names the file
    (a FileNotFoundError), not a list of models."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputNotFoundError, match="is a folder" if given == "."
                       else "does not exist") as caught:
        describe_model(given)
    assert isinstance(caught.value, FileNotFoundError)


def test_an_unknown_name_lists_the_close_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownModelError, match="Did you mean") as caught:
        describe_model("resnet18-sl")
    assert "resnet18-ssl" in caught.value.close_matches
    assert isinstance(caught.value, KeyError)


def test_an_arch_that_is_not_the_models_is_refused():
    with pytest.raises(OptionError, match="is a resnet18; drop arch='resnet50'") as caught:
        describe_model(BUNDLED, arch="resnet50")
    assert isinstance(caught.value, ValueError)
    assert describe_model(BUNDLED, arch="resnet18").arch == "resnet18"


def test_a_module_histohub_did_not_load_is_described_by_its_class():
    from torch import nn

    described = describe_module(nn.Identity())
    assert (described.name, described.arch, described.feature_dim, described.sha256) == (
        "Identity", None, None, None)
    assert described.preprocessing == default_preprocessing()


# --------------------------------------------------------------------------- loaded


def test_a_loaded_model_carries_its_descriptor_filled_in(_empty_cache):
    entry = get_entry(BUNDLED)
    model = histohub.load_pretrained(BUNDLED, progress=False)
    info = model.histohub_info
    assert isinstance(info, ModelDescriptor) and info.entry is entry
    assert info.sha256 == _sha256(Path(info.weights_path)) == entry.weights[0].sha256


def test_random_weights_claim_no_hash():
    info = histohub.load_pretrained(BUNDLED, pretrained=False).histohub_info
    assert info.entry is not None and (info.sha256, info.weights_path) == (None, None)


# --------------------------------------------------------------------------- the four doors agree


def test_every_front_door_reads_a_file_named_like_a_model_as_the_file(
        file_named_like_a_model, tmp_path, capsys, _empty_cache):
    from histohub.cli import main
    from histohub.hub._export import CARD_NAME, CONFIG_NAME, export_hf
    from histohub.hub._runner import local_model_spec

    file_sha = _sha256(file_named_like_a_model)
    assert file_sha != get_entry(BUNDLED).weights[0].sha256

    info = histohub.load_pretrained(BUNDLED).histohub_info
    assert info.is_file and info.sha256 == file_sha

    spec = local_model_spec(BUNDLED)
    assert spec.is_file and spec.file == file_named_like_a_model.absolute()

    out = tmp_path / "converted.safetensors"
    assert main(["convert", BUNDLED, str(out)]) == 0
    with safe_open(str(out), "pt") as converted:
        assert converted.metadata()["source_sha256"] == file_sha

    exported = export_hf(BUNDLED, tmp_path / "export", progress=False)
    config = json.loads((exported / CONFIG_NAME).read_text())
    assert config["histohub"]["source_sha256"] == file_sha
    assert "license" not in config["pretrained_cfg"]   # the file's licence is not known
    card = (exported / CARD_NAME).read_text()
    assert "license: other" in card and get_entry(BUNDLED).citation not in card
