"""What every source of a weights file shares: the fetch's budget, the ``Fetcher``
contract, the progress bar, and copies of local files (mirror folders, ``file://`` URLs,
the Hugging Face cache).

Limits hold while the bytes arrive, not after: a download stops as soon as it exceeds the
expected size (or, for a file of unknown size, ``HISTOHUB_MAX_DOWNLOAD_BYTES``, default
4 GiB), a server announcing more is not read at all, and a mirror-folder file that is too
large is not copied; a copy from a folder written by ``histohub bundle`` must match the
sha256 its ``histohub-bundle.json`` recorded. All sources of one file share one deadline,
``HISTOHUB_DOWNLOAD_TIMEOUT`` seconds (default 3600; a partial download is kept and resumed
next time). Every copy is hashed (sha256) while it is written and fsynced before its hash
is returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from histohub._env import download_timeout, max_download_bytes
from histohub.errors import ChecksumError, DownloadError
from histohub.hub._cache import cache_key
from histohub.hub._schema import Source, WeightsFile
from histohub.hub._verify import CHUNK, Expected

#: What ``histohub bundle`` writes into a bundle folder: each file's sha256, checked on arrival.
BUNDLE_RECORD = "histohub-bundle.json"
#: Writes one source's copy of a file to the given temporary path; returns (sha256, size).
Fetcher = Callable[[Path], tuple[str, int]]


class DeadlinePassed(Exception):
    """HISTOHUB_DOWNLOAD_TIMEOUT ran out; the partial download is kept."""


@dataclass(frozen=True)
class Budget:
    """Limits of one fetch: at most ``max_bytes`` (``what`` says why, for messages), done
    before ``deadline`` (a ``time.monotonic()`` value) that is ``seconds`` after the start."""

    max_bytes: int
    what: str
    deadline: float
    seconds: float

    @classmethod
    def for_file(cls, expected: Expected) -> Budget:
        seconds = download_timeout()
        if expected.size is not None:
            size, what = expected.size, f"the expected {expected.size} bytes"
        else:
            size = max_download_bytes()
            what = (f"the {size} bytes allowed for a file of unknown size "
                    "(HISTOHUB_MAX_DOWNLOAD_BYTES)")
        return cls(size, what, time.monotonic() + seconds, seconds)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check_time(self, done: int) -> None:
        if self.remaining() <= 0:
            raise DeadlinePassed(f"not finished within {self.seconds:g} s "
                                 f"(HISTOHUB_DOWNLOAD_TIMEOUT) after {done} bytes")


@contextmanager
def progress_bar(total: int | None, initial: int, desc: str, enabled: bool):
    """A tqdm byte counter (``desc`` must hold no credentials), hidden unless ``enabled``."""
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
              unit_divisor=1024, disable=not enabled, leave=False) as bar:
        yield bar


def file_url_path(url: str) -> str:
    """The local path of a ``file://`` URL."""
    return unquote(urlparse(url).path)


def copy_hashing(source: Path, part: Path, file: WeightsFile, budget: Budget,
                 progress: bool) -> tuple[str, int]:
    """Copy ``source`` to ``part`` (fsynced), hashing on the way; (sha256, size). A source
    larger than the budget is not copied at all."""
    if not source.is_file():
        raise DownloadError(f"{source} does not exist")
    total = source.stat().st_size
    if total > budget.max_bytes:
        raise DownloadError(f"{source} is {total} bytes, more than {budget.what}; not copied")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(source, "rb") as reader, open(part, "wb") as writer, \
                progress_bar(total, 0, file.filename, progress) as bar:
            while chunk := reader.read(CHUNK):
                size += len(chunk)
                if size > budget.max_bytes:  # it grew while being copied
                    raise DownloadError(f"{source} grew beyond {budget.what} while being "
                                        "copied; not copied")
                writer.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
            writer.flush()
            os.fsync(writer.fileno())
    except OSError as error:
        part.unlink(missing_ok=True)
        raise DownloadError(f"copying {source} failed: {error}") from None
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def mirror_folder_fetcher(folder: Path, file: WeightsFile, budget: Budget,
                          progress: bool) -> Fetcher:
    """A folder holding the files by name, or a histohub cache's ``weights/`` folder."""
    def fetch(part: Path) -> tuple[str, int]:
        if not folder.is_dir():
            raise DownloadError(f"HISTOHUB_MIRROR={folder} is not a folder")
        for candidate in (folder / file.filename, folder / cache_key(file) / file.filename):
            if candidate.is_file():
                digest, size = copy_hashing(candidate, part, file, budget, progress)
                _check_bundle_record(folder, file, digest, part)
                return digest, size
        raise DownloadError(f"{file.filename} is not in the mirror folder {folder}")

    return fetch


def _check_bundle_record(folder: Path, file: WeightsFile, digest: str, part: Path) -> None:
    """A folder written by ``histohub bundle`` records each file's sha256: a copy that
    differs from it is refused on arrival (whatever the manifest pins)."""
    recorded = bundled_sha256(folder, cache_key(file), file.filename)
    if recorded is not None and recorded != digest:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{file.filename} in the bundle {folder} has sha256 {digest}, "
                            f"but the bundle recorded {recorded} when it was written: the "
                            "copy was changed or damaged on the way; bundle it again")


def bundled_sha256(folder: Path, key: str, filename: str) -> str | None:
    """The sha256 a bundle folder recorded for ``key/filename`` (None: not a bundle, or
    not in it)."""
    try:
        data = json.loads((folder / BUNDLE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for item in data.get("files", []) if isinstance(data, dict) else []:
        if isinstance(item, dict) and (item.get("cache_key"), item.get("filename")) == \
                (key, filename):
            return item.get("sha256")
    return None


def missing_from_package(source: Source) -> Fetcher:
    """The fetcher of a ``package`` source this installation lacks: it says so."""
    def fetch(part: Path) -> tuple[str, int]:
        raise DownloadError(f"{source.package_path} should ship with histohub but is missing "
                            "from this installation; reinstall it (pip install "
                            "--force-reinstall histohub)")
    return fetch
