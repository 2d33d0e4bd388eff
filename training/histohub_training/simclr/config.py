"""Pretraining configuration: JSON files under ``training/configs/`` plus ``key=value`` overrides.

A config is a tree of frozen dataclasses, so a typo in a key is an error, not a silently
ignored setting. Overrides use dotted keys (``optim.name=lamb``, ``augment.jitter=heavy``)
and values are read as JSON where they parse (``epochs=10``, ``augment.rotate=false``,
``data.datasets=["/a", "slides:/b"]``), else as strings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


@dataclass(frozen=True)
class ModelConfig:
    """Encoder and projection head (paper section 3.1: a one-hidden-layer MLP)."""

    arch: str = "resnet18"
    projection_hidden_dim: int | None = None  # None: the encoder's feature dimension
    projection_dim: int = 128


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule (paper Appendix C). ``lr=None`` uses the paper's rule."""

    name: str = "lars"  # lars | lamb | adam
    lr: float | None = None
    weight_decay: float = 1e-6
    momentum: float = 0.9  # LARS only
    trust_coeff: float = 0.001  # LARS only (SimCLR's eta)
    warmup_epochs: float = 10.0
    temperature: float = 0.1


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentations of Appendix C; each can be switched off (0, false or null)."""

    crop_min_area: float | None = 0.01  # random resized crop, area in [crop_min_area, 1]
    rotate: bool = True  # 0/90/180/270 degrees, 25% each
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    jitter: str | list[float] | None = "medium"  # light | medium | heavy | [b, c, s, h] | null
    jitter_p: float = 0.8  # SimCLR's probability; the paper does not restate it
    grayscale_p: float = 0.0  # not among the paper's augmentations
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1
    on: str = "auto"  # auto | loader | device: where the batched augmentation runs


@dataclass(frozen=True)
class DataConfig:
    """What to train on: a pool of datasets with per-dataset caps (paper section 5.4).

    ``datasets``: each a folder of images (any nesting), ``"slides:/folder"`` for a folder of
    whole-slide images, or an object ``{"path", "kind", "name", ...}``.
    """

    datasets: tuple[Any, ...] = ()
    percent: float = 100.0
    min_per_dataset: int = 10
    max_per_dataset: int | None = 2000
    patches_per_slide: int = 100
    slide_mpp: float = 0.5
    min_foreground: float = 0.5
    num_workers: int = 0
    cache: bool = True  # decode the pool once into <run>/pool_cache.npy (simclr.cache)
    cache_size: int | None = None  # side of the stored images; None: image_size
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything one pretraining run needs; ``batch_size`` is the global batch."""

    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    image_size: int = 224
    batch_size: int = 512
    epochs: int = 1000
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False
    checkpoint_every: int = 10
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch's intra-op threads; None: torch's default (cores)
    deterministic: bool = True  # torch.use_deterministic_algorithms (simclr.train)


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" etc.
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    values = {}
    for key, value in data.items():
        sub = _SECTIONS.get(key) if cls is PretrainConfig else None
        if sub is not None:
            values[key] = _from_dict(sub, value, f"{where}.{key}")
        elif isinstance(value, list):
            values[key] = tuple(value)
        else:
            values[key] = value
    return cls(**values)


_SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "augment": AugmentConfig,
             "data": DataConfig}


def validate(config: PretrainConfig) -> PretrainConfig:
    """Raise ValueError naming the bad setting; returns the config unchanged."""
    if config.model.arch not in ARCHS:
        raise ValueError(f"model.arch={config.model.arch!r}: choose one of {ARCHS}")
    if config.optim.name not in ("lars", "lamb", "adam"):
        raise ValueError(f"optim.name={config.optim.name!r}: choose lars, lamb or adam")
    if config.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision={config.precision!r}: choose auto, fp32, bf16 or fp16")
    if config.augment.on not in ("auto", "loader", "device"):
        raise ValueError(f"augment.on={config.augment.on!r}: choose auto, loader or device")
    if config.batch_size < 2 or config.epochs < 1 or config.image_size < 8:
        raise ValueError("batch_size >= 2, epochs >= 1 and image_size >= 8 are required")
    if not 0 < config.data.percent <= 100:
        raise ValueError(f"data.percent={config.data.percent}: a percentage in (0, 100]")
    if config.data.cache_size is not None and config.data.cache_size < config.image_size:
        raise ValueError(f"data.cache_size={config.data.cache_size}: at least image_size "
                         f"({config.image_size}), so crops are not upsampled")
    if config.threads is not None and (not isinstance(config.threads, int)
                                       or config.threads < 1):
        raise ValueError(f"threads={config.threads!r}: a positive number of threads, or null "
                         "for torch's default")
    if config.optim.temperature <= 0:
        raise ValueError(f"optim.temperature={config.optim.temperature}: must be positive")
    return config


def parse_value(text: str) -> Any:
    """``"10"`` -> 10, ``"false"`` -> False, ``"[1, 2]"`` -> [1, 2], ``"abc"`` -> "abc"."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys of a config dict from ``key=value`` strings (a new dict)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Override {item!r} is not key=value (e.g. epochs=10)")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"Override {item!r}: {part!r} is not a section")
        node[leaf] = parse_value(text)
    return data


def resolve_path(name_or_path: str) -> Path:
    """A config name (``smoke``) under ``training/configs/`` or a path to a JSON file."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        candidate = CONFIG_DIR / f"{name_or_path}.json"
        if candidate.is_file():
            return candidate
    if path.is_file():
        return path
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    raise FileNotFoundError(f"No config {name_or_path!r}: give a path to a JSON file or one "
                            f"of {names}")


def load_config(name_or_path: str, overrides: list[str] = ()) -> PretrainConfig:
    """Read a config file, apply overrides, validate."""
    path = resolve_path(name_or_path)
    data = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault("name", path.stem)
    return validate(_from_dict(PretrainConfig, apply_overrides(data, list(overrides)),
                               str(path)))


def config_from_dict(data: dict) -> PretrainConfig:
    """The inverse of :func:`to_dict` (used when resuming from a checkpoint)."""
    return validate(_from_dict(PretrainConfig, data, "checkpoint config"))


def to_dict(config: PretrainConfig) -> dict:
    """Plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
