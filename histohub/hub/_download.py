"""Cache, mirrors and downloads of weights files.

Where a weights file comes from, in order: the histohub cache; then ``HISTOHUB_MIRROR``
(a URL prefix serving ``{prefix}/{filename}``, or a local folder holding the files by
name, or a histohub cache's ``weights/`` folder); then the manifest's sources in order:
direct URLs (``requests``, streamed) and pinned Hugging Face files
(``huggingface_hub.hf_hub_download``, which keeps its own cache and honours ``HF_ENDPOINT``
and ``HF_HUB_OFFLINE``). With ``HISTOHUB_OFFLINE=1`` no socket is opened: only the cache,
a local mirror folder, ``file://`` sources and the Hugging Face cache are used, and
huggingface_hub's own offline switch is on for the duration of its call.

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

What a file must match, strongest first: the manifest's ``sha256``/``size`` (verified by
``histohub pin``); a hash accepted with ``HISTOHUB_ACCEPT_SHA256`` and remembered in the
cache record; the manifest's ``reported`` sha256/size (published by others, not verified by
histohub: enforced the same way, and a mismatch says so); the hash recorded on the first
download (trust on first use, with a warning). A download whose hash differs from a
*reported* one is refused, since it may be a proxy's or mirror's answer or a changed
release; whoever has checked the new file by other means accepts exactly that file with
``HISTOHUB_ACCEPT_SHA256=<its sha256>`` (comma-separated for several), and a maintainer
then runs ``histohub pin NAME`` with the same setting to write it into the manifest as
verified.

Integrity. Every file is hashed (sha256) while it is streamed or copied, written to a
temporary file, fsynced, checked, and only then renamed into place; a mismatch deletes it
and the next source is tried. Limits hold while the bytes arrive, not after: a download
stops as soon as it exceeds the expected size (or, for a file of unknown size,
``HISTOHUB_MAX_DOWNLOAD_BYTES``, default 4 GiB), a server announcing more is not read at
all, and a mirror-folder file that is too large is not copied. All sources of one file
share one deadline, ``HISTOHUB_DOWNLOAD_TIMEOUT`` seconds (default 3600; a partial download
is kept and resumed next time), and a process waiting for another's download lock gives up
after ``HISTOHUB_LOCK_TIMEOUT`` seconds (default: the download deadline plus a minute),
naming the holder. Plain ``http://`` sources that leave the machine are refused for a file
that has no sha256 to check (anyone on the way could change it); loopback addresses are
allowed. Credentials in URLs (``https://user:password@host/...``) are used to connect but
never written to a cache record nor shown in a message, log line or progress bar.

Cache hits are verified too, without re-hashing on the hot path: the record also holds the
file's stat signature (size, mtime_ns, ctime_ns, inode, device) taken right after a full
verification. A hit whose signature matches the record (and whose recorded hash is the
expected one) is accepted after one ``stat`` and one small JSON read; any other hit is
re-hashed in full. Writing to a file changes its mtime and ctime (and ctime cannot be set
back), so a cache file whose bytes were changed is re-hashed, found bad, deleted and
fetched again, while a warm load costs well under a millisecond instead of the ~30 ms of
hashing a 46 MB checkpoint each time.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

from histohub.files import fsync_dir, write_text_atomic
from histohub.hub._schema import ModelEntry, Source, WeightsFile
from histohub.errors import (ChecksumError, DownloadError, HistohubError, LockTimeoutError,
                     OfflineError, require)

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_STREAM_CHUNK = 1 << 16  # small reads: a dropped connection loses at most this much
_TRUE = ("1", "true", "yes", "on")
DEFAULT_MAX_DOWNLOAD_BYTES = 4 << 30
DEFAULT_DOWNLOAD_TIMEOUT = 3600.0


@dataclass(frozen=True)
class FetchedFile:
    """A verified local copy of one of an entry's weights files; ``trust`` says what it
    was verified against: ``"verified"``, ``"accepted"``, ``"reported"`` or ``"first use"``."""

    path: Path
    file: WeightsFile
    sha256: str
    trust: str = "first use"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one URL: ``tries`` attempts on transient errors (connection lost,
    timeouts, HTTP 429 and 5xx), sleeping ``base_delay * 2**k`` (at most ``max_delay``)
    seconds between them; ``timeout`` is requests' (connect, read) timeout in seconds."""

    tries: int = 4
    base_delay: float = 1.0
    max_delay: float = 16.0
    timeout: tuple[float, float] = (10.0, 60.0)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (1 = the first retry)."""
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1))


#: The policy every URL download uses (tests replace it with one of short delays).
RETRY = RetryPolicy()


def sha256_file(path: str | os.PathLike, *, chunk_size: int = _CHUNK) -> str:
    """Full hex sha256 of a file, read in chunks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- settings


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise DownloadError(f"{name} must be a positive number, got {value!r}")
    return number


