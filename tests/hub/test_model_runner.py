"""The model runner: weights' fingerprint, allocator tuning."""

from __future__ import annotations

import hashlib

import pytest
import torch

import histohub.hub._runner as model_runner
from histohub.hub._runner import ModelRunner, model_fingerprint, tune_allocator
from test_features import Tiny


def test_tune_allocator_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(model_runner, "_ALLOCATOR_TUNED", None)
    monkeypatch.setenv("HISTOHUB_MALLOPT", "0")
    assert tune_allocator() is False


def test_model_fingerprint_is_the_weights_not_the_layout():
    a, b = Tiny(), Tiny()
    assert model_fingerprint(a) == model_fingerprint(b.to(memory_format=torch.channels_last))
    with torch.no_grad():
        b.conv.bias[0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(Tiny().to(torch.float64))


def test_runner_carries_the_fingerprint_across_channels_last(monkeypatch):
    """Hashed once, before the weights move to channels_last (where hashing would copy
    them): the runner's model answers from the cache with the digest of the weights."""
    expected = model_fingerprint(Tiny())
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(model_runner.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    runner = ModelRunner(Tiny(), fingerprint=True)
    assert runner.eager.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model_fingerprint(runner.eager) == expected and len(calls) == 1
    with torch.no_grad():
        runner.eager.conv.bias[0] += 1
    assert model_fingerprint(runner.eager) != expected and len(calls) == 2


def test_local_model_spec_only_for_weights_already_here(tmp_path, monkeypatch):
    """Known before the weights are read: a model whose weights are bundled (from the
    manifest alone) and a checkpoint file (its first bytes checked at once). Not a module,
    an unknown name or a model still to download; a file that shares a model's name is the
    file."""
    from histohub.hub._registry import get_entry
    from histohub.errors import CheckpointError
    from histohub.hub._runner import local_model_spec
    from histohub.hub._descriptor import default_preprocessing

    monkeypatch.setenv("HISTOHUB_HOME", str(tmp_path / "home"))   # an empty cache
    spec = local_model_spec("resnet18-ssl-mini")
    entry = get_entry("resnet18-ssl-mini")
    assert spec is not None and spec.sha256 == entry.weights[0].sha256
    assert spec.preprocessing == entry.preprocessing and spec.feature_dim == 512
    assert local_model_spec(Tiny()) is None
    assert local_model_spec("no-such-model") is None
    assert local_model_spec("resnet18-ssl") is None                 # weights to download
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18-ssl-mini").write_bytes(b"not the bundled model")
    with pytest.raises(CheckpointError, match="neither a safetensors file"):
        local_model_spec("resnet18-ssl-mini")                        # the file wins
    checkpoint = tmp_path / "mine.pt"
    torch.save(Tiny().state_dict(), checkpoint)
    spec = local_model_spec(checkpoint)
    assert spec is not None and (spec.name, spec.sha256, spec.feature_dim) == ("mine", None, None)
    assert spec.preprocessing == default_preprocessing()
