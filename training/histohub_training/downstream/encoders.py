"""The models a benchmark compares: ``random``, ``imagenet``, manifest names, checkpoints.

Paper, section 4.2: "We compare pretrained networks with randomly initialized and
ImageNet pretrained Resnet 18, 34, 50 and 101". Each model is resolved once into an
:class:`Encoder`: its weights in memory (so every fine-tuning run starts from the same
state), its identity (sha256 of the weights file, or what fixes a random initialisation)
and its preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from histohub import get_entry, load_pretrained
from histohub.hub import FEATURE_DIMS, Preprocessing, build_encoder, sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KIND_LABELS = {"random": "Random", "imagenet": "ImageNet", "self-supervised": "Self-supervised",
               "checkpoint": "Checkpoint"}


@dataclass(frozen=True)
class Encoder:
    """One model to benchmark.

    ``kind``: ``random``, ``imagenet``, ``self-supervised`` (a manifest name) or
    ``checkpoint`` (a local file: what it was trained with is not known here). ``identity``: the sha256 of its weights file, or for ``random`` a string
    fixing the initialisation (arch, seed, torch version). Both go into the feature cache
    key and the run's JSON.
    """

    label: str
    kind: str
    arch: str
    identity: str
    source: str
    preprocessing: Preprocessing
    state_dict: dict[str, torch.Tensor] = field(repr=False, compare=False)

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIMS[self.arch]

    @property
    def sha256(self) -> str | None:
        return None if self.kind == "random" else self.identity

    def build(self) -> nn.Module:
        """A fresh eval-mode copy: ``(B, 3, H, W) -> (B, feature_dim)``."""
        model = build_encoder(self.arch)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()

    def describe(self) -> dict:
        return {"label": self.label, "kind": self.kind, "arch": self.arch,
                "sha256": self.sha256, "identity": self.identity, "source": self.source,
                "preprocessing": {"input_size": self.preprocessing.input_size,
                                  "mean": list(self.preprocessing.mean),
                                  "std": list(self.preprocessing.std)}}


@dataclass(frozen=True)
class Skipped:
    """A requested model that could not be had, and why (it goes into the run's JSON)."""

    spec: str
    reason: str


def paper_preprocessing() -> Preprocessing:
    """mean = std = 0.5 at 224 px, the preprocessing of the authors' models."""
    return get_entry("resnet18-ssl").preprocessing


def resolve_encoders(specs: Sequence[str], *, default_arch: str = "resnet18", seed: int = 0,
                     progress: bool = True) -> tuple[list[Encoder], list[Skipped]]:
    """Resolve ``--model`` values, in order.

    ``random`` / ``imagenet`` take the architecture of the other models given (one each
    per architecture), else ``default_arch``; ``random:resnet50`` names it. They also take
    those models' input size (a model trained at 64 px is compared with ``random`` at 64 px),
    one each per size, labelled ``random-resnet18-64px`` where sizes differ; 224 px when no
    other model is given. Anything else is a manifest name or a local checkpoint path
    (``histohub.load_pretrained``). ImageNet weights that cannot be had are skipped with
    the reason, not an error.
    """
    if not specs:
        raise ValueError("Give at least one --model (a manifest name, a checkpoint, "
                         "'random' or 'imagenet')")
    trained = [_from_pretrained(s, progress=progress) for s in specs
               if s.split(":")[0] not in ("random", "imagenet")]
    archs = list(dict.fromkeys(e.arch for e in trained)) or [default_arch]
    encoders: list[Encoder] = []
    skipped: list[Skipped] = []
    by_spec = iter(trained)
    for spec in specs:
        base, _, arch = spec.partition(":")
        if base not in ("random", "imagenet"):
            encoders.append(next(by_spec))
            continue
        for a in [arch] if arch else archs:
            if a not in FEATURE_DIMS:
                raise ValueError(f"Unknown architecture {a!r} in {spec!r}; choose one of "
                                 f"{sorted(FEATURE_DIMS)}")
            baseline = random_encoder(a, seed=seed) if base == "random" \
                else imagenet_encoder(a, progress=progress)
            if isinstance(baseline, Skipped):
                skipped.append(baseline)
                continue
            references = _scale_references(trained, a)
            for reference in references:
                tag = f"-{reference.preprocessing.input_size}px" if len(references) > 1 else ""
                encoders.append(_at_scale(baseline, reference, tag))
    labels = [e.label for e in encoders]
    duplicates = {x for x in labels if labels.count(x) > 1}
    if duplicates:
        raise ValueError(f"Model(s) {sorted(duplicates)} given twice; each --model once")
    return encoders, skipped


def _scale_references(trained: list[Encoder], arch: str) -> list[Encoder | None]:
    """The models whose input size a baseline of ``arch`` takes: one per distinct size
    among the given models of ``arch`` (else of any architecture); ``[None]`` when none."""
    first: dict[int, Encoder] = {}
    for encoder in [e for e in trained if e.arch == arch] or trained:
        first.setdefault(encoder.preprocessing.input_size, encoder)
    return list(first.values()) or [None]


def _at_scale(encoder: Encoder, reference: Encoder | None, tag: str) -> Encoder:
    """``encoder`` fed at ``reference``'s input size (and scale in microns per pixel), its
    label suffixed with ``tag``; unchanged when there is no reference."""
    if reference is None:
        return encoder
    ref = reference.preprocessing
    note = f"The input size and scale of {reference.label}, which it is compared with."
    pre = replace(encoder.preprocessing, input_size=ref.input_size, mpp=ref.mpp,
                  mpp_note=note)
    return replace(encoder, label=encoder.label + tag, preprocessing=pre)


def random_encoder(arch: str, *, seed: int) -> Encoder:
    """``arch`` randomly initialised (torchvision's init) under ``torch.manual_seed(seed)``."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_encoder(arch)
    finally:
        torch.random.set_rng_state(generator_state)
    identity = f"random:{arch}:seed={seed}:torch={torch.__version__}"
    return Encoder(label=f"random-{arch}", kind="random", arch=arch, identity=identity,
                   source="random", preprocessing=paper_preprocessing(),
                   state_dict=model.state_dict())


def imagenet_encoder(arch: str, *, progress: bool = True) -> Encoder | Skipped:
    """torchvision's ImageNet weights for ``arch`` (hash-checked), or why they cannot be had."""
    import torchvision
    from urllib.error import URLError

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        state = weights.get_state_dict(progress=progress, check_hash=True)
    except (URLError, OSError, RuntimeError) as error:
        reason = (f"torchvision's ImageNet weights for {arch} cannot be had here ({error}); "
                  f"without internet, copy {Path(weights.url).name} (from {weights.url}) to "
                  f"{cached.parent}/ to include them")
        return Skipped(spec=f"imagenet:{arch}", reason=reason)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    pre = Preprocessing(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Encoder(label=f"imagenet-{arch}", kind="imagenet", arch=arch,
                   identity=sha256_file(cached), source=weights.url, preprocessing=pre,
                   state_dict=state)


def _from_pretrained(spec: str, *, progress: bool) -> Encoder:
    model = load_pretrained(spec, progress=progress)
    info = model.histohub_info   # a ModelDescriptor: a manifest model or a checkpoint file
    label = Path(spec).stem if info.is_file else spec
    return Encoder(label=label, kind="checkpoint" if info.is_file else "self-supervised",
                   arch=info.arch,
                   identity=info.sha256 or f"unverified:{spec}", source=str(spec),
                   preprocessing=info.preprocessing,
                   state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
