"""The weights cache: its layout, cache keys, verification records and cache hits.

Cache layout under ``HISTOHUB_HOME`` (default ``$XDG_CACHE_HOME/histohub``, else
``~/.cache/histohub``), one folder per file identity (``cache_key``: the file name and
the manifest's sources, credentials left out), so no entry is ever served another
entry's bytes and two entries that both call their file ``model.safetensors`` do not
evict each other::

    weights/<key>/<filename>               the verified file, renamed into place atomically
    weights/<key>/<filename>.json          its verification record (below)
    weights/<key>/<filename>.<tag>.part    an interrupted download from one source, resumed
    weights/<key>/<filename>.lock          held while fetching (+ ``.lock.holder``: pid, host)

Files in the flat layout of earlier versions (``weights/<filename>``) are moved into their
folder on first use when they verify against the manifest's sha256, or, for a file with no
sha256 in the manifest, when their old record names one of this file's own sources;
anything else is left alone and fetched again.

Cache hits are verified too, without re-hashing on the hot path: the record also holds the
file's stat signature (size, mtime_ns, ctime_ns, inode, device) taken right after a full
verification. A hit whose signature matches the record (and whose recorded hash is the
expected one) is accepted after one ``stat`` and one small JSON read; any other hit is
re-hashed in full. Writing to a file changes its mtime and ctime (and ctime cannot be set
back), so a cache file whose bytes were changed is re-hashed, found bad, deleted and
fetched again, while a warm load costs well under a millisecond instead of the ~30 ms of
hashing a 46 MB checkpoint each time.

A file shipped inside the package (a ``package`` source) is served where it lies, hashed
and checked against the manifest at every load; it is never copied into the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from histohub._env import histohub_home
from histohub.errors import ChecksumError
from histohub.files import fsync_dir, write_text_atomic
from histohub.hub._redact import redact
from histohub.hub._schema import Source, WeightsFile
from histohub.hub._verify import Expected, FetchedFile, expected_for, mismatch, sha256_file

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- locations


def weights_dir() -> Path:
    """The folder of the weights cache (usable as a HISTOHUB_MIRROR too)."""
    return histohub_home() / "weights"


def _source_id(source: Source) -> str:
    if source.package:
        return f"package:{source.package}"
    if source.is_hf:
        return f"hf:{source.repo_id}@{source.revision}/{source.filename}"
    return redact(source.url)


def cache_key(file: WeightsFile) -> str:
    """16 hex digits naming what ``file`` is: its file name and its sources (without
    credentials). Entries naming the same file at the same sources share it."""
    identity = {"filename": file.filename, "sources": sorted(map(_source_id, file.sources))}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cached_path(file: WeightsFile) -> Path:
    """Where ``file`` lives in the cache (whether or not it is there)."""
    return weights_dir() / cache_key(file) / file.filename


def cache_status(file: WeightsFile) -> str | None:
    """``"verified"`` (record matches, cheap check), ``"unverified"`` (present, will be
    re-hashed on next use) or None (not cached). Hashes nothing."""
    path = cached_path(file)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "unverified" if has_legacy(file) else None
    record = read_record(path)
    return "verified" if _signature_matches(record, stat, expected_for(file, record)) \
        else "unverified"


# --------------------------------------------------------------------------- records


def record_path(path: Path) -> Path:
    """The verification record of the cached file ``path``."""
    return path.with_name(path.name + ".json")


def _signature(stat: os.stat_result) -> dict[str, int]:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino, "device": stat.st_dev}


def read_record(path: Path) -> dict | None:
    """The record of ``path``, or None when it is missing or unreadable."""
    try:
        record = json.loads(record_path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as error:
        logger.warning("Ignoring unreadable cache record %s (%s)", record_path(path), error)
        return None
    return record if isinstance(record, dict) and isinstance(record.get("sha256"), str) else None


def _signature_matches(record: dict | None, stat: os.stat_result, expected: Expected) -> bool:
    return (record is not None and record.get("verified") == _signature(stat)
            and expected.allows(record["sha256"], stat.st_size))


def write_record(path: Path, file: WeightsFile, sha256: str, *, source: str,
                 trust: str) -> None:
    """Record a full verification of ``path`` (atomically; a read-only cache only logs)."""
    stat = path.stat()
    record = {"filename": file.filename, "sha256": sha256, "size": stat.st_size,
              "expected_from": trust, "pinned": file.sha256 is not None,
              "source": redact(source), "identity": sorted(map(_source_id, file.sources)),
              "verified": _signature(stat)}
    target = record_path(path)
    try:
        write_text_atomic(target, json.dumps(record, indent=2) + "\n", mkdir=False)
    except OSError as error:
        logger.debug("Could not write cache record %s (%s); the file will be re-hashed "
                     "on each load", target, error)


def cache_mismatch(file: WeightsFile, expected: Expected, digest: str, size: int, *,
                   name: str | None = None) -> str | None:
    """``mismatch`` for ``file``, naming its cache record in the advice."""
    return mismatch(file, expected, digest, size, record=record_path(cached_path(file)),
                    name=name)


# --------------------------------------------------------------------------- cache hits


def cache_hit(file: WeightsFile, *, repair: bool = False, rehash: bool = False
              ) -> FetchedFile | None:
    """The cached copy of ``file`` if it verifies, else None.

    Fast path: stat signature and recorded hash match (no hashing). Otherwise the file is
    hashed; a mismatch is deleted when ``repair`` (callers hold the lock then), so it can
    be fetched again. ``rehash`` forces the full hash (``histohub pin``).
    """
    path = cached_path(file)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    record = read_record(path)
    expected = expected_for(file, record)
    if not rehash and _signature_matches(record, stat, expected):
        return FetchedFile(path, file, record["sha256"], expected.trust(record["sha256"]))
    digest = sha256_file(path)
    problem = cache_mismatch(file, expected, digest, stat.st_size)
    if problem is None:
        trust = expected.trust(digest)
        write_record(path, file, digest, source=(record or {}).get("source", "cache"),
                     trust=trust)
        return FetchedFile(path, file, digest, trust)
    if repair:
        logger.warning("Cached %s is corrupt (%s); deleting it and fetching it again",
                       path, problem)
        path.unlink(missing_ok=True)
    return None


def _source_labels(file: WeightsFile) -> set[str]:
    """How earlier versions named this file's sources in cache records."""
    labels = set()
    for source in file.sources:
        if source.is_hf:
            labels.add(hf_label(source))
        else:
            labels.update({source.url, redact(source.url)})
    return labels


