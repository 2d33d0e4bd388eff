"""Training checkpoints: written atomically, read as data, with every RNG state.

A checkpoint holds the model (unwrapped: ``backbone.*`` + ``projection_head.*``), the
optimizer, scheduler and gradient-scaler states, the number of finished epochs and the
random states of python, numpy and torch (CPU and CUDA) of every process, so ``--resume``
continues as if the run had not stopped. It is read with ``torch.load(weights_only=True)``:
nothing in it is code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histohub.files import atomic_path

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """This process's random states as plain data (lists and tensors)."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(numpy_state[1].astype(np.int64)),
                  "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                  "cached_gaussian": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["key"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """``torch.save`` atomically: a crash while writing leaves the previous checkpoint
    intact."""
    with atomic_path(path) as temporary:
        torch.save({"format_version": FORMAT_VERSION, **payload}, temporary)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                    ) -> dict[str, Any]:
    """Read a training checkpoint as data (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: nothing to resume (run without "
                                "--resume to start, or point --out at the run's folder)")
    data = torch.load(path, map_location=map_location, weights_only=True)
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a training checkpoint of this version "
                         f"(format_version {data.get('format_version')!r})")
    return data
