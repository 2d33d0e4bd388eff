"""Licences enforced, not just printed: restricted weights load only once accepted.

A manifest entry is *restricted* when its weights are gated upstream or its licence does not
allow commercial use (or says nothing about it). Its weights are fetched and loaded only
after the user accepted its licence, in any of three ways:

- ``load_pretrained(name, accept_licence=True)`` or ``--accept-licence`` on the command
  line: recorded in ``HISTOHUB_HOME/accepted_licences.json``, so it is asked once;
- ``HISTOHUB_ACCEPT_LICENCES``: comma-separated model names or licence names (e.g.
  ``uni,CC-BY-NC-ND-4.0``), for clusters and containers.

:func:`check_accepted` raises :class:`~histohub.errors.LicenceError` (one line naming the
licence and how to accept it) before any request is made. Torch-free.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from histohub._env import accepted_licences, histohub_home
from histohub.files import write_text_atomic
from histohub.hub._schema import ModelEntry
from histohub.errors import LicenceError

ENV = "HISTOHUB_ACCEPT_LICENCES"
RECORD_NAME = "accepted_licences.json"


def _record_path() -> Path:
    return histohub_home() / RECORD_NAME


def _recorded() -> dict[str, dict]:
    try:
        data = json.loads(_record_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_accepted(entry: ModelEntry) -> bool:
    """Whether ``entry`` may be loaded: unrestricted, or its licence accepted (see module)."""
    if not entry.licence.restricted:
        return True
    names = accepted_licences()
    if entry.name.lower() in names or entry.license.lower() in names:
        return True
    record = _recorded().get(entry.name)
    return isinstance(record, dict) and record.get("license") == entry.license


def accept(entry: ModelEntry) -> None:
    """Record that the user accepted ``entry``'s licence (in ``HISTOHUB_HOME``)."""
    if not entry.licence.restricted or is_accepted(entry):
        return
    record = _recorded()
    record[entry.name] = {"license": entry.license, "license_url": entry.licence.url,
                          "accepted_utc": datetime.now(timezone.utc).isoformat(
                              timespec="seconds")}
    path = _record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def terms(entry: ModelEntry) -> str:
    """``CC-BY-NC-ND-4.0 (non-commercial; gated: ...)``: the restriction in words."""
    parts = []
    if entry.licence.commercial is None:
        parts.append("commercial use not established")
    elif not entry.licence.commercial:
        parts.append("non-commercial")
    if entry.licence.gated:
        parts.append("gated: request access upstream and log in with a Hugging Face token")
    url = f", {entry.licence.url}" if entry.licence.url else ""
    return f"{entry.license} ({'; '.join(parts)}{url})"


def check_accepted(entry: ModelEntry, *, accept_now: bool = False) -> None:
    """Raise LicenceError unless ``entry`` may be loaded; ``accept_now`` records acceptance.

    Raises:
        LicenceError: restricted and not accepted (nothing has been fetched).
    """
    if accept_now:
        accept(entry)
        return
    if is_accepted(entry):
        return
    raise LicenceError(
        f"{entry.name} is licensed {terms(entry)}; accept its licence with "
        f"load_pretrained({entry.name!r}, accept_licence=True), --accept-licence, or "
        f"{ENV}={entry.name}")
