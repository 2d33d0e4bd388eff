"""Files: atomic writes (a reader sees the old file or the new one, never half of either),
and the image file suffixes histohub reads. Public: histohub and its clients (training/)
write through these.

Every file histohub writes in place (manifests, cache records, cluster results, converted
weights) goes through :func:`atomic_path`: the bytes are written to a temporary file beside
the target, flushed to disk (``fsync``), renamed over the target (``os.replace``, atomic on
POSIX and Windows) and the folder is synced; on any failure the temporary file is removed
and the target is left as it was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "atomic_path", "write_bytes_atomic", "write_text_atomic"]

#: Image files read as patches or training images (lower-case suffixes; compare with
#: ``path.suffix.lower()``, or ``name.lower().endswith(IMAGE_EXTENSIONS)``).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it replaces ``path`` on success.

    For writers that take a file name (``safetensors.save_file``, ``np.save``): whatever
    they leave at the temporary path is fsynced and renamed onto ``path`` when the block
    ends without an exception, and deleted otherwise. An existing ``path`` keeps its
    permission bits. ``mkdir`` creates missing parent folders first.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        _fsync_file(temporary)
        try:
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            pass  # a new file: the permissions the writer gave it under the umask
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, mkdir: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, mkdir=mkdir) as temporary:
        with open(temporary, "xb") as handle:
            handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, *, mkdir: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    write_bytes_atomic(path, text.encode("utf-8"), mkdir=mkdir)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the file system can."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)
