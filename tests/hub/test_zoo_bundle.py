"""``histohub bundle``: round trip to a fresh, offline machine, verified on arrival."""

from __future__ import annotations

import json

import pytest
import torch

import histohub
from histohub.hub._registry import reload_manifests
from histohub.cli import main
from histohub.errors import HistohubError, LicenceError


@pytest.fixture
def served_model(file_server, tmp_path, monkeypatch):
    """An organisation's non-commercial ResNet18 (extra manifest, unpinned) on 127.0.0.1."""
    from _servers import serve_non_commercial

    manifest = serve_non_commercial(file_server, tmp_path, "org-model", seed=3)
    monkeypatch.setenv("HISTOHUB_MANIFEST", str(manifest))
    reload_manifests()
    yield file_server
    reload_manifests()


def _fresh_offline_machine(tmp_path, monkeypatch, out, *, manifest):
    monkeypatch.setenv("HISTOHUB_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")
    monkeypatch.setenv("HISTOHUB_MIRROR", str(out))
    monkeypatch.setenv("HISTOHUB_MANIFEST", str(manifest))
    reload_manifests()


def test_bundle_round_trips_to_a_fresh_offline_home(served_model, tmp_path, monkeypatch):
    out = tmp_path / "usb"
    assert main(["bundle", "org-model", str(out), "-q"]) == 2  # licence not accepted
    assert served_model.requests == [] and not out.exists()
    assert main(["bundle", "org-model", str(out), "-q", "--accept-licence"]) == 0
    here = histohub.load_pretrained("org-model", progress=False)
    assert "CC-BY-NC-4.0" in (out / "LICENCES" / "org-model.txt").read_text()
    pinned = json.loads((out / "manifest.json").read_text())["models"]["org-model"]
    assert len(pinned["weights"][0]["sha256"]) == 64

    _fresh_offline_machine(tmp_path, monkeypatch, out, manifest=out / "manifest.json")
    with pytest.raises(LicenceError):  # the other machine accepts the licence itself
        histohub.load_pretrained("org-model", progress=False)
    there = histohub.load_pretrained("org-model", accept_licence=True, progress=False)
    assert there.histohub_info.sha256 == pinned["weights"][0]["sha256"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(there(x), here(x))
    assert len(served_model.gets()) == 1  # the one download, on the first machine


def test_a_changed_bundle_copy_is_refused_on_arrival(served_model, tmp_path, monkeypatch):
    out = tmp_path / "usb"
    assert main(["bundle", "org-model", str(out), "-q", "--accept-licence"]) == 0
    [copy] = out.glob("*/org-model.pt")
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    # the original, unpinned manifest: only the bundle's record can catch the change
    original = tmp_path / "org-model_manifest.json"
    _fresh_offline_machine(tmp_path, monkeypatch, out, manifest=original)
    monkeypatch.setenv("HISTOHUB_ACCEPT_LICENCES", "org-model")
    with pytest.raises(HistohubError, match="bundle recorded"):
        histohub.load_pretrained("org-model", progress=False)


def test_bundle_refuses_an_existing_folder(served_model, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["bundle", "org-model", str(tmp_path / "full"), "--accept-licence"]) == 2
    assert (tmp_path / "full" / "x").read_text() == "keep"
    assert served_model.requests == []
