"""Architectures of the encoder zoo: timm Vision Transformers, declared as code.

Each name in ``ZOO_ARCHS`` is one timm ``VisionTransformer`` configuration (patch size,
width, depth, register tokens, SwiGLU, LayerScale), written down once here from the
authors' own loading code (TRIDENT's ``patch_encoder_models/load.py``, kaiko's and Lunit's
``hubconf``/README, the model cards). A manifest entry names one with ``"arch"``; its
weights are data, mapped onto the architecture by ``key_maps``. The ResNet50 of Lunit is
``models.build_encoder("resnet50")`` (torchvision names, the classifier removed).

``pooling`` (the manifest's ``"pooling"``) says what the encoder returns:

- ``"cls"``: the class token after the final norm, ``(B, D)``;
- ``"cls+mean"``: the class token and the mean of the patch tokens (registers left out),
  concatenated, ``(B, 2D)``, as Virchow's authors recommend.

Reading this module imports neither torch nor timm: both are imported when an encoder is
built (timm is in the ``hub`` extra).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

#: What a zoo ViT can return (the manifest's ``pooling``).
POOLINGS = ("cls", "cls+mean")


@dataclass(frozen=True)
class VitSpec:
    """A timm ViT configuration: ``timm.create_model(timm_name, **kwargs)`` with no classifier.

    ``embed_dim`` is the token width (the CLS feature dimension); ``reg_tokens`` the
    register tokens between the class token and the patch tokens. ``mlp`` is ``"swiglu"``
    for timm's ``SwiGLUPacked`` with SiLU (Virchow2, UNI2-h), else ``"gelu"``.
    """

    timm_name: str
    embed_dim: int
    patch_size: int
    img_size: int
    kwargs: tuple[tuple[str, Any], ...] = ()
    reg_tokens: int = 0
    mlp: str = "gelu"
    source: str = ""

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` (no classifier, CLS pooling)."""
        kwargs = {"num_classes": 0, "global_pool": "token", "img_size": self.img_size,
                  "dynamic_img_size": True, **dict(self.kwargs)}
        if self.reg_tokens:
            kwargs["reg_tokens"] = self.reg_tokens
        if self.mlp == "swiglu":
            import torch.nn
            from timm.layers import SwiGLUPacked

            kwargs.update(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
        return kwargs


_TRIDENT = "TRIDENT trident/patch_encoder_models/load.py"
_LS = (("init_values", 1e-5),)

#: Architecture name -> its timm configuration.
ZOO_ARCHS: dict[str, VitSpec] = {
    "vit-t16": VitSpec("vit_tiny_patch16_224", 192, 16, 224,
                       source="timm vit_tiny_patch16_224 (for one's own small models and "
                              "histohub's tests; no upstream zoo entry uses it)"),
    "vit-s16": VitSpec("vit_small_patch16_224", 384, 16, 224,
                       source="Lunit README (VisionTransformer(patch_size=16, embed_dim=384, "
                              "num_heads=6)); kaiko hubconf vits16"),
    "vit-s8": VitSpec("vit_small_patch8_224", 384, 8, 224,
                      source="Lunit README (patch_size=8); kaiko hubconf vits8"),
    "vit-b16": VitSpec("vit_base_patch16_224", 768, 16, 224,
                       source="kaiko hubconf vitb16; Phikon: transformers ViT-B/16 config"),
    "vit-b8": VitSpec("vit_base_patch8_224", 768, 8, 224, source="kaiko hubconf vitb8"),
    "vit-l14-reg4-dinov2-518": VitSpec(
        "vit_large_patch14_reg4_dinov2", 1024, 14, 518, reg_tokens=4,
        source="kaiko hubconf vitl14 (built at timm's default 518 px; run at 224 px with "
               "interpolated position embeddings, as kaiko's README and TRIDENT do)"),
    "vit-l16-ls": VitSpec("vit_large_patch16_224", 1024, 16, 224, _LS,
                          source=f"{_TRIDENT} UNIInferenceEncoder; Phikon-v2 (DINOv2 ViT-L/16)"),
    "vit-l14-dinov2": VitSpec("vit_large_patch14_dinov2", 1024, 14, 224, _LS,
                              source=f"{_TRIDENT} GPFMInferenceEncoder"),
    "vit-h14-reg8-swiglu": VitSpec(
        "vit_giant_patch14_224", 1536, 14, 224,
        (("patch_size", 14), ("depth", 24), ("num_heads", 24), ("init_values", 1e-5),
         ("embed_dim", 1536), ("mlp_ratio", 2.66667 * 2), ("no_embed_class", True)),
        reg_tokens=8, mlp="swiglu", source=f"{_TRIDENT} UNIv2InferenceEncoder"),
    "vit-h14-reg4-swiglu": VitSpec(
        "vit_huge_patch14_224", 1280, 14, 224,
        (("init_values", 1e-5), ("mlp_ratio", 5.3375)), reg_tokens=4, mlp="swiglu",
        source=f"{_TRIDENT} Virchow2InferenceEncoder; paige-ai/Virchow2 card"),
    "vit-g14-reg4-dinov2": VitSpec("vit_giant_patch14_reg4_dinov2", 1536, 14, 224, _LS,
                                   reg_tokens=4,
                                   source=f"{_TRIDENT} HOptimus0/1InferenceEncoder"),
    "vit-g16-gigapath": VitSpec(
        "vit_giant_patch14_dinov2", 1536, 16, 224,
        (("patch_size", 16), ("embed_dim", 1536), ("depth", 40), ("num_heads", 24),
         ("mlp_ratio", 5.33334)),
        source=f"{_TRIDENT} GigaPathInferenceEncoder (timm_kwargs of the local load)"),
}


def feature_dim(arch: str, pooling: str) -> int:
    """The feature dimension of ``arch`` returning ``pooling``."""
    width = ZOO_ARCHS[arch].embed_dim
    return 2 * width if pooling == "cls+mean" else width


def build_vit(arch: str, *, pooling: str = "cls") -> nn.Module:
    """A randomly initialised zoo ViT: ``(B, 3, S, S) -> (B, feature_dim(arch, pooling))``.

    Built with ``dynamic_img_size``, so an input of another size than the configuration's
    (a multiple of the patch size) interpolates the position embeddings. Call it under
    ``torch.device("meta")`` to build without memory or initialisation.
    """
    from histohub.errors import require

    timm = require("timm", extra="hub", purpose="Zoo Vision Transformers")
    if arch not in ZOO_ARCHS:
        raise ValueError(f"Unknown zoo architecture {arch!r}; choose one of {sorted(ZOO_ARCHS)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    spec = ZOO_ARCHS[arch]
    model = timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs())
    if pooling == "cls+mean":
        model.global_pool = ""  # forward_head then sees every token: (B, T, D)
        model.head = ClsMeanHead(model.num_prefix_tokens)
    return model


def _head_class() -> type:
    from torch import nn

    class ClsMeanHeadImpl(nn.Module):
        """``(B, T, D)`` tokens -> ``(B, 2D)``: the class token and the mean of the patch
        tokens (the ``num_prefix`` class and register tokens left out of the mean).
        No parameters: the encoder's ``state_dict`` is timm's unchanged."""

        def __init__(self, num_prefix: int) -> None:
            super().__init__()
            self.num_prefix = num_prefix

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            import torch

            return torch.cat([tokens[:, 0], tokens[:, self.num_prefix:].mean(dim=1)], dim=-1)

    return ClsMeanHeadImpl


def ClsMeanHead(num_prefix: int) -> nn.Module:  # noqa: N802 (a class, built lazily)
    """The ``cls+mean`` head (see :func:`_head_class`)."""
    return _cls_mean_head()(num_prefix)


@functools.lru_cache(maxsize=1)
def _cls_mean_head() -> type:
    return _head_class()


def vit_shapes(arch: str) -> dict[str, torch.Size]:
    """``{key: shape}`` of ``arch``'s ``state_dict``, built on the meta device, once."""
    return dict(_vit_shapes(arch))


@functools.lru_cache(maxsize=None)
def _vit_shapes(arch: str) -> tuple[tuple[str, Any], ...]:
    import torch

    with torch.device("meta"):
        return tuple((k, v.shape) for k, v in build_vit(arch).state_dict().items())


def parameter_count(arch: str) -> int:
    """Number of parameters of ``arch`` (counted on the meta device)."""
    import math

    return sum(math.prod(shape) for shape in vit_shapes(arch).values())

