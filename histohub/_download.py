"""Cache, mirrors and downloads of weights files.

Where a weights file comes from, in order: the histohub cache; then ``HISTOHUB_MIRROR``
(a URL prefix serving ``{prefix}/{filename}``, or a local folder holding the files by
name); then the manifest's sources in order: direct URLs (``requests``, streamed) and
pinned Hugging Face files (``huggingface_hub.hf_hub_download``, which keeps its own cache
and honours ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``). With ``HISTOHUB_OFFLINE=1`` nothing
touches the network: only the cache, a local mirror folder, ``file://`` sources and the
Hugging Face cache are used.

Cache layout under ``HISTOHUB_HOME`` (default ``$XDG_CACHE_HOME/histohub``, else
``~/.cache/histohub``)::

    weights/<filename>              the verified file, renamed into place atomically
    weights/<filename>.json         its verification record (below)
    weights/<filename>.<tag>.part   an interrupted download from one source, resumed (HTTP Range)
    weights/<filename>.lock         held while fetching: two processes never write the same file

Integrity. Every file is hashed (sha256) while it is streamed or copied, written to a
temporary file, fsynced, checked against the manifest's sha256 and size, and only then
renamed into place; a mismatch deletes it and the next source is tried. An entry whose
sha256 is not pinned yet is trusted on first use: its first verified download writes its
hash and size to the record, and every later load must match them.

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
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from ._manifest import ModelEntry, Source, WeightsFile
from .errors import ChecksumError, DownloadError, HistohubError, OfflineError, require

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_STREAM_CHUNK = 1 << 16  # small reads: a dropped connection loses at most this much
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class FetchedFile:
    """A verified local copy of one of an entry's weights files."""

    path: Path
    file: WeightsFile
    sha256: str


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


# --------------------------------------------------------------------------- locations


def histohub_home() -> Path:
    """``HISTOHUB_HOME``, else ``$XDG_CACHE_HOME/histohub``, else ``~/.cache/histohub``."""
    home = os.environ.get("HISTOHUB_HOME")
    if home:
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "histohub"


def weights_dir() -> Path:
    """The folder holding cached weights files by name (usable as a HISTOHUB_MIRROR too)."""
    return histohub_home() / "weights"


def cached_path(file: WeightsFile) -> Path:
    """Where ``file`` lives in the cache (whether or not it is there)."""
    return weights_dir() / file.filename


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
        return None
    record = _read_record(path)
    return "verified" if _signature_matches(file, record, stat) else "unverified"


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
    except (OSError, ValueError) as error:
        logger.warning("Ignoring unreadable cache record %s (%s)", _record_path(path), error)
        return None
    return record if isinstance(record, dict) and isinstance(record.get("sha256"), str) else None


def _expected_sha256(file: WeightsFile, record: dict | None) -> str | None:
    """The manifest's pinned hash, else the one recorded on first download, else None."""
    if file.sha256 is not None:
        return file.sha256
    return record["sha256"] if record else None


def _signature_matches(file: WeightsFile, record: dict | None, stat: os.stat_result) -> bool:
    return (record is not None and record.get("verified") == _signature(stat)
            and record["sha256"] == _expected_sha256(file, record)
            and (file.size is None or stat.st_size == file.size))


def _write_record(path: Path, file: WeightsFile, sha256: str, *, source: str) -> None:
    """Record a full verification of ``path`` (atomically; a read-only cache only logs)."""
    record = {"filename": file.filename, "sha256": sha256, "size": path.stat().st_size,
              "pinned": file.sha256 is not None, "source": source,
              "verified": _signature(path.stat())}
    target = _record_path(path)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        logger.debug("Could not write cache record %s (%s); the file will be re-hashed "
                     "on each load", target, error)


def _fsync_dir(folder: Path) -> None:
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
    if not rehash and _signature_matches(file, record, stat):
        return FetchedFile(path, file, record["sha256"])
    expected = _expected_sha256(file, record)
    digest = sha256_file(path)
    problem = _mismatch(file, expected, digest, stat.st_size)
    if problem is None:
        _write_record(path, file, digest, source=(record or {}).get("source", "cache"))
        return FetchedFile(path, file, digest)
    if repair:
        logger.warning("Cached %s is corrupt (%s); deleting it and fetching it again",
                       path, problem)
        path.unlink(missing_ok=True)
    return None


