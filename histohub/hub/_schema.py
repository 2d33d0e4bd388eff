"""The weights manifest's schema: what a valid manifest says, checked into frozen dataclasses.

A manifest is ``{"schema_version": SCHEMA_VERSION, "models": {name: entry}}``; each entry
is a ``ModelEntry``: its ``WeightsFile``s (each with ``Source``s, a ``KeyMap``, ``Reported``
numbers and a ``Fingerprint``), its ``Preprocessing`` and its ``Licence``. ``_parse`` reads
and validates entries into these.

Provenance of a weights file's numbers: ``sha256`` and ``size`` are *verified*: written by
``histohub pin`` from a file histohub downloaded and hashed. ``reported`` holds numbers
histohub has not checked itself (an independent user's sha256, a release page's size),
with a ``note`` saying who reported them; they are enforced all the same until verified
ones exist (see ``_verify``). ``fingerprint`` is a post-load check of one tensor's L2
norm, ``verified`` saying whether histohub measured it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histohub.hub._zoo_archs import ZOO_ARCHS

#: The installed package's folder: where ``package`` sources' files lie (read at each use).
PACKAGE_DIR = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1
FORMATS = ("safetensors", "torch", "lightning")
#: How a patch read at another size is resized to the model's input (PIL's filters).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Source:
    """One place a weights file can be had: a URL, a pinned Hugging Face file, or a file
    shipped inside the histohub package (``package``: a path relative to it)."""

    url: str | None = None
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    package: str | None = None
    revision_note: str = ""

    @property
    def is_hf(self) -> bool:
        return self.repo_id is not None

    @property
    def package_path(self) -> Path | None:
        """Where a ``package`` source's file lies in this installation (else None)."""
        return PACKAGE_DIR / self.package if self.package else None

    @property
    def public_url(self) -> str | None:
        """``url`` without its ``user:password@``: what may be shown or written."""
        from histohub.hub._redact import redact

        return None if self.url is None else redact(self.url)

    def describe(self) -> str:
        """One line for listings, without credentials."""
        if self.is_hf:
            return f"huggingface {self.repo_id}@{self.revision or 'main (not pinned)'} " \
                   f"{self.filename}"
        if self.package:
            return f"the histohub package: {self.package}"
        return self.public_url


@dataclass(frozen=True)
class KeyMap:
    """How a checkpoint's keys map onto the architecture's ``state_dict``.

    ``state_dict_key``: the nested dict holding the tensors (used when present).
    ``strip_prefixes``: removed from the start of each key, first match only.
    ``drop``: regular expressions of keys to discard after stripping (the projection head).
    ``layout``: the upstream naming to convert from (``key_maps.LAYOUTS``), applied last.
    """

    state_dict_key: str | None = None
    strip_prefixes: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    layout: str | None = None


@dataclass(frozen=True)
class Reported:
    """Facts about a file that histohub has not verified itself, and who reported them."""

    note: str
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class Fingerprint:
    """Expected L2 norm of one tensor of the loaded encoder, within relative ``rtol``.

    Catches a wrong file or a key map filling the wrong tensors at the cost of one norm
    (e.g. the authors' ResNet18: ``conv1.weight`` about 12.58; torchvision's ImageNet
    ResNet18: 29.24).
    """

    tensor: str
    l2_norm: float
    rtol: float
    verified: bool
    note: str = ""


@dataclass(frozen=True)
class WeightsFile:
    """One weights file: its identity (sha256, size), format, key mapping and sources.

    ``sha256``/``size`` are verified by histohub (``histohub pin``); ``reported`` holds
    unverified ones. ``expected_sha256``/``expected_size`` are what a download must match.
    """

    filename: str
    format: str
    sha256: str | None
    size: int | None
    sources: tuple[Source, ...]
    key_map: KeyMap = field(default_factory=KeyMap)
    reported: Reported | None = None
    fingerprint: Fingerprint | None = None

    @property
    def expected_sha256(self) -> str | None:
        """The verified sha256, else the reported one, else None (trusted on first use)."""
        return self.sha256 or (self.reported.sha256 if self.reported else None)

    @property
    def expected_size(self) -> int | None:
        """The verified size, else the reported one, else None."""
        return self.size or (self.reported.size if self.reported else None)

    @property
    def sha256_provenance(self) -> str | None:
        """``"verified"``, ``"reported"`` or None: where ``expected_sha256`` comes from."""
        if self.sha256 is not None:
            return "verified"
        return "reported" if self.expected_sha256 is not None else None


@dataclass(frozen=True)
class Preprocessing:
    """What the encoder expects as input: ``input_size`` px at ``mpp`` um/px, normalised."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    mpp: float | None = None
    mpp_note: str = ""


@dataclass(frozen=True)
class Licence:
    """The terms of a model's weights: ``commercial`` use allowed (None: not established),
    ``gated`` (the upstream host asks users to accept terms before downloading), ``url``
    of the licence text. ``restricted``: histohub loads it only after acceptance."""

    commercial: bool | None = True
    gated: bool = False
    url: str = ""

    @property
    def restricted(self) -> bool:
        return self.gated or self.commercial is not True


@dataclass(frozen=True)
class ModelEntry:
    """A model name and everything needed to build, fetch, verify and preprocess for it.

    ``weights`` is an ordered list of alternative files holding the same weights: the first
    that can be fetched and verified is used.
    """

    name: str
    description: str
    arch: str
    feature_dim: int
    weights: tuple[WeightsFile, ...]
    preprocessing: Preprocessing
    license: str
    citation: str
    recipe: dict[str, Any]
    training_data: str
    metrics: dict[str, Any]
    default: bool = False
    manifest_path: Path | None = None
    licence: Licence = field(default_factory=lambda: Licence())
    pooling: str | None = None
    params: int | None = None
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def is_zoo(self) -> bool:
        """True for a zoo ViT (``zoo_archs``), False for a torchvision ResNet."""
        return self.arch in ZOO_ARCHS

    @property
    def hub_name(self) -> str:
        """The torch.hub entry point name: ``resnet18-ssl`` -> ``resnet18_ssl``."""
        return self.name.replace("-", "_").replace(".", "_")
