"""How training writes files: atomically, so that a reader (or a resumed run) sees the old
file or the new one, never half of either.

Every file training writes in place goes through :func:`atomic_path`: checkpoints, the
pool and its decoded cache, the training log, exported weights and model cards, benchmark
runs, tables, plots and feature caches. Manifests are written by histohub's one manifest
writer, :func:`histohub.write_manifest_entry`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that takes a file name
    (``torch.save``, ``safetensors``, ``numpy``'s ``open_memmap``, ``savefig``).

    When the block ends without an exception the file is flushed to disk and renamed onto
    ``path`` (``os.replace``: atomic on POSIX and Windows); on any exception, an interrupt
    included, it is deleted and ``path`` is left as it was. The temporary name ends in
    ``.tmp``: writers that infer a format from the suffix need it given. ``mkdir``
    creates missing parent folders first.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    write_bytes(path, text.encode("utf-8"))