def _mismatch(file: WeightsFile, expected: str | None, digest: str, size: int) -> str | None:
    """Why (digest, size) is not ``file``, or None when it is."""
    wrong_size = file.size is not None and size != file.size
    if (expected is not None and digest != expected) or wrong_size:
        want_size = f", {file.size} bytes" if file.size is not None else ""
        return (f"expected sha256 {expected or '(not pinned)'}{want_size}; "
                f"got sha256 {digest}, {size} bytes")
    return None


# --------------------------------------------------------------------------- fetching


class _Transient(Exception):
    """A failure worth retrying (connection lost, timeout, HTTP 429/5xx)."""


def fetch_weights(entry: ModelEntry, *, progress: bool = True) -> FetchedFile:
    """The first of ``entry.weights`` that is cached or can be fetched, verified.

    Every cached alternative is tried before any network access, so a machine holding
    only the fallback file still works offline. Raises OfflineError (offline and nothing
    usable locally), ChecksumError (every candidate had the wrong hash) or DownloadError,
    each listing every source tried and what went wrong.
    """
    for file in entry.weights:
        hit = _cache_hit(file)
        if hit is not None:
            _warn_if_unpinned(entry.name, hit)
            return hit
    failures: list[tuple[str, Exception]] = []
    for file in entry.weights:
        try:
            fetched = fetch_file(file, progress=progress, name=entry.name)
        except (OfflineError, ChecksumError, DownloadError) as error:
            failures.extend(getattr(error, "failures", [(file.filename, error)]))
            continue
        _warn_if_unpinned(entry.name, fetched)
        return fetched
    raise _failure(entry.name, entry.weights, failures)