def max_download_bytes() -> int:
    """``HISTOHUB_MAX_DOWNLOAD_BYTES``: the most a file of unknown size may have."""
    return int(_env_number("HISTOHUB_MAX_DOWNLOAD_BYTES", DEFAULT_MAX_DOWNLOAD_BYTES))


def download_timeout() -> float:
    """``HISTOHUB_DOWNLOAD_TIMEOUT``: seconds all sources of one file may take together."""
    return _env_number("HISTOHUB_DOWNLOAD_TIMEOUT", DEFAULT_DOWNLOAD_TIMEOUT)


def lock_timeout() -> float:
    """``HISTOHUB_LOCK_TIMEOUT``: seconds to wait for another process's download."""
    return _env_number("HISTOHUB_LOCK_TIMEOUT", download_timeout() + 60.0)


def accepted_sha256s() -> frozenset[str]:
    """Hashes a maintainer accepted in place of reported ones (``HISTOHUB_ACCEPT_SHA256``)."""
    values = {v for v in re.split(r"[,\s]+", os.environ.get("HISTOHUB_ACCEPT_SHA256", "")) if v}
    bad = sorted(v for v in values if not re.fullmatch(r"[0-9a-f]{64}", v))
    if bad:
        raise ChecksumError(f"HISTOHUB_ACCEPT_SHA256 takes full 64-hex lower-case sha256 "
                            f"values, got {bad[0]!r}")
    return frozenset(values)


