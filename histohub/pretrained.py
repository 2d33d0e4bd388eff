"""``load_pretrained``: a model name (or a local checkpoint) -> an eval-mode encoder.

Where the weights come from (cache, mirror, URL, Hugging Face) is ``_download``'s job;
how they are read and mapped is ``_checkpoint``'s. This module joins them, and checks the
manifest's fingerprint (one tensor's L2 norm) on the assembled encoder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._checkpoint import DEFAULT_KEY_MAP, map_state_dict, read_checkpoint
from ._manifest import KeyMap, ModelEntry, Preprocessing, WeightsFile, get_entry, load_manifest
from .errors import FingerprintError, KeyMappingError, UnknownModelError
from .models import FEATURE_DIMS, build_encoder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "resnet18-ssl"


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded encoder is: attached to it as ``model.histohub_info``."""

    name: str
    arch: str
    feature_dim: int
    sha256: str | None
    weights_path: str | None
    preprocessing: Preprocessing | None


def load_pretrained(model: str | os.PathLike = DEFAULT_MODEL, *, arch: str | None = None,
                    pretrained: bool = True, device: str | torch.device = "cpu",
                    progress: bool = True) -> nn.Module:
    """An eval-mode encoder ``(B, 3, 224, 224) -> (B, feature_dim)`` with verified weights.

    ``model``: a manifest name (``histohub.list_models()``) or a local checkpoint path
    (safetensors, state dict or Lightning ``.ckpt``); for a path, ``arch`` names the
    architecture, or is inferred when exactly one architecture fits the keys. An existing
    file always means the file, even when its name is also a model name (a warning says
    so). ``pretrained=False`` gives the same architecture randomly initialised.
    The result carries ``model.histohub_info`` (name, arch, sha256, preprocessing).
    Raises FingerprintError when the manifest's fingerprint does not match the weights.
    """
    name = os.fspath(model)
    entries = load_manifest()
    path = Path(name).expanduser()
    if path.is_file():
        if name in entries:
            logger.warning("%r is both a model name and the file %s; loading the file (pass "
                           "another path to the file, or move it, to load the model)",
                           name, path.resolve())
        encoder, info = _from_path(path, arch=arch, pretrained=pretrained)
    elif name in entries:
        entry = entries[name]
        if arch is not None and arch != entry.arch:
            raise ValueError(f"{name!r} is a {entry.arch}; drop arch={arch!r} or pass "
                             f"arch={entry.arch!r}")
        encoder, info = _from_entry(entry, pretrained=pretrained, progress=progress)
    else:
        raise UnknownModelError(name, entries)
    encoder.histohub_info = info
    return encoder.to(device).eval()


def _from_entry(entry: ModelEntry, *, pretrained: bool, progress: bool):
    if not pretrained:
        info = ModelInfo(entry.name, entry.arch, entry.feature_dim, None, None,
                         entry.preprocessing)
        return build_encoder(entry.arch), info
    from ._download import fetch_weights

    fetched = fetch_weights(entry, progress=progress)
    checkpoint = read_checkpoint(fetched.path, format=fetched.file.format)
    encoder = _assemble(entry.arch, checkpoint, fetched.file.key_map)
    _check_fingerprint(entry.name, fetched.file, encoder)
    info = ModelInfo(entry.name, entry.arch, entry.feature_dim, fetched.sha256,
                     str(fetched.path), entry.preprocessing)
    return encoder, info


def _from_path(path: Path, *, arch: str | None, pretrained: bool):
    if not pretrained:
        raise ValueError("pretrained=False with a checkpoint path makes no sense; pass a "
                         "model name or an architecture name instead")
    checkpoint = read_checkpoint(path)
    archs = [arch] if arch else list(FEATURE_DIMS)
    errors = {}
    for candidate in archs:
        try:
            encoder = _assemble(candidate, checkpoint, DEFAULT_KEY_MAP)
        except KeyMappingError as error:
            errors[candidate] = error
            continue
        from ._download import sha256_file

        info = ModelInfo(path.stem, candidate, FEATURE_DIMS[candidate], sha256_file(path),
                         str(path), _default_preprocessing())
        return encoder, info
    if arch:
        raise errors[arch]
    raise KeyMappingError(f"{path} fits none of {archs}; pass arch= to see which keys are "
                          "missing or unexpected for the architecture you expect")


def _assemble(arch: str, checkpoint: dict, key_map: KeyMap) -> nn.Module:
    """Build ``arch`` on the meta device and assign the mapped tensors (no random init)."""
    with torch.device("meta"):
        encoder = build_encoder(arch)
    expected = {k: v.shape for k, v in encoder.state_dict().items()}
    state = map_state_dict(checkpoint, key_map, expected)
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder


def _check_fingerprint(name: str, file: WeightsFile, encoder: nn.Module) -> None:
    """Compare the L2 norm of the fingerprinted tensor with the manifest's, within rtol:
    one norm catches the wrong file and a key map that filled the wrong tensors."""
    fingerprint = file.fingerprint
    if fingerprint is None:
        return
    state = encoder.state_dict()
    if fingerprint.tensor not in state:
        raise FingerprintError(f"{name}: the manifest's fingerprint names {fingerprint.tensor!r}, "
                               f"which a {type(encoder).__name__} does not have; fix "
                               "fingerprint.tensor in the manifest")
    norm = float(torch.linalg.vector_norm(state[fingerprint.tensor].detach().double()))
    if abs(norm - fingerprint.l2_norm) <= fingerprint.rtol * fingerprint.l2_norm:
        return
    origin = ("measured by histohub" if fingerprint.verified
              else "reported, not verified by histohub")
    raise FingerprintError(
        f"{name}: the loaded {fingerprint.tensor} has L2 norm {norm:.2f}, but the manifest "
        f"expects {fingerprint.l2_norm:g} within {fingerprint.rtol:.0%} ({origin}"
        f"{': ' + fingerprint.note if fingerprint.note else ''}) for {file.filename}. "
        "Either the file is not the released one, or the key map fills the wrong tensors. "
        "If the file and key map are right, correct the fingerprint in the manifest.")


def _default_preprocessing() -> Preprocessing:
    """Local checkpoints are assumed to follow the paper's preprocessing (resnet18-ssl's)."""
    return get_entry(DEFAULT_MODEL).preprocessing
