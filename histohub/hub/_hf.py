"""Weights from pinned Hugging Face files.

``huggingface_hub.hf_hub_download`` fetches them; it keeps its own cache and honours
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` (read here as huggingface_hub reads them, but when
asked rather than once at import). With ``HISTOHUB_OFFLINE=1`` only the Hugging Face cache
is used and huggingface_hub's own offline switch is on for the duration of its call, so no
socket is opened. The file is then copied out of the Hub's cache, hashed and capped by the
fetch's budget like any local copy; a file the Hub announces as larger than the budget is
not downloaded at all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histohub.errors import DownloadError, OfflineError, require
from histohub.hub._redact import redact
from histohub.hub._schema import Source, WeightsFile
from histohub.hub._sources import Budget, Fetcher, copy_hashing

logger = logging.getLogger(__name__)

_HF_TRUE = ("1", "true", "yes", "on")  # huggingface_hub's own reading of HF_HUB_OFFLINE




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


def hf_fetcher(source: Source, file: WeightsFile, budget: Budget, *, progress: bool,
               offline: bool) -> Fetcher:
    def fetch(part: Path) -> tuple[str, int]:
        hub = require("huggingface_hub", extra="hub",
                      purpose="Fetching weights from the Hugging Face Hub")
        local_only = offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in _HF_TRUE
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
        return copy_hashing(Path(local).resolve(), part, file, budget, progress=False)

    return fetch


def _hf_check_size(hub, source: Source, endpoint: str | None, budget: Budget) -> None:
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