# --------------------------------------------------------------------------- credentials

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#@\s]*@")


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it removed."""
    return _USERINFO.sub(r"\1", text)


# --------------------------------------------------------------------------- locations


def histohub_home() -> Path:
    """``HISTOHUB_HOME``, else ``$XDG_CACHE_HOME/histohub``, else ``~/.cache/histohub``."""
    home = os.environ.get("HISTOHUB_HOME")
    if home:
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "histohub"


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


def is_offline() -> bool:
    """True when ``HISTOHUB_OFFLINE`` is set to 1/true/yes/on."""
    return os.environ.get("HISTOHUB_OFFLINE", "").strip().lower() in _TRUE


def cache_status(file: WeightsFile) -> str | None:
    """``"verified"`` (record matches, cheap check), ``"unverified"`` (present, will be
    re-hashed on next use) or None (not cached). Hashes nothing."""
    path = cached_path(file)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "unverified" if (weights_dir() / file.filename).is_file() else None
    record = _read_record(path)
    return "verified" if _signature_matches(record, stat, _expected(file, record)) \
        else "unverified"


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class _Expected:
    """What a copy of a file must be: ``sha256`` and ``size`` (None: anything), where they
    come from (``kind``), and hashes accepted instead by HISTOHUB_ACCEPT_SHA256."""

    sha256: str | None
    size: int | None
    kind: str  # "verified", "accepted", "reported", "first use" or "none"
    accepted: frozenset[str] = frozenset()

    def allows(self, digest: str, size: int) -> bool:
        if digest in self.accepted:
            return True
        return (self.sha256 in (None, digest)) and (self.size in (None, size))

    def trust(self, digest: str) -> str:
        """What a copy with ``digest`` that ``allows`` accepted is trusted as."""
        if digest in self.accepted and digest != self.sha256:
            return "accepted"
        return "first use" if self.kind == "none" else self.kind


def _expected(file: WeightsFile, record: dict | None) -> _Expected:
    """The strongest expectation for ``file``, given its cache record (see the module doc)."""
    if file.sha256 is not None:
        return _Expected(file.sha256, file.size, "verified")
    accepted = accepted_sha256s()
    size = None if accepted else file.expected_size  # an accepted file may differ in size
    if record is not None and record.get("expected_from") == "accepted":
        return _Expected(record["sha256"], None, "accepted", accepted)
    if file.expected_sha256 is not None:
        return _Expected(file.expected_sha256, size, "reported", accepted)
    if record is not None:
        return _Expected(record["sha256"], size, "first use", accepted)
    return _Expected(None, size, "none", accepted)


def _mismatch(file: WeightsFile, expected: _Expected, digest: str, size: int, *,
              name: str | None = None) -> str | None:
    """Why (digest, size) is not ``file`` and what to do, or None when it is."""
    if expected.allows(digest, size):
        return None
    want = f"sha256 {expected.sha256}" if expected.sha256 else "any sha256"
    if expected.size is not None:
        want += f", {expected.size} bytes"
    record = _record_path(cached_path(file))
    origin = {
        "verified": "verified by `histohub pin` (the manifest's sha256 and size)",
        "accepted": f"accepted earlier with HISTOHUB_ACCEPT_SHA256 and remembered in {record} "
                    "(delete that file to return to the manifest's values)",
        "reported": "reported, not verified by histohub: "
                    + (file.reported.note if file.reported else ""),
        "first use": f"the hash recorded on first download in {record} (delete that file if "
                     "the upstream file legitimately changed)",
        "none": "the size the manifest reports",
    }[expected.kind]
    text = f"expected {want} ({origin}); got sha256 {digest}, {size} bytes."
    if expected.kind == "reported":
        text += (" Either this copy is not the upstream file (a proxy's or a mirror's answer, "
                 "a changed release) or the report is wrong. If you have checked this file "
                 f"by other means, accept exactly it with HISTOHUB_ACCEPT_SHA256={digest} "
                 "(remembered by the cache); maintainers then run `histohub pin "
                 f"{name or 'NAME'}` with that setting to record it as verified.")
    return text


# --------------------------------------------------------------------------- records


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _signature(stat: os.stat_result) -> dict[str, int]:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino, "device": stat.st_dev}


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(_record_path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as error:
        logger.warning("Ignoring unreadable cache record %s (%s)", _record_path(path), error)
        return None
    return record if isinstance(record, dict) and isinstance(record.get("sha256"), str) else None


def _signature_matches(record: dict | None, stat: os.stat_result, expected: _Expected) -> bool:
    return (record is not None and record.get("verified") == _signature(stat)
            and expected.allows(record["sha256"], stat.st_size))


def _write_record(path: Path, file: WeightsFile, sha256: str, *, source: str,
                  trust: str) -> None:
    """Record a full verification of ``path`` (atomically; a read-only cache only logs)."""
    stat = path.stat()
    record = {"filename": file.filename, "sha256": sha256, "size": stat.st_size,
              "expected_from": trust, "pinned": file.sha256 is not None,
              "source": redact(source), "identity": sorted(map(_source_id, file.sources)),
              "verified": _signature(stat)}
    target = _record_path(path)
    try:
        write_text_atomic(target, json.dumps(record, indent=2) + "\n", mkdir=False)
    except OSError as error:
        logger.debug("Could not write cache record %s (%s); the file will be re-hashed "
                     "on each load", target, error)


# --------------------------------------------------------------------------- cache hits


def _cache_hit(file: WeightsFile, *, repair: bool = False, rehash: bool = False
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
    record = _read_record(path)
    expected = _expected(file, record)
    if not rehash and _signature_matches(record, stat, expected):
        return FetchedFile(path, file, record["sha256"], expected.trust(record["sha256"]))
    digest = sha256_file(path)
    problem = _mismatch(file, expected, digest, stat.st_size)
    if problem is None:
        trust = expected.trust(digest)
        _write_record(path, file, digest, source=(record or {}).get("source", "cache"),
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
            labels.add(_hf_label(source))
        else:
            labels.update({source.url, redact(source.url)})
    return labels


def _adopt_legacy(file: WeightsFile) -> FetchedFile | None:
    """Move ``weights/<filename>`` of earlier versions into ``file``'s folder when it is
    provably this file (callers hold ``file``'s lock); else leave it alone and return None."""
    legacy = weights_dir() / file.filename
    if not legacy.is_file():
        return None
    record = _read_record(legacy)
    expected = _expected(file, None)
    if expected.sha256 is None:  # no hash in the manifest: was it fetched from our source?
        if record is None or record.get("source") not in _source_labels(file):
            return None
        expected = _Expected(record["sha256"], expected.size, "first use", expected.accepted)
    digest = sha256_file(legacy)
    if not expected.allows(digest, legacy.stat().st_size):
        return None
    target = cached_path(file)
    try:
        os.replace(legacy, target)
    except OSError as error:
        logger.debug("Could not move %s into %s (%s)", legacy, target, error)
        return None
    _record_path(legacy).unlink(missing_ok=True)
    fsync_dir(target.parent)
    trust = expected.trust(digest)
    source = (record or {}).get("source", "cache of an earlier histohub")
    _write_record(target, file, digest, source=source, trust=trust)
    logger.info("Moved %s from the cache layout of an earlier histohub to %s", legacy, target)
    return FetchedFile(target, file, digest, trust)


def _bundled(file: WeightsFile) -> FetchedFile | None:
    """The copy shipped inside the package, hashed and checked against the manifest at
    every load (about 20 ms for 22 MB); None when this installation does not have it."""
    for source in file.sources:
        path = source.package_path
        if path is None or not path.is_file():
            continue
        size, digest = path.stat().st_size, sha256_file(path)
        if size != file.size or digest != file.sha256:
            raise ChecksumError(
                f"{file.filename} shipped in the histohub package at {path} is not the file "
                f"the manifest pins (sha256 {digest}, {size} bytes; expected {file.sha256}, "
                f"{file.size} bytes): the installation is damaged; reinstall histohub")
        return FetchedFile(path, file, digest, "verified")
    return None


def _cached_or_adopted(file: WeightsFile) -> FetchedFile | None:
    """The package's own copy, a cache hit, or a verified file of the earlier flat layout
    moved into place."""
    bundled = _bundled(file)
    if bundled is not None:
        return bundled
    hit = _cache_hit(file)
    if hit is not None or not (weights_dir() / file.filename).is_file():
        return hit
    cached_path(file).parent.mkdir(parents=True, exist_ok=True)
    with _locked(cached_path(file)):
        return _cache_hit(file, repair=True) or _adopt_legacy(file)


# --------------------------------------------------------------------------- fetching


class _Transient(Exception):
    """A failure worth retrying (connection lost, timeout, HTTP 429/5xx)."""


class _DeadlinePassed(Exception):
    """HISTOHUB_DOWNLOAD_TIMEOUT ran out; the partial download is kept."""


@dataclass(frozen=True)
class _Budget:
    """Limits of one fetch: at most ``max_bytes`` (``what`` says why, for messages), done
    before ``deadline`` (a ``time.monotonic()`` value) that is ``seconds`` after the start."""

    max_bytes: int
    what: str
    deadline: float
    seconds: float

    @classmethod
    def for_file(cls, expected: _Expected) -> _Budget:
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
            raise _DeadlinePassed(f"not finished within {self.seconds:g} s "
                                  f"(HISTOHUB_DOWNLOAD_TIMEOUT) after {done} bytes")


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
    hit = _bundled(file) or _cache_hit(file, rehash=rehash)
    if hit is not None:
        return hit
    path = cached_path(file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        # another process may have fetched it meanwhile; or an earlier version's cache has it
        hit = _cache_hit(file, repair=True) or _adopt_legacy(file)
        if hit is not None:
            return hit
        expected = _expected(file, _read_record(path))
        budget = _Budget.for_file(expected)
        failures: list[tuple[str, Exception]] = []
        for label, fetch in _candidates(file, expected, budget, progress=progress):
            try:
                return _install(file, label, fetch, expected, name=name)
            except (DownloadError, ChecksumError, OfflineError) as error:
                logger.debug("%s: %s", label, redact(str(error)))
                failures.append((label, error))
        raise _failure(name or file.filename, (file,), failures)


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


Fetcher = Callable[[Path], tuple[str, int]]


def _candidates(file: WeightsFile, expected: _Expected, budget: _Budget, *, progress: bool
                ) -> Iterator[tuple[str, Fetcher]]:
    """(label, fetch) pairs in the order to try: mirror, then the manifest's sources.
    Each fetch writes the file to the given temporary path and returns (sha256, size).
    Labels never hold credentials."""
    offline = is_offline()
    mirror = os.environ.get("HISTOHUB_MIRROR", "").strip()
    if mirror:
        if re.match(r"^https?://", mirror):
            url = f"{mirror.rstrip('/')}/{file.filename}"
            yield f"mirror {redact(url)}", _url_fetcher(url, file, expected, budget,
                                                        progress=progress, offline=offline)
        else:
            folder = Path(_file_url_path(mirror) if mirror.startswith("file://") else mirror)
            yield (f"mirror folder {redact(str(folder))}",
                   _mirror_folder_fetcher(folder, file, budget, progress))
    for source in file.sources:
        if source.package:   # _bundled() serves it where present: this installation lacks it
            yield f"the histohub package ({source.package})", _missing_from_package(source)
            continue
        if source.is_hf:
            label = _hf_label(source)
            yield label, _hf_fetcher(source, file, budget, progress=progress, offline=offline)
        elif source.url.startswith("file://"):
            local = Path(_file_url_path(source.url))
            yield redact(source.url), lambda part, local=local: _copy_hashing(
                local, part, file, budget, progress)
        else:
            yield redact(source.url), _url_fetcher(source.url, file, expected, budget,
                                                   progress=progress, offline=offline)


def _hf_label(source: Source) -> str:
    """``Hugging Face REPO@REV12/FILE``; ``main`` for a source whose revision is not pinned."""
    return f"Hugging Face {source.repo_id}@{(source.revision or 'main')[:12]}/{source.filename}"


def _missing_from_package(source: Source) -> Fetcher:
    def fetch(part: Path) -> tuple[str, int]:
        raise DownloadError(f"{source.package_path} should ship with histohub but is missing "
                            "from this installation; reinstall it (pip install "
                            "--force-reinstall histohub)")
    return fetch


def _install(file: WeightsFile, label: str, fetch: Fetcher, expected: _Expected, *,
             name: str | None) -> FetchedFile:
    """Run ``fetch`` into a temporary file, verify it, rename it into the cache."""
    path = cached_path(file)
    part = path.with_name(f"{file.filename}.{hashlib.sha256(label.encode()).hexdigest()[:8]}"
                          ".part")
    digest, size = fetch(part)
    problem = _mismatch(file, expected, digest, size, name=name)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{file.filename} from {label}: {problem} The bad download was "
                            "deleted.")
    if expected.sha256 is None and digest not in expected.accepted:
        _check_looks_like(file, part, label)  # before trusting it on first use
    os.replace(part, path)
    fsync_dir(path.parent)
    trust = expected.trust(digest)
    _write_record(path, file, digest, source=label, trust=trust)
    return FetchedFile(path, file, digest, trust)


def _check_looks_like(file: WeightsFile, part: Path, label: str) -> None:
    """Refuse (and delete) a download that is not even of the declared format: an
    unpinned file would otherwise have an error page's hash recorded as its own."""
    from histohub.hub._checkpoint import sniff_format
    from histohub.errors import CheckpointError

    try:
        found = sniff_format(part)
    except CheckpointError:
        found = None
    if found != ("safetensors" if file.format == "safetensors" else "torch"):
        with open(part, "rb") as handle:
            head = handle.read(16)
        part.unlink(missing_ok=True)
        raise DownloadError(f"{file.filename} from {label} is not a {file.format} file "
                            f"(it starts with {head!r}: an error or login page?); deleted, "
                            "nothing recorded")


def _file_url_path(url: str) -> str:
    return unquote(urlparse(url).path)


# --------------------------------------------------------------------------- local copies


def _copy_hashing(source: Path, part: Path, file: WeightsFile, budget: _Budget,
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
                _progress_bar(total, 0, file.filename, progress) as bar:
            while chunk := reader.read(_CHUNK):
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


def _mirror_folder_fetcher(folder: Path, file: WeightsFile, budget: _Budget,
                           progress: bool) -> Fetcher:
    """A folder holding the files by name, or a histohub cache's ``weights/`` folder."""
    def fetch(part: Path) -> tuple[str, int]:
        if not folder.is_dir():
            raise DownloadError(f"HISTOHUB_MIRROR={folder} is not a folder")
        for candidate in (folder / file.filename, folder / cache_key(file) / file.filename):
            if candidate.is_file():
                digest, size = _copy_hashing(candidate, part, file, budget, progress)
                _check_bundle_record(folder, file, digest, part)
                return digest, size
        raise DownloadError(f"{file.filename} is not in the mirror folder {folder}")

    return fetch


def _check_bundle_record(folder: Path, file: WeightsFile, digest: str, part: Path) -> None:
    """A folder written by ``histohub bundle`` records each file's sha256: a copy that
    differs from it is refused on arrival (whatever the manifest pins)."""
    from histohub.hub._bundle import bundled_sha256

    recorded = bundled_sha256(folder, cache_key(file), file.filename)
    if recorded is not None and recorded != digest:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{file.filename} in the bundle {folder} has sha256 {digest}, "
                            f"but the bundle recorded {recorded} when it was written: the "
                            "copy was changed or damaged on the way; bundle it again")


# --------------------------------------------------------------------------- Hugging Face


def _hf_cache_dir() -> str:
    """huggingface_hub's cache folder as its environment variables say *now* (the library
    reads them once at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    cache = (os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
             or os.path.join(home, "hub"))
    return os.path.expandvars(os.path.expanduser(cache))


@contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """huggingface_hub's own offline switch on for the duration (it reads HF_HUB_OFFLINE
    once, at import, into ``huggingface_hub.constants.HF_HUB_OFFLINE``); every request it
    would make then raises instead of opening a socket."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _hf_fetcher(source: Source, file: WeightsFile, budget: _Budget, *, progress: bool,
                offline: bool) -> Fetcher:
    def fetch(part: Path) -> tuple[str, int]:
        hub = require("huggingface_hub", extra="hub",
                      purpose="Fetching weights from the Hugging Face Hub")
        local_only = offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
        endpoint = os.environ.get("HF_ENDPOINT") or None
        kwargs = {} if progress else {"tqdm_class": _quiet_tqdm()}
        try:
            with _hub_offline(local_only):
                if not local_only:
                    _hf_check_size(hub, source, endpoint, budget)
                local = hub.hf_hub_download(
                    source.repo_id, source.filename, revision=source.revision,
                    cache_dir=_hf_cache_dir(), endpoint=endpoint,
                    local_files_only=local_only, **kwargs)
        except _hf_errors() as error:
            if local_only:
                raise OfflineError(f"not in the Hugging Face cache {_hf_cache_dir()} and "
                                   "offline mode forbids downloading it "
                                   f"({redact(str(error))})") from None
            raise DownloadError(f"{type(error).__name__}: {redact(str(error))}") from None
        return _copy_hashing(Path(local).resolve(), part, file, budget, progress=False)

    return fetch


