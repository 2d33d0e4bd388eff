"""One strict key map per upstream checkpoint layout, onto timm's ViT names.

A manifest file's ``key_map.layout`` names one of ``LAYOUTS``; ``_checkpoint.map_state_dict``
applies it after the key map's prefixes and drops, and then checks that the result fills
the architecture exactly (names and shapes). A key a layout does not know passes through
unchanged, so it is reported as unexpected: nothing is silently ignored.

- ``timm``: timm's own names (kaiko's ``.pth``, Lunit's DINO ``.torch``, the ``hf-hub``
  timm repositories of UNI, Virchow2, H-optimus, Prov-GigaPath): the identity.
- ``hf_vit``: ``transformers`` ``ViTModel`` (owkin/phikon): query, key and value Linear
  layers are stacked into timm's ``qkv``.
- ``hf_dinov2``: ``transformers`` ``Dinov2Model`` (owkin/phikon-v2): as ``hf_vit``, plus
  LayerScale (``lambda1`` -> ``gamma``). Registers and SwiGLU (``Dinov2WithRegisters``,
  ``weights_in``/``weights_out``) are not mapped: no zoo entry needs them, so such a file
  is refused by the strict check rather than guessed at.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")

_HF_VIT_BLOCK = {
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "attention.output.dense.": "attn.proj.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
}
_HF_DINOV2_BLOCK = {
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "attention.output.dense.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
_HF_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_QKV = re.compile(r"^attention\.attention\.(query|key|value)\.(weight|bias)$")


def _identity(state: Mapping[str, Any]) -> dict[str, Any]:
    return dict(state)


def _hf_to_timm(state: Mapping[str, Any], block_names: Mapping[str, str]) -> dict[str, Any]:
    """Rename a transformers ViT/DINOv2 state dict to timm's names, stacking q, k, v."""
    import torch

    out: dict[str, Any] = {}
    qkv: dict[tuple[int, str], dict[str, Any]] = {}
    for key, value in state.items():
        if key in _HF_EMBEDDINGS:
            out[_HF_EMBEDDINGS[key]] = value
            continue
        layer = _LAYER.match(key)
        if layer is None:
            out[key] = value  # unknown: reported as unexpected by the strict check
            continue
        index, rest = int(layer.group(1)), layer.group(2)
        found = _QKV.match(rest)
        if found:
            qkv.setdefault((index, found.group(2)), {})[found.group(1)] = value
            continue
        for old, new in block_names.items():
            if rest.startswith(old):
                out[f"blocks.{index}.{new}{rest[len(old):]}"] = value
                break
        else:
            out[key] = value
    for (index, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            for name, value in parts.items():  # incomplete: left for the strict check
                out[f"encoder.layer.{index}.attention.attention.{name}.{kind}"] = value
            continue
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def _hf_vit(state: Mapping[str, Any]) -> dict[str, Any]:
    return _hf_to_timm(state, _HF_VIT_BLOCK)


def _hf_dinov2(state: Mapping[str, Any]) -> dict[str, Any]:
    return _hf_to_timm(state, _HF_DINOV2_BLOCK)


#: Layout name -> function renaming a checkpoint's tensors to timm's names.
LAYOUTS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "timm": _identity,
    "hf_vit": _hf_vit,
    "hf_dinov2": _hf_dinov2,
}


def apply_layout(layout: str | None, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` renamed by ``layout`` (None: unchanged)."""
    if layout is None:
        return dict(state)
    return LAYOUTS[layout](state)
