"""Exceptions raised by histohub.

Each one subclasses the built-in a caller would naturally catch (as huggingface_hub's
``LocalEntryNotFoundError(FileNotFoundError)`` does), and every message says what to do.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
from pathlib import Path
import numbers
from collections.abc import Iterable


__all__ = [
    "HistohubError", "ManifestError", "UnknownModelError", "OfflineError", "DownloadError",
    "ChecksumError", "CheckpointError", "UnsafeCheckpointError", "KeyMappingError",
    "MissingDependencyError", "SlideError", "LicenceError", "FingerprintError",
    "LockTimeoutError", "InputNotFoundError", "OptionError", "OutputExistsError",
    "DiskFullError", "ClusteringError", "FeatureFileError", "RoiError", "require",
]


class HistohubError(Exception):
    """Base class of every histohub error."""


class ManifestError(HistohubError, ValueError):
    """A weights manifest is malformed: unknown or missing fields, bad values."""


class UnknownModelError(HistohubError, KeyError):
    """A model name that no manifest lists."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        message = (
            f"Unknown model {name!r}.{hint} Known models: {', '.join(known)}. "
            "Run `histohub list` to see them all, or pass a local checkpoint path with arch=."
        )
        super().__init__(message)
        self.name = name
        self.close_matches = close

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0])


class OfflineError(HistohubError, FileNotFoundError):
    """The weights are not cached and the network may not be used."""


class DownloadError(HistohubError, ConnectionError):
    """Every source of a file failed."""


class ChecksumError(HistohubError, ValueError):
    """A file's sha256 or size is not the one the manifest (or the cache record) expects."""


class CheckpointError(HistohubError, ValueError):
    """A checkpoint cannot be read: truncated, corrupt, or not a checkpoint at all."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle inside a checkpoint tried to call code that is not on the allowlist."""


class KeyMappingError(HistohubError, ValueError):
    """A checkpoint's keys do not fill the architecture exactly (missing or unexpected keys)."""


class MissingDependencyError(HistohubError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class SlideError(HistohubError, ValueError):
    """A file is not a readable slide, or lacks metadata a step needs (e.g. microns per pixel)."""


def require(module: str, *, extra: str, purpose: str):
    """Import an optional dependency, or raise MissingDependencyError naming the extra.

    >>> openslide = require("openslide", extra="wsi", purpose="reading whole-slide images")
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"{purpose} needs the optional dependency {module!r}. "
            f"Install it with: pip install 'histohub[{extra}]'"
        ) from error


class LicenceError(HistohubError, PermissionError):
    """A model's licence is restricted (non-commercial or gated) and has not been accepted;
    the message names the licence and the three ways to accept it."""


class FingerprintError(HistohubError, ValueError):
    """A loaded encoder fails its manifest fingerprint (a tensor's L2 norm is off): the
    wrong file, or a key map that filled the wrong tensors."""


class LockTimeoutError(HistohubError, TimeoutError):
    """Another process held a download lock for longer than histohub waits; the message
    names the holder (pid, host) and the setting that bounds the wait."""


class InputNotFoundError(HistohubError, FileNotFoundError):
    """A file given as input does not exist, or is a folder where a file is expected."""


def existing_file(path: str | os.PathLike, *, what: str, folder_hint: str) -> Path:
    """``path`` as a ``Path`` when it is a file; ``InputNotFoundError`` otherwise, saying
    what to give instead of a folder (``folder_hint``) or that the ``what`` file is missing.
    """
    path = Path(path)
    if path.is_dir():
        raise InputNotFoundError(f"{str(path)!r} is a folder, not a {what} file; {folder_hint}")
    if not path.is_file():
        raise InputNotFoundError(f"{what[:1].upper()}{what[1:]} file {str(path)!r} does not "
                                 "exist")
    return path


class OptionError(HistohubError, ValueError):
    """An option's value is outside what it allows; the message names the option and the range."""


class OutputExistsError(HistohubError, FileExistsError):
    """An output file exists that this run must not replace: another tool's file, or histohub
    features made for another request. ``overwrite=True`` (``--overwrite``) replaces it."""


class DiskFullError(HistohubError, OSError):
    """No space left on the device an output is written to."""


class ClusteringError(HistohubError, ValueError):
    """Clustering cannot run as asked (k larger than the number of patches, unknown
    cluster ids, too few values of k for the elbow, ...)."""


class FeatureFileError(ClusteringError):
    """A feature file is not HDF5 or not in the layout ``histohub extract`` writes, or a set
    of files cannot be clustered together."""


def check_option(name: str, value: object, *, low: float | None = None,
                 high: float | None = None, integer: bool = False, optional: bool = False,
                 choices: tuple | None = None, flag: str | None = None) -> None:
    """Raise ``OptionError`` unless ``value`` is allowed: one of ``choices``, or a finite
    number (an integer when ``integer``) in ``[low, high]``; ``None`` too when ``optional``.

    The message quotes the option as ``name=value`` (Python) or ``flag value`` (command line,
    when ``flag`` is given) and says what is allowed, on one line:
    ``--patch-size 0: must be an integer >= 1``.
    """
    if value is None and optional:
        return
    if choices is not None:
        if value in choices and type(value) in {type(c) for c in choices}:
            return
        allowed = "one of " + ", ".join(repr(c) for c in choices)
    else:
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if is_number and (isinstance(value, numbers.Integral) or not integer) \
                and math.isfinite(value) and (low is None or value >= low) \
                and (high is None or value <= high):
            return
        kind = "an integer" if integer else "a number"
        if high is None:
            allowed = f"{kind} >= {_bound(low)}"
        else:
            allowed = f"{kind} in [{_bound(low)}, {_bound(high)}]"
    if optional:
        allowed = f"None or {allowed}" if flag is None else f"omitted or {allowed}"
    if isinstance(value, float):
        shown = f"{value:g}"
    else:
        shown = str(value) if flag and isinstance(value, (int, str)) else repr(value)
    label = f"{flag} {shown}" if flag else f"{name}={shown}"
    raise OptionError(f"{label}: must be {allowed}")


def _bound(value: float) -> str:
    """A range's end as a message shows it: integers in full, other numbers short."""
    return str(value) if isinstance(value, int) else f"{value:g}"


class RoiError(HistohubError, ValueError):
    """A region of interest (``--roi`` GeoJSON) or a coordinates file (``--coords`` h5)
    that cannot be used for this slide: malformed, self-intersecting, outside the slide,
    made for another slide. The message names the file."""