def _hf_check_size(hub, source: Source, endpoint: str | None, budget: _Budget) -> None:
    """Refuse before downloading when the Hub announces more than the budget allows (the
    copy out of the Hub's cache is capped too). Skipped when the Hub's cache has the file;
    when the check itself fails, ``hf_hub_download`` reports (or works around) it."""
    cached = hub.try_to_load_from_cache(source.repo_id, source.filename,
                                        cache_dir=_hf_cache_dir(), revision=source.revision)
    if isinstance(cached, str):
        return
    url = hub.hf_hub_url(source.repo_id, source.filename, revision=source.revision,
                         endpoint=endpoint)
    try:
        size = hub.get_hf_file_metadata(url).size
    except _hf_errors() as error:
        logger.debug("size check of %s failed: %s", redact(url), redact(str(error)))
        return
    if size is not None and size > budget.max_bytes:
        raise DownloadError(f"the Hub announces {size} bytes, more than {budget.what}; "
                            "not downloaded")


def _hf_errors() -> tuple[type[BaseException], ...]:
    """What ``hf_hub_download`` raises for network, HTTP and cache failures."""
    from huggingface_hub import file_download

    errors: list[type[BaseException]] = [OSError, ValueError]
    for client in ("httpx2", "httpx", "requests"):
        module = getattr(file_download, client, None)
        http_error = getattr(module, "HTTPError", None) or getattr(module, "RequestException",
                                                                    None)
        if isinstance(http_error, type):
            errors.append(http_error)
    return tuple(errors)


