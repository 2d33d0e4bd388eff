"""``load_pretrained``: a model name (or a local checkpoint) -> an eval-mode encoder.

Where the weights come from (cache, mirror, URL, Hugging Face) is ``_fetch``'s job;
how they are read and mapped is ``_checkpoint``'s. This module joins them, and checks the
manifest's fingerprint (one tensor's L2 norm) on the assembled encoder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from histohub.hub._checkpoint import DEFAULT_KEY_MAP, map_state_dict, read_checkpoint
from histohub.hub._fetch import fetch_weights
from histohub.hub._verify import sha256_file
from histohub.hub._registry import default_model, get_entry, load_manifest
from histohub.hub._schema import KeyMap, ModelEntry, Preprocessing, WeightsFile
from histohub.errors import FingerprintError, KeyMappingError, UnknownModelError
from histohub.hub._archs import FEATURE_DIMS, build_encoder, encoder_shapes
from histohub.hub._licences import check_accepted
from histohub.hub._zoo_archs import ZOO_ARCHS, build_vit, vit_shapes

logger = logging.getLogger(__name__)

#: The model the packaged manifest marks ``"default": true``.
DEFAULT_MODEL = default_model()


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
                    progress: bool = True, accept_licence: bool = False) -> nn.Module:
    """An eval-mode encoder ``(B, 3, 224, 224) -> (B, feature_dim)`` with verified weights.

    ``model``: a manifest name (``histohub.list_models()``) or a local checkpoint path
    (safetensors, state dict or Lightning ``.ckpt``); for a path, ``arch`` names the
    architecture, or is inferred when exactly one architecture fits the keys. An existing
    file always means the file, even when its name is also a model name (a warning says
    so). ``pretrained=False`` gives the same architecture randomly initialised.
    The result carries ``model.histohub_info`` (name, arch, sha256, preprocessing).
    ``accept_licence``: accept a non-commercial or gated model's licence (remembered in
    ``HISTOHUB_HOME``; see ``histohub.licences``).
    Raises FingerprintError when the manifest's fingerprint does not match the weights;
    LicenceError, before any download, when a restricted licence has not been accepted.
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
        if pretrained:
            check_accepted(entry, accept_now=accept_licence)
        encoder, info = _from_entry(entry, pretrained=pretrained, progress=progress)
    else:
        raise UnknownModelError(name, entries)
    encoder.histohub_info = info
    return encoder.to(device).eval()


def _from_entry(entry: ModelEntry, *, pretrained: bool, progress: bool):
    if not pretrained:
        info = ModelInfo(entry.name, entry.arch, entry.feature_dim, None, None,
                         entry.preprocessing)
        return _build(entry.arch, entry.pooling), info
    fetched = fetch_weights(entry, progress=progress)
    checkpoint = read_checkpoint(fetched.path, format=fetched.file.format)
    if entry.is_zoo:
        state = map_state_dict(checkpoint, fetched.file.key_map, vit_shapes(entry.arch))
    else:
        _, state = fit_architecture(checkpoint, key_map=fetched.file.key_map,
                                    archs=[entry.arch])
    encoder = _assemble(entry.arch, state, pooling=entry.pooling)
    _check_fingerprint(entry.name, fetched.file, encoder)
    info = ModelInfo(entry.name, entry.arch, entry.feature_dim, fetched.sha256,
                     str(fetched.path), entry.preprocessing)
    return encoder, info


def _from_path(path: Path, *, arch: str | None, pretrained: bool):
    if not pretrained:
        raise ValueError("pretrained=False with a checkpoint path makes no sense; pass a "
                         "model name or an architecture name instead")
    checkpoint = read_checkpoint(path)
    arch, state = fit_architecture(checkpoint, archs=[arch] if arch else None, what=str(path))
    info = ModelInfo(path.stem, arch, FEATURE_DIMS[arch], sha256_file(path), str(path),
                     _default_preprocessing())
    return _assemble(arch, state), info


def fit_architecture(checkpoint: Mapping, *, key_map: KeyMap = DEFAULT_KEY_MAP,
                     archs: Sequence[str] | None = None, what: str = "The checkpoint"
                     ) -> tuple[str, dict[str, torch.Tensor]]:
    """The first of ``archs`` (default: every architecture in ``FEATURE_DIMS``) whose
    ``state_dict`` ``checkpoint`` fills exactly under ``key_map``, and the mapped tensors.

    One candidate: its KeyMappingError (naming missing, unexpected and mis-shaped keys) is
    raised as it is. Several, none fitting: KeyMappingError saying to name the one expected
    (``what`` names the checkpoint in that message).
    """
    candidates = list(archs) if archs else list(FEATURE_DIMS)
    unknown = [a for a in candidates if a not in FEATURE_DIMS]
    if unknown:
        raise KeyMappingError(f"Unknown architecture {unknown[0]!r}; choose one of "
                              f"{sorted(FEATURE_DIMS)}")
    errors = {}
    for candidate in candidates:
        try:
            return candidate, map_state_dict(checkpoint, key_map, encoder_shapes(candidate))
        except KeyMappingError as error:
            errors[candidate] = error
    if len(candidates) == 1:
        raise errors[candidates[0]]
    raise KeyMappingError(f"{what} fits none of {candidates}; name the architecture you "
                          "expect (arch=, or --arch) to see which keys are missing or "
                          "unexpected for it")


def _build(arch: str, pooling: str | None) -> nn.Module:
    """A zoo ViT (``zoo_archs``) or a torchvision ResNet encoder, randomly initialised."""
    if arch in ZOO_ARCHS:
        return build_vit(arch, pooling=pooling or "cls")
    return build_encoder(arch)


def _assemble(arch: str, state: Mapping[str, torch.Tensor], *, pooling: str | None = None
              ) -> nn.Module:
    """Build ``arch`` on the meta device and assign the mapped tensors (no random init)."""
    with torch.device("meta"):
        encoder = _build(arch, pooling)
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
