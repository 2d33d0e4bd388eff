"""Shared fixtures: loopback servers, test manifests, checkpoints in the upstream layouts
(random weights, made once per session) and feature files of the real test slide."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from _servers import FileServer, HubServer, model_entry

from histohub.hub import reload_manifests

if TYPE_CHECKING:
    import torch


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    """Retries with millisecond backoff and short timeouts: tests never sleep for long."""
    from histohub.hub import _fetch, _http

    monkeypatch.setattr(_http, "RETRY", _http.RetryPolicy(
        tries=3, base_delay=0.01, max_delay=0.05, timeout=(5.0, 10.0)))
    _fetch._warned_unpinned.clear()


@pytest.fixture(autouse=True)
def _garbage_collector_as_found():
    """``histohub extract`` freezes the garbage collector's view of its process (it owns
    it); run in-process here, that is undone after each test."""
    import gc

    yield
    gc.unfreeze()


@pytest.fixture
def file_server():
    with FileServer() as server:
        yield server


@pytest.fixture
def hub_server():
    with HubServer() as server:
        yield server


# --------------------------------------------------------------------------- manifests


@pytest.fixture
def make_manifest(tmp_path, monkeypatch):
    """``make_manifest({name: [weights items]})`` writes a manifest and points
    HISTOHUB_MANIFEST at it; returns its path."""

    def make(models: dict[str, list[dict]]) -> Path:
        path = tmp_path / "extra_manifest.json"
        data = {"schema_version": 1, "models": {n: model_entry(f) for n, f in models.items()}}
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        monkeypatch.setenv("HISTOHUB_MANIFEST", str(path))
        reload_manifests()
        return path

    return make


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="session")
def backbone_state() -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision ResNet18's state dict, without ``fc``."""
    from checkpoints import encoder_state

    return encoder_state("resnet18")


@pytest.fixture(scope="session")
def resnet18_file(tmp_path_factory, backbone_state) -> Path:
    """``backbone_state`` saved as safetensors: a random ResNet18 file, which ``--model`` and
    ``load_pretrained`` accept as a checkpoint path."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "random_resnet18.safetensors"
    save_file(backbone_state, path)
    return path


def _save_lightning(path: Path, backbone: dict, *, attribute_dict: bool = False,
                    legacy: bool = False) -> Path:
    import torch
    from checkpoints import fake_lightning, lightning_checkpoint

    with fake_lightning():
        torch.save(lightning_checkpoint(backbone, attribute_dict=attribute_dict), path,
                   _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture(scope="session")
def lightning_ckpt(tmp_path_factory, backbone_state) -> Path:
    """``tenpercent_resnet18.ckpt``-like file (zip format, plain-dict hyper-parameters)."""
    return _save_lightning(tmp_path_factory.mktemp("ckpt") / "tenpercent_resnet18.ckpt",
                           backbone_state)


@pytest.fixture(scope="session")
def attribute_dict_ckpt(tmp_path_factory, backbone_state) -> Path:
    """A Lightning checkpoint whose ``hyper_parameters`` is an ``AttributeDict``."""
    return _save_lightning(tmp_path_factory.mktemp("ckpt") / "attribute_dict.ckpt",
                           backbone_state, attribute_dict=True)


@pytest.fixture(scope="session")
def legacy_ckpt(tmp_path_factory, backbone_state) -> Path:
    """The same Lightning layout in the legacy (pre-zip, 2020-era) serialization format."""
    return _save_lightning(tmp_path_factory.mktemp("ckpt") / "_ckpt_epoch_9.ckpt",
                           backbone_state, legacy=True)


@pytest.fixture
def torchvision_features(backbone_state):
    """``f(x)``: features of a torchvision ResNet18 given ``backbone_state`` by hand."""
    import torch
    from checkpoints import reference_encoder

    model = reference_encoder(backbone_state)

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return features


# --------------------------------------------------------------------------- a small disk


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size_bytes)``: a fresh tmpfs of that size mounted in ``tmp_path`` (a
    disk that fills up), or skip when not root or when mounting fails. Its size can be
    changed later with ``resize(path, size_bytes)``; everything is unmounted afterwards."""
    import os
    import subprocess

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(size: int, *, options: str = "") -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs",
                               str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    def resize(folder: Path, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)

    mount.resize = resize
    yield mount
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)]).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)])


# --------------------------------------------------------------------------- feature files


@pytest.fixture(scope="session")
def slide_features(cmu_slide, tmp_path_factory):
    """Colour statistics (mean, std of R, G, B) of every 224 px patch of the real slide, in
    the `histohub extract` layout: clusters follow background, stroma and nuclei."""
    import numpy as np

    pytest.importorskip("h5py")
    from feature_files import PATCH, write_features

    from histohub.slides._reader import open_slide

    folder = tmp_path_factory.mktemp("features")
    with open_slide(cmu_slide) as slide:
        width, height = slide.dimensions
        coords = [(x, y) for y in range(0, height - PATCH + 1, PATCH)
                  for x in range(0, width - PATCH + 1, PATCH)]
        stats = []
        for x, y in coords:
            rgb = slide.read_region((x, y), 0, (PATCH, PATCH)).astype(np.float32) / 255
            stats.append(np.r_[rgb.mean((0, 1)), rgb.std((0, 1))])
    return write_features(folder / "cmu.h5", np.array(stats), np.array(coords),
                          slide_path=str(cmu_slide), patch_size_level0=PATCH)
