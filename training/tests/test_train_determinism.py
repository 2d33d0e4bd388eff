"""Same seed, same thread count: two training runs give bit-identical weights, with the
augmentations in a DataLoader worker; the run records its thread count, and the export
carries it into the manifest's recipe and leaves the name out of the weights' bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import export
from histohub_training.simclr.checkpoint import load_checkpoint
from histohub_training.simclr.config import load_config
from histohub_training.simclr.train import train


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """32 textured 40 px tiles (no shared data needed)."""
    folder = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    for i in range(32):
        yy, xx = np.mgrid[0:40, 0:40] / 40
        wave = np.sin(2 * np.pi * rng.uniform(1, 6) * (xx if i % 2 else yy))[..., None]
        pixels = np.clip(rng.uniform(0, 255, 3) + 60 * wave + rng.normal(0, 10, (40, 40, 3)),
                         0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"tile{i:02d}.png")
    return folder


def _run(tiles: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    """A smoke run (2 epochs x 4 steps, augmentation in one loader worker, 1 thread)."""
    config = load_config("smoke", [f"data.datasets={json.dumps([str(tiles)])}",
                                   "data.num_workers=1", "threads=1", *extra])
    train(config, out, progress=False)
    return load_checkpoint(out / "checkpoint.pt")["model"]


@pytest.mark.slow
def test_two_smoke_runs_give_identical_state_dicts(tiles, tmp_path):
    first = _run(tiles, tmp_path / "a")
    second = _run(tiles, tmp_path / "b")
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert different == []
    # the comparison can fail: another seed moves the weights
    other = _run(tiles, tmp_path / "c", "seed=1")
    assert not torch.equal(first["backbone.conv1.weight"], other["backbone.conv1.weight"])
    # the run recorded what a bit-identical rerun must match, and restored torch's settings
    recorded = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["environment"]
    assert recorded["threads"] == 1 and recorded["deterministic_algorithms"] is True
    assert recorded["torch"] == torch.__version__
    assert not torch.are_deterministic_algorithms_enabled()
    # the export carries seed and threads into the recipe; the name is not in the bytes
    one = export.export(tmp_path / "a" / "checkpoint.pt", name="run-a", out=tmp_path / "ea")
    two = export.export(tmp_path / "b" / "checkpoint.pt", name="run-b", out=tmp_path / "eb")
    assert one["recipe"]["threads"] == 1 and one["recipe"]["seed"] == 0
    assert one["weights"][0]["sha256"] == two["weights"][0]["sha256"]


def test_threads_must_be_a_positive_count():
    with pytest.raises(ValueError, match="threads=0"):
        load_config("smoke", ["threads=0"])
    assert load_config("cpu_resnet18").threads == 2


def test_export_bytes_do_not_depend_on_the_process():
    """safetensors writes several metadata keys in a per-process hash order (two keys gave
    two sha256 for one model); the export writes one key, so every process writes the same
    bytes for the same tensors."""
    import os
    import subprocess
    import sys

    code = ("import hashlib, torch, export; print(hashlib.sha256(export._serialize("
            "{'a': torch.ones(2), 'b': torch.zeros(3)}, export.weights_metadata('resnet18', "
            "4))).hexdigest())")
    training = Path(export.__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(training), str(training.parent)])}
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env=env).stdout.strip()
               for _ in range(4)}
    assert len(digests) == 1 and len(digests.pop()) == 64
