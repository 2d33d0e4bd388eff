"""Weights from URLs: streamed with retries, resumed, within the fetch's budget.

``requests`` streams each URL in small reads, hashing while it writes; an interrupted
download is kept beside the cache file and resumed with an HTTP Range request next time.
Transient failures (connection lost, timeouts, HTTP 429 and 5xx) are retried with
exponential backoff (``RETRY``) until the file's deadline. Plain ``http://`` sources that
leave the machine are refused for a file that has no sha256 to check (anyone on the way
could change it); loopback addresses are allowed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from histohub.errors import DownloadError, OfflineError
from histohub.hub._redact import redact
from histohub.hub._schema import WeightsFile
from histohub.hub._sources import Budget, DeadlinePassed, Fetcher, progress_bar
from histohub.hub._verify import CHUNK, Expected

logger = logging.getLogger(__name__)

_STREAM_CHUNK = 1 << 16  # small reads: a dropped connection loses at most this much


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


class _Transient(Exception):
    """A failure worth retrying (connection lost, timeout, HTTP 429/5xx)."""


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_fetcher(url: str, file: WeightsFile, expected: Expected, budget: Budget, *,
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


def download_url(url: str, part: Path, *, budget: Budget | None = None,
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
    budget = budget or Budget.for_file(Expected(None, None, "none"))
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
        except DeadlinePassed as error:
            raise DownloadError(f"{shown}: {error}; the partial download {part.name} is kept "
                                "and will be resumed") from None
    raise DownloadError(f"{shown}: gave up after {policy.tries} tries ({last}); "
                        f"the partial download {part.name} is kept and will be resumed")


def _stream(session, url: str, part: Path, *, budget: Budget, desc: str, progress: bool,
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
                budget: Budget, shown: str) -> tuple[str, int]:
    """Append the body to ``part`` (hashing what is already there when ``resumed``),
    refusing a body announced or found to be larger than the budget."""
    digest = hashlib.sha256()
    offset = 0
    if resumed:
        with open(part, "rb") as existing:
            while chunk := existing.read(CHUNK):
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
            progress_bar(total, offset, desc, progress) as bar:
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


def _body_chunks(response, budget: Budget, done: Callable[[], int]) -> Iterator[bytes]:
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
