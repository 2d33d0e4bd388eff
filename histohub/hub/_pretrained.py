"""``load_pretrained``: a model name (or a local checkpoint) -> an eval-mode encoder.

Which of the two a string is, and what is known of the model before its weights are read,
is ``_descriptor``'s job (``describe_model``). Where the weights come from (cache, mirror,
URL, Hugging Face) is ``_fetch``'s job; how they are read and mapped is ``_checkpoint``'s.
This module joins them, and checks the manifest's fingerprint (one tensor's L2 norm) on the
assembled encoder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from histohub.hub._checkpoint import DEFAULT_KEY_MAP, map_state_dict, read_checkpoint
from histohub.hub._fetch import fetch_weights
from histohub.hub._verify import sha256_file
from histohub.hub._descriptor import ModelDescriptor, describe_model
from histohub.hub._registry import default_model
from histohub.hub._schema import KeyMap, WeightsFile
from histohub.errors import FingerprintError, KeyMappingError
from histohub.hub._archs import FEATURE_DIMS, build_encoder, encoder_shapes
from histohub.hub._licences import check_accepted
from histohub.hub._zoo_archs import ZOO_ARCHS, build_vit, vit_shapes

#: The model the packaged manifest marks ``"default": true``.
DEFAULT_MODEL = default_model()


def load_pretrained(model: str | os.PathLike = DEFAULT_MODEL, *, arch: str | None = None,
                    pretrained: bool = True, device: str | torch.device = "cpu",
                    progress: bool = True, accept_licence: bool = False) -> nn.Module:
    """An eval-mode encoder ``(B, 3, 224, 224) -> (B, feature_dim)`` with verified weights.

    Args:
        model: a manifest name (``histohub.list_models()``) or a local checkpoint path
            (safetensors, state dict or Lightning ``.ckpt``). An existing file always means
            the file, even when its name is also a model name (a warning says so); the
            rule is ``describe_model``'s.
        arch: for a path, the architecture (None: inferred when exactly one fits the
            keys); for a name, it must be the manifest's.
        pretrained: False gives the same architecture randomly initialised (names only).
        device: where the encoder is placed.
        progress: show download progress bars.
        accept_licence: accept a non-commercial or gated model's licence (remembered in
            ``HISTOHUB_HOME``; see ``histohub.licences``).

    Returns:
        The encoder in eval mode, carrying ``model.histohub_info``: its ``ModelDescriptor``
        (name, arch, feature_dim, sha256 and path of the weights read, preprocessing).

    Raises:
        UnknownModelError: neither a file nor a known name (close names listed).
        InputNotFoundError: a checkpoint path that is missing or a folder.
        FingerprintError: the manifest's fingerprint does not match the weights.
        LicenceError: before any download, a restricted licence has not been accepted.
    """
    described = describe_model(model, arch=arch)
    encoder = load_described(described, pretrained=pretrained, progress=progress,
                             accept_licence=accept_licence)
    return encoder.to(device).eval()


def load_described(described: ModelDescriptor, *, pretrained: bool = True,
                   progress: bool = True, accept_licence: bool = False) -> nn.Module:
    """The encoder ``described`` (``describe_model``'s result), its ``histohub_info`` the
    descriptor with the weights' architecture, sha256 and file filled in. A manifest
    model's licence is checked (``check_accepted``) before any download."""
    if not pretrained:
        if described.is_file:
            raise ValueError("pretrained=False with a checkpoint path makes no sense; pass a "
                             "model name or an architecture name instead")
        encoder = _build(described.arch, described.entry.pooling)
        info = replace(described, sha256=None, weights_path=None)  # random weights
    else:
        info, state, file = read_weights(described, progress=progress,
                                         accept_licence=accept_licence)
        pooling = described.entry.pooling if described.entry is not None else None
        encoder = _assemble(info.arch, state, pooling=pooling)
        if file is not None:
            _check_fingerprint(info.name, file, encoder)
    encoder.histohub_info = info
    return encoder


def read_weights(described: ModelDescriptor, *, progress: bool = True,
                 accept_licence: bool = False
                 ) -> tuple[ModelDescriptor, dict[str, torch.Tensor], WeightsFile | None]:
    """Read the weights ``described`` (for a name: its licence checked, then fetched and
    verified) and map their keys.

    Returns:
        The descriptor filled in (``loaded``: architecture, sha256, weights path), the
        backbone's tensors by ``state_dict`` key, and the manifest's ``WeightsFile`` read
        (None for a checkpoint file).
    """
    if described.entry is None:
        checkpoint = read_checkpoint(described.file)
        archs = [described.arch] if described.arch else None
        arch, state = fit_architecture(checkpoint, archs=archs, what=str(described.file))
        info = described.loaded(arch=arch, sha256=sha256_file(described.file),
                                weights_path=str(described.file))
        return info, state, None
    entry = described.entry
    check_accepted(entry, accept_now=accept_licence)   # before any request
    fetched = fetch_weights(entry, progress=progress)
    checkpoint = read_checkpoint(fetched.path, format=fetched.file.format)
    if entry.is_zoo:
        arch = entry.arch
        state = map_state_dict(checkpoint, fetched.file.key_map, vit_shapes(arch))
    else:
        arch, state = fit_architecture(checkpoint, key_map=fetched.file.key_map,
                                       archs=[entry.arch])
    info = described.loaded(arch=arch, sha256=fetched.sha256, weights_path=str(fetched.path))
    return info, state, fetched.file


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
