"""Proof of the zoo's key maps, offline, on checkpoints written by the upstream libraries.

Tiny layouts: a checkpoint written by timm (``torch.save`` of ``state_dict()``, as kaiko and
Lunit ship theirs), and by ``transformers`` ``save_pretrained`` (ViTModel as owkin/phikon,
Dinov2Model as owkin/phikon-v2), loaded through histohub's manifest path (``file://``
source, verification, strict key map), gives features within 1e-5 of the upstream
library's own loading of the same file.

Full size: every zoo entry's real upstream layout, generated on the meta device by the
upstream library from the configuration its authors' loading code uses (transcribed below
from TRIDENT, kaiko's hubconf, Lunit's README, the transformers configs), is filled
exactly, name and shape, by the entry's key map onto histohub's architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import histohub
from histohub.hub import _zoo_archs as zoo_archs
from histohub.hub._checkpoint import map_state_dict
from histohub.hub._registry import load_manifest, reload_manifests
from histohub.hub._archs import encoder_shapes
from histohub.hub._zoo_archs import VitSpec, vit_shapes

timm = pytest.importorskip("timm")

#: Tiny configurations: every feature a zoo entry uses (patch 8/16, registers, SwiGLU,
#: LayerScale, class-token position embedding or not), at 32 px and width 32.
_TINY = dict(embed_dim=32, depth=2, num_heads=2)
TINY_ARCHS = {
    "tiny-vit": VitSpec("vit_small_patch16_224", 32, 16, 32, tuple(_TINY.items())),
    "tiny-vit-p8-ls": VitSpec("vit_small_patch8_224", 32, 8, 32,
                              tuple({**_TINY, "init_values": 1e-5}.items())),
    "tiny-vit-reg4-swiglu": VitSpec(
        "vit_huge_patch14_224", 32, 16, 32,
        tuple({**_TINY, "patch_size": 16, "init_values": 1e-5, "mlp_ratio": 5.3375}.items()),
        reg_tokens=4, mlp="swiglu"),
    "tiny-vit-reg8-noembedcls": VitSpec(
        "vit_giant_patch14_224", 32, 16, 32,
        tuple({**_TINY, "patch_size": 16, "init_values": 1e-5, "mlp_ratio": 2.66667 * 2,
               "no_embed_class": True}.items()), reg_tokens=8, mlp="swiglu"),
}


@pytest.fixture
def tiny_archs(monkeypatch):
    for name, spec in TINY_ARCHS.items():
        monkeypatch.setitem(zoo_archs.ZOO_ARCHS, name, spec)
    yield
    zoo_archs._vit_shapes.cache_clear()
    reload_manifests()


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerScale, tokens and norms too), so a mis-mapped tensor
    changes the features."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def _entry(name: str, arch: str, path: Path, *, fmt: str, key_map: dict, pooling: str,
           feature_dim: int, size: int = 32, commercial: bool = True) -> dict:
    return {
        "description": f"tiny {arch}", "arch": arch, "feature_dim": feature_dim,
        "pooling": pooling, "commercial": commercial, "gated": False,
        "weights": [{"filename": path.name, "format": fmt, "sha256": None, "size": None,
                     "sources": [{"url": path.as_uri()}], "key_map": key_map}],
        "preprocessing": {"input_size": size, "mean": [0.5] * 3, "std": [0.5] * 3,
                          "interpolation": "bilinear", "mpp": 0.5},
        "license": "MIT", "citation": "Test (2025).", "recipe": {}, "training_data": "none",
        "metrics": {},
    }


def _use_manifest(tmp_path: Path, monkeypatch, models: dict) -> None:
    path = tmp_path / "zoo_manifest.json"
    path.write_text(json.dumps({"schema_version": 1, "models": models}), encoding="utf-8")
    monkeypatch.setenv("HISTOHUB_MANIFEST", str(path))
    reload_manifests()


def _images(size: int = 32, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- tiny: timm


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
@pytest.mark.parametrize("pooling", ["cls", "cls+mean"])
@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_timm_checkpoint_loads_to_timm_features(arch, pooling, fmt, tiny_archs, tmp_path,
                                                monkeypatch):
    spec = TINY_ARCHS[arch]
    upstream = _randomise(timm.create_model(spec.timm_name, **spec.timm_kwargs()))
    path = tmp_path / ("vits.pth" if fmt == "torch" else "model.safetensors")
    if fmt == "torch":
        torch.save(upstream.state_dict(), path)  # as kaiko's .pth and Lunit's .torch
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in upstream.state_dict().items()}, str(path))
    dim = 64 if pooling == "cls+mean" else 32
    _use_manifest(tmp_path, monkeypatch, {"tiny": _entry(
        "tiny", arch, path, fmt=fmt, pooling=pooling, feature_dim=dim,
        key_map={"state_dict_key": None, "strip_prefixes": [], "drop": [], "layout": "timm"})})

    encoder = histohub.load_pretrained("tiny", progress=False)
    x = _images()
    with torch.no_grad():
        tokens = upstream.forward_features(x)
        expected = upstream(x) if pooling == "cls" else torch.cat(
            [tokens[:, 0], tokens[:, upstream.num_prefix_tokens:].mean(1)], dim=-1)
        got = encoder(x)
    assert got.shape == (3, dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- tiny: transformers


def _hf_vit_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=128, image_size=32, patch_size=16,
                                    layer_norm_eps=1e-6, qkv_bias=True)
    return _randomise(transformers.ViTModel(config, add_pooling_layer=True)), transformers.ViTModel


def _hf_dinov2_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, mlp_ratio=4, image_size=32,
                                       patch_size=16, layer_norm_eps=1e-6)
    return _randomise(transformers.Dinov2Model(config)), transformers.Dinov2Model


@pytest.mark.parametrize("layout, make, arch, drop", [
    ("hf_vit", _hf_vit_model, "tiny-vit", [r"^pooler\."]),
    ("hf_dinov2", _hf_dinov2_model, "tiny-vit-ls", [r"^embeddings\.mask_token$"]),
])
def test_transformers_checkpoint_loads_to_transformers_features(layout, make, arch, drop,
                                                                 tiny_archs, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setitem(zoo_archs.ZOO_ARCHS, "tiny-vit-ls", VitSpec(
        "vit_small_patch16_224", 32, 16, 32, tuple({**_TINY, "init_values": 1e-5}.items())))
    model, cls = make()
    folder = tmp_path / layout
    model.save_pretrained(folder)  # writes model.safetensors, as the Hub repositories hold
    reloaded = cls.from_pretrained(folder).eval()  # the upstream library's own loading
    _use_manifest(tmp_path, monkeypatch, {"tiny": _entry(
        "tiny", arch, folder / "model.safetensors", fmt="safetensors", pooling="cls",
        feature_dim=32,
        key_map={"state_dict_key": None, "strip_prefixes": [], "drop": drop, "layout": layout})})

    encoder = histohub.load_pretrained("tiny", progress=False)
    x = _images()
    with torch.no_grad():
        expected = reloaded(pixel_values=x).last_hidden_state[:, 0]
        got = encoder(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_mis_mapped_transformers_checkpoint_is_refused(tiny_archs, tmp_path, monkeypatch):
    """The same ViT file read as if it were timm's: nothing loads, every key is named."""
    model, _ = _hf_vit_model()
    model.save_pretrained(tmp_path / "vit")
    _use_manifest(tmp_path, monkeypatch, {"tiny": _entry(
        "tiny", "tiny-vit", tmp_path / "vit" / "model.safetensors", fmt="safetensors",
        pooling="cls", feature_dim=32,
        key_map={"state_dict_key": None, "strip_prefixes": [], "drop": [], "layout": "timm"})})
    refused = r"missing \(30 of 30\)(.|\n)*unexpected .*embeddings\.cls_token"
    with pytest.raises(histohub.errors.KeyMappingError, match=refused):
        histohub.load_pretrained("tiny", progress=False)


