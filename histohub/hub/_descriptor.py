"""What a model is, whether named in a manifest or given as a file, decided in one place.

``ModelDescriptor`` is histohub's ``PretrainedCfg`` (timm ``_pretrained.py``): a frozen
record of a model's name, architecture, feature size, preprocessing, where its weights
come from (the manifest entry, or the checkpoint file) and, where known, their sha256 and
the licence and citation. ``describe_model`` turns a name or a path into one without
reading any weights; once the weights are read, ``ModelDescriptor.loaded`` fills in the
architecture that fits, the sha256 and the file used, and the result is what a loaded
encoder carries as ``model.histohub_info``.

The one rule for "is this a name or a file?", used by ``load_pretrained``,
``SlideExtractor``, ``histohub convert`` and ``export_hf``:

1. an existing file is the file, even when its name is also a model name (a warning says
   so: move the file or give another path to it to load the model);
2. else a manifest name is that model;
3. else anything that looks like a path (it exists, e.g. a folder; it holds a path
   separator or starts with ``~``; it ends in a checkpoint suffix) is a checkpoint that is
   not there: ``InputNotFoundError``, a ``FileNotFoundError``;
4. else an unknown name: ``UnknownModelError``, a ``KeyError`` listing the close names.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from histohub.errors import OptionError, UnknownModelError, existing_file
from histohub.hub._archs import FEATURE_DIMS
from histohub.hub._registry import default_model, get_entry, load_manifest
from histohub.hub._schema import ModelEntry, Preprocessing

logger = logging.getLogger(__name__)

#: File endings that make a string a checkpoint path even when no such file exists.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
#: ``read_checkpoint``'s advice for a folder given as a checkpoint.
FOLDER_HINT = "give the .safetensors, .pt or .ckpt file inside it"


@dataclass(frozen=True)
class ModelDescriptor:
    """A model: a manifest name or a checkpoint file, and what is known of it.

    ``name``: the manifest name, or the file's stem (a module's class name for a module
    histohub did not load). ``arch`` and ``feature_dim``: None until known (a file's
    architecture is the one its keys fit, known once read, unless ``arch=`` named it).
    ``preprocessing``: the manifest's; a checkpoint file is assumed to follow the default
    model's (the paper's). ``entry``: the manifest entry (None for a file); ``file``: the
    checkpoint, absolute (None for a name). ``sha256``: of the weights file, where known
    (a name's pinned hash when it has one file; a file's once read). ``weights_path``: the
    file the weights were read from (the checkpoint, or the cached download).
    """

    name: str
    arch: str | None
    feature_dim: int | None
    preprocessing: Preprocessing
    entry: ModelEntry | None = None
    file: Path | None = None
    sha256: str | None = None
    weights_path: str | None = None

    @property
    def source(self) -> ModelEntry | Path | None:
        """Where the weights come from: the manifest entry or the checkpoint file."""
        return self.entry if self.entry is not None else self.file

    @property
    def is_file(self) -> bool:
        """Whether this is a checkpoint file rather than a manifest model."""
        return self.file is not None

    @property
    def license(self) -> str | None:
        """The manifest's licence (None for a file: not recorded)."""
        return self.entry.license if self.entry is not None else None

    @property
    def citation(self) -> str | None:
        """The manifest's citation (None for a file)."""
        return self.entry.citation if self.entry is not None else None

    def loaded(self, *, arch: str, sha256: str | None, weights_path: str | None
               ) -> ModelDescriptor:
        """This model with its weights read: the architecture they fit, their sha256 and
        the file they came from."""
        feature_dim = self.entry.feature_dim if self.entry is not None else FEATURE_DIMS[arch]
        return replace(self, arch=arch, feature_dim=feature_dim, sha256=sha256,
                       weights_path=weights_path)


def describe_model(model: str | os.PathLike, *, arch: str | None = None) -> ModelDescriptor:
    """The descriptor of a manifest name or a checkpoint path, by the module's one rule;
    no weights are read or fetched.

    Args:
        model: a manifest name (``histohub.list_models()``) or a checkpoint path.
        arch: the architecture expected; for a file, the one its keys must fit (None:
            whichever fits); for a name, it must be the manifest's.

    Returns:
        A ``ModelDescriptor``; ``entry`` set for a name, ``file`` for a file.

    Raises:
        InputNotFoundError: ``model`` looks like a path but is no file (missing, a folder).
        UnknownModelError: ``model`` is neither a file nor a known name (close names listed).
        OptionError: ``arch`` is not the named model's architecture.
    """
    text = os.fspath(model)
    entries = load_manifest()
    path = Path(text).expanduser()
    if path.is_file():
        if text in entries:
            logger.warning("%r is both a model name and the file %s; loading the file (pass "
                           "another path to the file, or move it, to load the model)",
                           text, path.resolve())
        return describe_file(path, arch=arch)
    if text in entries:
        return describe_entry(entries[text], arch=arch)
    if _looks_like_path(text, path):
        existing_file(path, what="checkpoint", folder_hint=FOLDER_HINT)
    raise UnknownModelError(text, entries)


def describe_entry(entry: ModelEntry, *, arch: str | None = None) -> ModelDescriptor:
    """A manifest model's descriptor (``arch``, when given, must be the entry's)."""
    if arch is not None and arch != entry.arch:
        raise OptionError(f"{entry.name!r} is a {entry.arch}; drop arch={arch!r} (--arch) or "
                          f"pass {entry.arch!r}")
    pinned = {file.sha256 for file in entry.weights}
    return ModelDescriptor(name=entry.name, arch=entry.arch, feature_dim=entry.feature_dim,
                           preprocessing=entry.preprocessing, entry=entry,
                           sha256=pinned.pop() if len(pinned) == 1 else None)


def describe_file(path: str | os.PathLike, *, arch: str | None = None) -> ModelDescriptor:
    """A checkpoint file's descriptor, before it is read: its architecture is ``arch``
    (None: whichever fits), its preprocessing the default model's."""
    path = Path(path).expanduser().absolute()
    return ModelDescriptor(name=path.stem, arch=arch,
                           feature_dim=FEATURE_DIMS.get(arch) if arch else None,
                           preprocessing=default_preprocessing(), file=path,
                           weights_path=str(path))


def describe_module(module: Any) -> ModelDescriptor:
    """What a module says it is: the ``histohub_info`` ``load_pretrained`` attached, else
    its class name with the default preprocessing (architecture and size unknown)."""
    info = getattr(module, "histohub_info", None)
    if isinstance(info, ModelDescriptor):
        return info
    return ModelDescriptor(name=type(module).__name__, arch=None, feature_dim=None,
                           preprocessing=default_preprocessing())


def default_preprocessing() -> Preprocessing:
    """Local checkpoints are assumed to follow the paper's preprocessing (the default
    model's)."""
    return get_entry(default_model()).preprocessing


def _looks_like_path(text: str, path: Path) -> bool:
    separators = (os.sep, os.altsep) if os.altsep else (os.sep,)
    return (path.exists() or any(s in text for s in separators) or text.startswith("~")
            or path.suffix.lower() in CHECKPOINT_SUFFIXES)