def hf_label(source: Source) -> str:
    """``Hugging Face REPO@REV12/FILE``; ``main`` for a source whose revision is not pinned."""
    return f"Hugging Face {source.repo_id}@{(source.revision or 'main')[:12]}/{source.filename}"


def has_legacy(file: WeightsFile) -> bool:
    """Whether the flat layout of earlier versions has a file of ``file``'s name."""
    return (weights_dir() / file.filename).is_file()


def adopt_legacy(file: WeightsFile) -> FetchedFile | None:
    """Move ``weights/<filename>`` of earlier versions into ``file``'s folder when it is
    provably this file (callers hold ``file``'s lock); else leave it alone and return None."""
    legacy = weights_dir() / file.filename
    if not legacy.is_file():
        return None
    record = read_record(legacy)
    expected = expected_for(file, None)
    if expected.sha256 is None:  # no hash in the manifest: was it fetched from our source?
        if record is None or record.get("source") not in _source_labels(file):
            return None
        expected = Expected(record["sha256"], expected.size, "first use", expected.accepted)
    digest = sha256_file(legacy)
    if not expected.allows(digest, legacy.stat().st_size):
        return None
    target = cached_path(file)
    try:
        os.replace(legacy, target)
    except OSError as error:
        logger.debug("Could not move %s into %s (%s)", legacy, target, error)
        return None
    record_path(legacy).unlink(missing_ok=True)
    fsync_dir(target.parent)
    trust = expected.trust(digest)
    source = (record or {}).get("source", "cache of an earlier histohub")
    write_record(target, file, digest, source=source, trust=trust)
    logger.info("Moved %s from the cache layout of an earlier histohub to %s", legacy, target)
    return FetchedFile(target, file, digest, trust)


def bundled(file: WeightsFile) -> FetchedFile | None:
    """The copy shipped inside the package, hashed and checked against the manifest at
    every load (about 20 ms for 22 MB); None when this installation does not have it."""
    for source in file.sources:
        path = source.package_path
        if path is None or not path.is_file():
            continue
        size = path.stat().st_size  # compared first: a wrong size is not worth hashing
        digest = sha256_file(path) if size == file.size else "not computed (size differs)"
        if size != file.size or digest != file.sha256:
            raise ChecksumError(
                f"{file.filename} shipped in the histohub package at {path} is not the file "
                f"the manifest pins (sha256 {digest}, {size} bytes; expected {file.sha256}, "
                f"{file.size} bytes): the installation is damaged; reinstall histohub")
        return FetchedFile(path, file, digest, "verified")
    return None
