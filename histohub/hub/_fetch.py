"""Fetching weights files: the first usable copy of an entry's weights, verified.

Where a weights file comes from, in order: the copy shipped inside the package; the
histohub cache; then ``HISTOHUB_MIRROR`` (a URL prefix serving ``{prefix}/{filename}``, or
a local folder holding the files by name, or a histohub cache's ``weights/`` folder); then
the manifest's sources in order: direct URLs (``_http``: ``requests``, streamed) and pinned
Hugging Face files (``_hf``). With ``HISTOHUB_OFFLINE=1`` no socket is opened: only the
cache, a local mirror folder, ``file://`` sources and the Hugging Face cache are used.
Every cached alternative of an entry is tried before any network access.

Integrity. Every file is hashed (sha256) while it is streamed or copied, written to a
temporary file, fsynced, checked (``_verify``), and only then renamed into place; a
mismatch deletes it and the next source is tried. One process at a time fetches a file:
it holds the file's lock, and a process waiting for another's download gives up after
``HISTOHUB_LOCK_TIMEOUT`` seconds (default: the download deadline plus a minute), naming
the holder. When every source fails, one error lists each with what went wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from histohub._env import (accepted_sha256s, histohub_home, is_offline, lock_timeout,
                           max_download_bytes)
from histohub._env import mirror as env_mirror
from histohub.errors import (ChecksumError, DownloadError, HistohubError, LockTimeoutError,
                             OfflineError)
from histohub.files import fsync_dir
from histohub.hub._cache import (adopt_legacy, bundled, cache_hit, cache_mismatch, cached_path,
                                 has_legacy, hf_label, read_record, weights_dir, write_record)
from histohub.hub._hf import hf_fetcher
from histohub.hub._http import url_fetcher
from histohub.hub._redact import redact
from histohub.hub._schema import ModelEntry, WeightsFile
from histohub.hub._sources import (Budget, Fetcher, copy_hashing, file_url_path,
                                   mirror_folder_fetcher, missing_from_package)
from histohub.hub._verify import Expected, FetchedFile, check_looks_like, expected_for

logger = logging.getLogger(__name__)


def _cached_or_adopted(file: WeightsFile) -> FetchedFile | None:
    """The package's own copy, a cache hit, or a verified file of the earlier flat layout
    moved into place."""
    shipped = bundled(file)
    if shipped is not None:
        return shipped
    hit = cache_hit(file)
    if hit is not None or not has_legacy(file):
        return hit
    cached_path(file).parent.mkdir(parents=True, exist_ok=True)
    with _locked(cached_path(file)):
        return cache_hit(file, repair=True) or adopt_legacy(file)


def fetch_weights(entry: ModelEntry, *, progress: bool = True) -> FetchedFile:
    """The first of ``entry.weights`` that is cached or can be fetched, verified.

    Every cached alternative is tried before any network access, so a machine holding
    only the fallback file still works offline. Raises OfflineError (offline and nothing
    usable locally), ChecksumError (every candidate had the wrong hash), DownloadError or
    LockTimeoutError, each listing every source tried and what went wrong.
    """
    for file in entry.weights:
        hit = _cached_or_adopted(file)
        if hit is not None:
            _warn_about_trust(entry.name, hit)
            return hit
    failures: list[tuple[str, Exception]] = []
    for file in entry.weights:
        try:
            fetched = fetch_file(file, progress=progress, name=entry.name)
        except (OfflineError, ChecksumError, DownloadError) as error:
            failures.extend(getattr(error, "failures", [(file.filename, error)]))
            continue
        _warn_about_trust(entry.name, fetched)
        return fetched
    raise _failure(entry.name, entry.weights, failures)


def fetch_file(file: WeightsFile, *, progress: bool = True, name: str | None = None,
               rehash: bool = False) -> FetchedFile:
    """One weights file from the cache or its sources (mirror first), verified and cached.

    ``name``: the model name, for messages. ``rehash``: re-hash a cache hit in full.
    """
    hit = bundled(file) or cache_hit(file, rehash=rehash)
    if hit is not None:
        return hit
    _check_settings()
    path = cached_path(file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        # another process may have fetched it meanwhile; or an earlier version's cache has it
        hit = cache_hit(file, repair=True) or adopt_legacy(file)
        if hit is not None:
            return hit
        expected = expected_for(file, read_record(path))
        budget = Budget.for_file(expected)
        failures: list[tuple[str, Exception]] = []
        for label, fetch in _candidates(file, expected, budget, progress=progress):
            try:
                return _install(file, label, fetch, expected, name=name)
            except (DownloadError, ChecksumError, OfflineError) as error:
                logger.debug("%s: %s", label, redact(str(error)))
                failures.append((label, error))
        raise _failure(name or file.filename, (file,), failures)


def _check_settings() -> None:
    """Read every setting a fetch uses, so that a bad value is refused (OptionError, naming
    it) before the cache is touched rather than midway, under the lock."""
    lock_timeout(), max_download_bytes(), accepted_sha256s(), is_offline()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` (filelock: released by the OS if the process dies), waiting at
    most ``lock_timeout()`` seconds; ``<path>.lock.holder`` says who holds it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path) + ".lock")
    holder = Path(str(path) + ".lock.holder")
    wait = lock_timeout()
    try:
        lock.acquire(timeout=min(0.5, wait))
    except Timeout:
        logger.info("Waiting up to %g s for %s fetching %s", wait, _holder(holder), path.name)
        try:
            lock.acquire(timeout=max(0.0, wait - 0.5))
        except Timeout:
            raise LockTimeoutError(
                f"{path.name} is being fetched by {_holder(holder)} (lock {lock.lock_file}); "
                f"gave up after waiting {wait:g} s (HISTOHUB_LOCK_TIMEOUT). Wait for it to "
                "finish, or set HISTOHUB_LOCK_TIMEOUT higher.") from None
    try:
        _write_holder(holder)
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def _write_holder(holder: Path) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    try:
        holder.write_text(json.dumps(info) + "\n", encoding="utf-8")
    except OSError as error:
        logger.debug("Could not write %s (%s)", holder, error)


def _holder(holder: Path) -> str:
    """Who holds a lock, from its ``.holder`` file: ``pid 12 on host since ...``."""
    try:
        info = json.loads(holder.read_text(encoding="utf-8"))
        return f"pid {int(info['pid'])} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it did not say which)"


def _candidates(file: WeightsFile, expected: Expected, budget: Budget, *, progress: bool
                ) -> Iterator[tuple[str, Fetcher]]:
    """(label, fetch) pairs in the order to try: mirror, then the manifest's sources.
    Each fetch writes the file to the given temporary path and returns (sha256, size).
    Labels never hold credentials."""
    offline = is_offline()
    mirror = env_mirror()
    if mirror:
        if re.match(r"^https?://", mirror):
            url = f"{mirror.rstrip('/')}/{file.filename}"
            yield f"mirror {redact(url)}", url_fetcher(url, file, expected, budget,
                                                       progress=progress, offline=offline)
        else:
            folder = Path(file_url_path(mirror) if mirror.startswith("file://") else mirror)
            yield (f"mirror folder {redact(str(folder))}",
                   mirror_folder_fetcher(folder, file, budget, progress))
    for source in file.sources:
        if source.package:   # bundled() serves it where present: this installation lacks it
            yield f"the histohub package ({source.package})", missing_from_package(source)
            continue
        if source.is_hf:
            yield hf_label(source), hf_fetcher(source, file, budget, progress=progress,
                                               offline=offline)
        elif source.url.startswith("file://"):
            local = Path(file_url_path(source.url))
            yield redact(source.url), lambda part, local=local: copy_hashing(
                local, part, file, budget, progress)
        else:
            yield redact(source.url), url_fetcher(source.url, file, expected, budget,
                                                  progress=progress, offline=offline)


def _install(file: WeightsFile, label: str, fetch: Fetcher, expected: Expected, *,
             name: str | None) -> FetchedFile:
    """Run ``fetch`` into a temporary file, verify it, rename it into the cache."""
    path = cached_path(file)
    part = path.with_name(f"{file.filename}.{hashlib.sha256(label.encode()).hexdigest()[:8]}"
                          ".part")
    digest, size = fetch(part)
    problem = cache_mismatch(file, expected, digest, size, name=name)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{file.filename} from {label}: {problem} The bad download was "
                            "deleted.")
    if expected.sha256 is None and digest not in expected.accepted:
        check_looks_like(file, part, label)  # before trusting it on first use
    os.replace(part, path)
    fsync_dir(path.parent)
    trust = expected.trust(digest)
    write_record(path, file, digest, source=label, trust=trust)
    return FetchedFile(path, file, digest, trust)


# --------------------------------------------------------------------------- messages

_warned_unpinned: set[tuple[str, str]] = set()


def _warn_about_trust(name: str, fetched: FetchedFile) -> None:
    """Tell the user once per process when an entry's file is verified only by the hash
    recorded on first use, or by one accepted in place of the reported hash."""
    key = (name, fetched.file.filename)
    if fetched.trust not in ("first use", "accepted") or key in _warned_unpinned:
        return
    _warned_unpinned.add(key)
    if fetched.trust == "accepted":
        logger.warning(
            "%s: %s (sha256 %s) was accepted with HISTOHUB_ACCEPT_SHA256 in place of the "
            "manifest's reported sha256 %s. Maintainers: `histohub pin %s` records it as "
            "verified.", name, fetched.file.filename, fetched.sha256,
            fetched.file.expected_sha256, name)
        return
    logger.warning(
        "%s: %s has no sha256 pinned in the manifest yet; it is checked against the hash "
        "recorded on its first download (%s), not against a published one. Maintainers "
        "with network: `histohub pin %s` writes the hash and size into the manifest.",
        name, fetched.file.filename, fetched.sha256, name)


def _failure(name: str, files: tuple[WeightsFile, ...],
             failures: list[tuple[str, Exception]]) -> HistohubError:
    """One error listing every source tried; its type says what went wrong overall."""
    lines = [f"  - {label}: {error}" for label, error in failures] or ["  - (no source)"]
    filenames = " or ".join(f.filename for f in files)
    home = histohub_home()
    advice = (f"Without network: run `histohub download {name}` on a connected machine and "
              f"copy its cache folder (HISTOHUB_HOME) to {home} here, or set HISTOHUB_MIRROR "
              f"to a folder (or URL prefix) holding {filenames}.")
    errors = [error for _, error in failures]
    if errors and all(isinstance(e, ChecksumError) for e in errors):
        error: HistohubError = ChecksumError(redact(
            f"Every copy of {name!r} failed verification:\n" + "\n".join(lines)))
    elif is_offline() and not any(isinstance(e, ChecksumError) for e in errors):
        error = OfflineError(redact(
            f"{name!r} is not in the cache ({weights_dir()}) and HISTOHUB_OFFLINE=1 forbids "
            "downloading it. Tried:\n" + "\n".join(lines) + "\n" + advice))
    else:
        error = DownloadError(redact(f"Could not fetch {name!r}. Tried:\n" + "\n".join(lines)
                                     + "\n" + advice))
    error.failures = failures
    return error
