"""histohub's own bundled model, through every front door, offline, sha256 checked.

The weights ship inside the package (``histohub/weights/``, a ``package`` source in the
manifest): no network, no cache, no setting. Each door must give the same features.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import histohub
from histohub.hub import _registry as _manifest

REPO = Path(__file__).resolve().parents[2]
NAME = "resnet18-ssl-mini"
SHARED_SLIDES = REPO.parent / "shared" / "data" / "slides"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")
    monkeypatch.setenv("HISTOHUB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HISTOHUB_MANIFEST", raising=False)
    monkeypatch.delenv("HISTOHUB_MIRROR", raising=False)
    _manifest._load_all.cache_clear()
    yield
    _manifest._load_all.cache_clear()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_the_shipped_file_is_the_one_the_manifest_pins():
    entry = histohub.get_entry(NAME)
    weights, = entry.weights
    path = weights.sources[0].package_path
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == weights.sha256 and len(data) == weights.size
    assert len(data) <= 25 * 2**20 and weights.format == "safetensors"
    assert entry.preprocessing.input_size == 64 and entry.preprocessing.mpp


def test_load_pretrained_offline_verified_and_deterministic(batch, tmp_path):
    model = histohub.load_pretrained(NAME)
    info = model.histohub_info
    assert info.sha256 == histohub.get_entry(NAME).weights[0].sha256
    assert not model.training and not (tmp_path / "home").exists()   # nothing cached
    with torch.inference_mode():
        features = model(batch)
        assert features.shape == (3, 512) and torch.isfinite(features).all()
        assert torch.equal(features, histohub.load_pretrained(NAME)(batch))


def test_torch_hub_local_gives_the_same_features(batch):
    hub = torch.hub.load(str(REPO), NAME.replace("-", "_"), source="local")
    with torch.inference_mode():
        assert torch.equal(hub(batch), histohub.load_pretrained(NAME)(batch))
    transform = torch.hub.load(str(REPO), "get_transform", NAME, source="local")
    from PIL import Image
    image = Image.fromarray(np.full((150, 150, 3), 200, np.uint8))
    assert transform(image).shape == (3, 64, 64)


def test_its_fingerprint_is_verified_and_it_is_not_a_random_initialisation():
    """The entry carries a measured conv1 norm (checked at every load). The weights were
    trained: conv1 is at least 10% (relative L2) away from torchvision's initialisation
    under seeds 0-4, seed 0 being the one training started from (measured 17%; about 140%
    from the others). A short run moves the norm itself little, so distance is the test."""
    from histohub.hub._archs import build_encoder

    fingerprint = histohub.get_entry(NAME).weights[0].fingerprint
    assert fingerprint.verified and fingerprint.tensor == "conv1.weight"
    loaded = histohub.load_pretrained(NAME).conv1.weight.detach()
    assert loaded.norm().item() == pytest.approx(fingerprint.l2_norm, rel=fingerprint.rtol)
    for seed in range(5):
        torch.manual_seed(seed)
        initial = build_encoder("resnet18").conv1.weight.detach()
        assert ((loaded - initial).norm() / initial.norm()).item() > 0.1, seed


@pytest.mark.skipif(not (SHARED_SLIDES / "cmu_small_region.svs").is_file(),
                    reason="../shared/data/slides absent")
def test_histohub_extract_runs_offline_with_the_bundled_model(tmp_path):
    from histohub.featurefile._layout import read_features

    out = tmp_path / "features"
    result = subprocess.run(
        [sys.executable, "-m", "histohub", "extract", str(SHARED_SLIDES / "cmu_small_region.svs"),
         "--model", NAME, "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "HISTOHUB_OFFLINE": "1",
             "HISTOHUB_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    features = read_features(out / "cmu_small_region.h5")
    assert features["features"].shape[1] == 512 and len(features["features"]) > 10
    assert features["attrs"]["model_sha256"] == histohub.get_entry(NAME).weights[0].sha256