def _quiet_tqdm():
    from tqdm.auto import tqdm

    class QuietTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm


# --------------------------------------------------------------------------- URLs


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_fetcher(url: str, file: WeightsFile, expected: _Expected, budget: _Budget, *,
                 progress: bool, offline: bool) -> Fetcher:
    def fetch(part: Path) -> tuple[str, int]:
        if offline:
            raise OfflineError("skipped: HISTOHUB_OFFLINE=1 forbids network access")
        if url.lower().startswith("http://") and expected.sha256 is None \
                and not _is_loopback(url):
            raise DownloadError(
                f"refused: plain http:// can be changed by anyone on the way, and "
                f"{file.filename} has no sha256 to check it against. Use an https:// URL, "
                "or pin the file's sha256 in the manifest first (`histohub pin`)")
        return download_url(url, part, budget=budget, desc=file.filename, progress=progress)

    return fetch


def download_url(url: str, part: Path, *, budget: _Budget | None = None,
                 desc: str | None = None, progress: bool = True,
                 policy: RetryPolicy | None = None) -> tuple[str, int]:
    """Stream ``url`` into ``part`` (fsynced) with retries; returns (sha256, size).

    An existing ``part`` (an earlier interrupted attempt) is resumed with an HTTP Range
    request when the server answers 206, and restarted from zero when it answers 200.
    Transient failures (connection lost, timeouts, 429, 5xx) are retried with exponential
    backoff; the partial file is kept between attempts, after the last one and when the
    deadline passes, so a later call resumes it. Other HTTP errors, and a body longer than
    the budget allows, raise DownloadError at once and delete ``part``.
    """
    import requests

    policy = policy or RETRY
    budget = budget or _Budget.for_file(_Expected(None, None, "none"))
    shown = redact(url)
    last: Exception | None = None
    with requests.Session() as session:
        session.headers["User-Agent"] = "histohub"
        try:
            for attempt in range(policy.tries):
                if attempt:
                    delay = min(policy.delay(attempt), max(0.0, budget.remaining()))
                    logger.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", shown,
                                   last, delay, attempt + 1, policy.tries)
                    time.sleep(delay)
                budget.check_time(part.stat().st_size if part.exists() else 0)
                try:
                    return _stream(session, url, part, budget=budget, desc=desc or part.name,
                                   progress=progress, policy=policy)
                except _Transient as error:
                    last = error
                except DownloadError:
                    part.unlink(missing_ok=True)
                    raise
        except _DeadlinePassed as error:
            raise DownloadError(f"{shown}: {error}; the partial download {part.name} is kept "
                                "and will be resumed") from None
    raise DownloadError(f"{shown}: gave up after {policy.tries} tries ({last}); "
                        f"the partial download {part.name} is kept and will be resumed")