# --------------------------------------------------------------------------- full size, meta


def _timm_layout(name: str, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


def _swiglu() -> dict:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


def _lunit_vit(patch: int):
    from timm.models.vision_transformer import VisionTransformer

    # lunit-io/benchmark-ssl-pathology README, vit_small()
    return lambda: VisionTransformer(img_size=224, patch_size=patch, embed_dim=384,
                                     num_heads=6, num_classes=0)


def _lunit_resnet50():
    from torchvision.models.resnet import Bottleneck, ResNet

    def build():  # the README's ResNetTrunk: ResNet(Bottleneck, [3, 4, 6, 3]) without fc
        model = ResNet(Bottleneck, [3, 4, 6, 3])
        del model.fc
        return model
    return build


def _hf(config_name: str, model_name: str, **config):
    def build():
        transformers = pytest.importorskip("transformers")
        return getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
    return build


#: Each zoo entry's upstream layout, as its authors' loading code builds it.
UPSTREAM = {
    "lunit-bt-rn50": _lunit_resnet50(), "lunit-mocov2-rn50": _lunit_resnet50(),
    "lunit-swav-rn50": _lunit_resnet50(),
    "lunit-dino-vit-s16": _lunit_vit(16), "lunit-dino-vit-s8": _lunit_vit(8),
    # kaiko hubconf: timm.create_model(name, pretrained_cfg={..., "num_classes": 0})
    "kaiko-vits16": _timm_layout("vit_small_patch16_224", num_classes=0),
    "kaiko-vits8": _timm_layout("vit_small_patch8_224", num_classes=0),
    "kaiko-vitb16": _timm_layout("vit_base_patch16_224", num_classes=0),
    "kaiko-vitb8": _timm_layout("vit_base_patch8_224", num_classes=0),
    "kaiko-vitl14": _timm_layout("vit_large_patch14_reg4_dinov2", num_classes=0),
    # transformers configs of owkin/phikon (ViT-B/16) and owkin/phikon-v2 (DINOv2 ViT-L/16)
    "phikon": _hf("ViTConfig", "ViTModel", hidden_size=768, num_hidden_layers=12,
                  num_attention_heads=12, intermediate_size=3072, image_size=224,
                  patch_size=16),
    "phikon-v2": _hf("Dinov2Config", "Dinov2Model", hidden_size=1024, num_hidden_layers=24,
                     num_attention_heads=16, mlp_ratio=4, image_size=224, patch_size=16),
    # TRIDENT trident/patch_encoder_models/load.py, the local-checkpoint branch of each
    "gpfm": _timm_layout("vit_large_patch14_dinov2", img_size=224, init_values=1e-5),
    "uni": _timm_layout("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                        num_classes=0),
    "uni2-h": lambda: timm.create_model(
        "vit_giant_patch14_224", img_size=224, patch_size=14, depth=24, num_heads=24,
        init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
        no_embed_class=True, reg_tokens=8, **_swiglu()),
    "virchow2": lambda: timm.create_model(
        "vit_huge_patch14_224", img_size=224, init_values=1e-5, num_classes=0,
        mlp_ratio=5.3375, reg_tokens=4, **_swiglu()),
    "h-optimus-0": _timm_layout("vit_giant_patch14_reg4_dinov2", num_classes=0, img_size=224,
                                global_pool="token", init_values=1e-5),
    "h-optimus-1": _timm_layout("vit_giant_patch14_reg4_dinov2", num_classes=0, img_size=224,
                                global_pool="token", init_values=1e-5),
    "prov-gigapath": _timm_layout("vit_giant_patch14_dinov2", img_size=224, in_chans=3,
                                  patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                                  mlp_ratio=5.33334, num_classes=0),
}


def _as_saved(model: torch.nn.Module) -> dict:
    """The tensors as the upstream library writes them to disk: transformers (v5) renames
    some weights in memory and reverts the renaming in ``save_pretrained``."""
    if type(model).__module__.startswith("transformers."):
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(model, model.state_dict())
    return model.state_dict()


def _zoo_entries() -> list[str]:
    shipped = json.loads(Path(histohub.__file__).with_name("weights_manifest.json").read_text())
    return sorted(n for n in shipped["models"] if not n.startswith("resnet18"))


def test_every_zoo_entry_has_an_upstream_layout():
    assert sorted(UPSTREAM) == _zoo_entries()


@pytest.mark.parametrize("name", _zoo_entries())
def test_full_size_key_map_fills_the_real_layout(name):
    entry = load_manifest()[name]
    with torch.device("meta"):
        upstream = _as_saved(UPSTREAM[name]())
    expected = vit_shapes(entry.arch) if entry.is_zoo else encoder_shapes(entry.arch)
    for file in entry.weights:
        mapped = map_state_dict(upstream, file.key_map, expected)  # raises on any mismatch
        assert {k: v.shape for k, v in mapped.items()} == expected
