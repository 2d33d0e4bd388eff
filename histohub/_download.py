"""Cache, mirrors and downloads of weights files (being written: see issue 2)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ._manifest import ModelEntry, WeightsFile


@dataclass(frozen=True)
class FetchedFile:
    """A verified local copy of one of an entry's weights files."""

    path: Path
    file: WeightsFile
    sha256: str


def sha256_file(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """Full hex sha256 of a file, read in chunks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_weights(entry: ModelEntry, *, progress: bool = True) -> FetchedFile:
    """The first of ``entry.weights`` that is cached or can be fetched, verified."""
    raise NotImplementedError("download and cache are being written (issue 2)")