def _stream(session, url: str, part: Path, *, budget: _Budget, desc: str, progress: bool,
            policy: RetryPolicy) -> tuple[str, int]:
    """One attempt of ``download_url``."""
    import requests

    shown = redact(url)
    offset = part.stat().st_size if part.exists() else 0
    if offset >= budget.max_bytes:
        part.unlink()  # complete but unverified, or too long: start again
        offset = 0
    headers = {"Accept-Encoding": "identity"}  # byte ranges and sizes of the file itself
    if offset:
        headers["Range"] = f"bytes={offset}-"
    left = max(budget.remaining(), 0.1)
    timeout = (min(policy.timeout[0], left), min(policy.timeout[1], left))
    try:
        response = session.get(url, stream=True, timeout=timeout, headers=headers)
    except (requests.ConnectionError, requests.Timeout) as error:
        raise _Transient(f"{type(error).__name__}: {redact(str(error))}") from None
    except requests.RequestException as error:  # bad URL, redirect loop: retrying won't help
        raise DownloadError(f"{shown}: {type(error).__name__}: {redact(str(error))}") from None
    with response:
        status = response.status_code
        if status == 416 and offset:
            part.unlink()
            raise _Transient("server refused to resume (HTTP 416); restarting")
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status} {response.reason}")
        if status not in (200, 206):
            raise DownloadError(f"{shown}: HTTP {status} {response.reason}")
        if status == 206 and not (offset and _range_start(response) == offset):
            part.unlink(missing_ok=True)
            raise _Transient(f"unexpected partial answer ({response.headers.get('Content-Range')})")
        resumed = status == 206
        if not resumed and offset:
            logger.info("%s: server does not support resuming; restarting from zero", shown)
        return _write_body(response, part, resumed=resumed, desc=desc, progress=progress,
                           budget=budget, shown=shown)