def fetch_file(file: WeightsFile, *, progress: bool = True, name: str | None = None,
               rehash: bool = False) -> FetchedFile:
    """One weights file from the cache or its sources (mirror first), verified and cached.

    ``name``: the model name, for messages. ``rehash``: re-hash a cache hit in full.
    """
    hit = _cache_hit(file, rehash=rehash)
    if hit is not None:
        return hit
    folder = weights_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(cached_path(file)):
        hit = _cache_hit(file, repair=True)  # another process may have fetched it meanwhile
        if hit is not None:
            return hit
        failures: list[tuple[str, Exception]] = []
        for label, fetch in _candidates(file, progress=progress):
            try:
                return _install(file, label, fetch)
            except (DownloadError, ChecksumError, OfflineError) as error:
                logger.debug("%s: %s", label, error)
                failures.append((label, error))
        raise _failure(name or file.filename, (file,), failures)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` (filelock: released by the OS if the process dies)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        logger.info("Waiting for another process fetching %s (lock %s)", path.name, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


Fetcher = Callable[[Path], tuple[str, int]]


def _candidates(file: WeightsFile, *, progress: bool) -> Iterator[tuple[str, Fetcher]]:
    """(label, fetch) pairs in the order to try: mirror, then the manifest's sources.
    Each fetch writes the file to the given temporary path and returns (sha256, size)."""
    offline = is_offline()
    mirror = os.environ.get("HISTOHUB_MIRROR", "").strip()
    if mirror:
        if re.match(r"^https?://", mirror):
            url = f"{mirror.rstrip('/')}/{file.filename}"
            yield f"mirror {url}", _url_fetcher(url, file, progress=progress, offline=offline)
        else:
            folder = Path(_file_url_path(mirror) if mirror.startswith("file://") else mirror)
            yield f"mirror folder {folder}", _mirror_folder_fetcher(folder, file, progress)
    for source in file.sources:
        if source.is_hf:
            label = f"Hugging Face {source.repo_id}@{source.revision[:12]}/{source.filename}"
            yield label, _hf_fetcher(source, file, progress=progress, offline=offline)
        elif source.url.startswith("file://"):
            local = Path(_file_url_path(source.url))
            yield source.url, lambda part, local=local: _copy_hashing(local, part, file, progress)
        else:
            yield source.url, _url_fetcher(source.url, file, progress=progress, offline=offline)


def _install(file: WeightsFile, label: str, fetch: Fetcher) -> FetchedFile:
    """Run ``fetch`` into a temporary file, verify it, rename it into the cache."""
    path = cached_path(file)
    part = path.with_name(f"{file.filename}.{hashlib.sha256(label.encode()).hexdigest()[:8]}"
                          ".part")
    digest, size = fetch(part)
    record = _read_record(path)
    expected = _expected_sha256(file, record)
    problem = _mismatch(file, expected, digest, size)
    if problem is not None:
        part.unlink(missing_ok=True)
        origin = ("the manifest" if file.sha256 is not None or record is None else
                  f"the hash recorded on first download in {_record_path(path)} (delete that "
                  "file if the upstream file legitimately changed)")
        raise ChecksumError(f"{file.filename} from {label}: {problem}; expected values come "
                            f"from {origin}. The bad download was deleted.")
    if file.sha256 is None:
        _check_looks_like(file, part, label)  # before trusting it on first use
    os.replace(part, path)
    _fsync_dir(path.parent)
    _write_record(path, file, digest, source=label)
    return FetchedFile(path, file, digest)


def _check_looks_like(file: WeightsFile, part: Path, label: str) -> None:
    """Refuse (and delete) a download that is not even of the declared format: an
    unpinned file would otherwise have an error page's hash recorded as its own."""
    from ._checkpoint import sniff_format
    from .errors import CheckpointError

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


def _copy_hashing(source: Path, part: Path, file: WeightsFile, progress: bool
                  ) -> tuple[str, int]:
    """Copy ``source`` to ``part`` (fsynced), hashing on the way; (sha256, size)."""
    if not source.is_file():
        raise DownloadError(f"{source} does not exist")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(source, "rb") as reader, open(part, "wb") as writer, \
                _progress_bar(source.stat().st_size, 0, file.filename, progress) as bar:
            while chunk := reader.read(_CHUNK):
                writer.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
            writer.flush()
            os.fsync(writer.fileno())
    except OSError as error:
        part.unlink(missing_ok=True)
        raise DownloadError(f"copying {source} failed: {error}") from None
    return digest.hexdigest(), size


def _mirror_folder_fetcher(folder: Path, file: WeightsFile, progress: bool) -> Fetcher:
    def fetch(part: Path) -> tuple[str, int]:
        if not folder.is_dir():
            raise DownloadError(f"HISTOHUB_MIRROR={folder} is not a folder")
        if not (folder / file.filename).is_file():
            raise DownloadError(f"{file.filename} is not in the mirror folder {folder}")
        return _copy_hashing(folder / file.filename, part, file, progress)

    return fetch


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


def _hf_fetcher(source: Source, file: WeightsFile, *, progress: bool, offline: bool) -> Fetcher:
    def fetch(part: Path) -> tuple[str, int]:
        hub = require("huggingface_hub", extra="hub",
                      purpose="Fetching weights from the Hugging Face Hub")
        local_only = offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
        kwargs = {} if progress else {"tqdm_class": _quiet_tqdm()}
        try:
            local = hub.hf_hub_download(
                source.repo_id, source.filename, revision=source.revision,
                cache_dir=_hf_cache_dir(), endpoint=os.environ.get("HF_ENDPOINT") or None,
                local_files_only=local_only, **kwargs)
        except _hf_errors() as error:
            if local_only:
                raise OfflineError(f"not in the Hugging Face cache {_hf_cache_dir()} and "
                                   f"offline mode forbids downloading it ({error})") from None
            raise DownloadError(f"{type(error).__name__}: {error}") from None
        return _copy_hashing(Path(local).resolve(), part, file, progress=False)

    return fetch


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


def _url_fetcher(url: str, file: WeightsFile, *, progress: bool, offline: bool) -> Fetcher:
    def fetch(part: Path) -> tuple[str, int]:
        if offline:
            raise OfflineError("skipped: HISTOHUB_OFFLINE=1 forbids network access")
        return download_url(url, part, expected_size=file.size, desc=file.filename,
                            progress=progress)

    return fetch


def download_url(url: str, part: Path, *, expected_size: int | None = None,
                 desc: str | None = None, progress: bool = True,
                 policy: RetryPolicy | None = None) -> tuple[str, int]:
    """Stream ``url`` into ``part`` (fsynced) with retries; returns (sha256, size).

    An existing ``part`` (an earlier interrupted attempt) is resumed with an HTTP Range
    request when the server answers 206, and restarted from zero when it answers 200.
    Transient failures (connection lost, timeouts, 429, 5xx) are retried with exponential
    backoff; the partial file is kept between attempts, and after the last one, so a later
    call resumes it. Other HTTP errors raise DownloadError at once and delete ``part``.
    """
    import requests

    policy = policy or RETRY
    last: Exception | None = None
    with requests.Session() as session:
        session.headers["User-Agent"] = "histohub"
        for attempt in range(policy.tries):
            if attempt:
                delay = policy.delay(attempt)
                logger.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", url, last,
                               delay, attempt + 1, policy.tries)
                time.sleep(delay)
            try:
                return _stream(session, url, part, expected_size=expected_size,
                               desc=desc or part.name, progress=progress, policy=policy)
            except _Transient as error:
                last = error
            except DownloadError:
                part.unlink(missing_ok=True)
                raise
    raise DownloadError(f"{url}: gave up after {policy.tries} tries ({last}); "
                        f"the partial download {part.name} is kept and will be resumed")


def _stream(session, url: str, part: Path, *, expected_size: int | None, desc: str,
            progress: bool, policy: RetryPolicy) -> tuple[str, int]:
    """One attempt of ``download_url``."""
    import requests

    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset >= expected_size:
        part.unlink()  # complete but unverified, or too long: start again
        offset = 0
    headers = {"Accept-Encoding": "identity"}  # byte ranges and sizes of the file itself
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = session.get(url, stream=True, timeout=policy.timeout, headers=headers)
    except (requests.ConnectionError, requests.Timeout) as error:
        raise _Transient(f"{type(error).__name__}: {error}") from None
    except requests.RequestException as error:  # bad URL, redirect loop: retrying won't help
        raise DownloadError(f"{url}: {type(error).__name__}: {error}") from None
    with response:
        status = response.status_code
        if status == 416 and offset:
            part.unlink()
            raise _Transient("server refused to resume (HTTP 416); restarting")
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status} {response.reason}")
        if status not in (200, 206):
            raise DownloadError(f"{url}: HTTP {status} {response.reason}")
        if status == 206 and not (offset and _range_start(response) == offset):
            part.unlink(missing_ok=True)
            raise _Transient(f"unexpected partial answer ({response.headers.get('Content-Range')})")
        resumed = status == 206
        if not resumed and offset:
            logger.info("%s: server does not support resuming; restarting from zero", url)
        return _write_body(response, part, resumed=resumed, desc=desc, progress=progress)


def _range_start(response) -> int | None:
    """Start of ``Content-Range: bytes START-END/TOTAL``, or None."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _write_body(response, part: Path, *, resumed: bool, desc: str, progress: bool
                ) -> tuple[str, int]:
    import requests

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
    written = 0
    with open(part, "ab" if resumed else "wb") as writer, \
            _progress_bar(total, offset, desc, progress) as bar:
        try:
            for chunk in response.iter_content(_STREAM_CHUNK):
                writer.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as error:
            raise _Transient(f"connection lost after {offset + written} bytes "
                             f"({type(error).__name__})") from None
        finally:
            writer.flush()
            os.fsync(writer.fileno())
    if length is not None and written != length:
        raise _Transient(f"connection closed after {offset + written} of {total} bytes")
    return digest.hexdigest(), offset + written


@contextmanager
def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
              unit_divisor=1024, disable=not enabled, leave=False) as bar:
        yield bar


# --------------------------------------------------------------------------- messages

_warned_unpinned: set[tuple[str, str]] = set()


def _warn_if_unpinned(name: str, fetched: FetchedFile) -> None:
    """Tell the user once per process that an entry is verified by first-use hash only."""
    key = (name, fetched.file.filename)
    if fetched.file.sha256 is not None or key in _warned_unpinned:
        return
    _warned_unpinned.add(key)
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
        error: HistohubError = ChecksumError(
            f"Every copy of {name!r} failed verification:\n" + "\n".join(lines))
    elif is_offline() and not any(isinstance(e, ChecksumError) for e in errors):
        error = OfflineError(
            f"{name!r} is not in the cache ({weights_dir()}) and HISTOHUB_OFFLINE=1 forbids "
            "downloading it. Tried:\n" + "\n".join(lines) + "\n" + advice)
    else:
        error = DownloadError(f"Could not fetch {name!r}. Tried:\n" + "\n".join(lines)
                              + "\n" + advice)
    error.failures = failures
    return error