def _range_start(response) -> int | None:
    """Start of ``Content-Range: bytes START-END/TOTAL``, or None."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _write_body(response, part: Path, *, resumed: bool, desc: str, progress: bool,
                budget: _Budget, shown: str) -> tuple[str, int]:
    """Append the body to ``part`` (hashing what is already there when ``resumed``),
    refusing a body announced or found to be larger than the budget."""
    digest = hashlib.sha256()
    offset = 0
    if resumed:
        with open(part, "rb") as existing:
            while chunk := existing.read(_CHUNK):
                digest.update(chunk)
                offset += len(chunk)
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    total = offset + length if length is not None else None
    if total is not None and total > budget.max_bytes:
        raise DownloadError(f"{shown} announces {total} bytes, more than {budget.what}; "
                            "not downloaded")
    written = 0
    with open(part, "ab" if resumed else "wb") as writer, \
            _progress_bar(total, offset, desc, progress) as bar:
        try:
            for chunk in _body_chunks(response, budget, lambda: offset + written):
                if offset + written + len(chunk) > budget.max_bytes:
                    raise DownloadError(f"{shown} sent more than {budget.what}; stopped "
                                        "there")
                writer.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        finally:
            writer.flush()
            os.fsync(writer.fileno())
    if length is not None and written != length:
        raise _Transient(f"connection closed after {offset + written} of {total} bytes")
    return digest.hexdigest(), offset + written


def _body_chunks(response, budget: _Budget, done: Callable[[], int]) -> Iterator[bytes]:
    """The body as it arrives: each chunk is what one socket read returned (``read1``), so
    a server trickling bytes cannot hold a read past the deadline, checked between reads."""
    import requests
    from urllib3.exceptions import HTTPError as Urllib3Error

    raw = response.raw
    read = getattr(raw, "read1", None) or raw.read  # urllib3 < 2 has no read1
    while True:
        budget.check_time(done())
        try:
            chunk = read(_STREAM_CHUNK, decode_content=True)
        except (Urllib3Error, requests.RequestException, OSError) as error:
            raise _Transient(f"connection lost after {done()} bytes "
                             f"({type(error).__name__})") from None
        if not chunk:
            return
        yield chunk


@contextmanager
def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
              unit_divisor=1024, disable=not enabled, leave=False) as bar:
        yield bar


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
