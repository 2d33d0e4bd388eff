"""The one way to change a manifest file: validate the entry, then replace the file atomically.

Three callers change manifests: ``histohub pin`` (verified sha256 and size of weights files,
:func:`pin_weights`), training's benchmark ``--record-manifest`` (downstream metrics,
:func:`record_metrics`) and training's ``export.py`` (a whole new entry,
:func:`write_manifest_entry`). All three go through :func:`write_manifest_entry`: the entry
is checked with :func:`~histohub.hub._parse.parse_entry` before a byte is written, other
entries and fields are kept as they are, the file keeps its permissions (and a symlink
stays a symlink: the file it points to is replaced), and the manifests in use are re-read
on the next lookup.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from histohub.files import write_text_atomic
from histohub.hub._registry import read_manifest_json, reload_manifests
from histohub.hub._parse import check_manifest_header, parse_entry
from histohub.hub._schema import SCHEMA_VERSION, ModelEntry
from histohub.errors import ManifestError


def write_manifest_entry(path: str | os.PathLike, name: str, entry: Mapping[str, Any], *,
                         replace: bool = False) -> ModelEntry:
    """Add entry ``name`` (the JSON object, as in the file) to the manifest at ``path``.

    A missing ``path`` becomes a new manifest holding only this entry (its folder created).
    ``replace``: overwrite an entry of the same name; without it, an existing ``name`` is a
    ManifestError. Raises ManifestError, naming the field, when the entry is invalid or the
    existing file is not a manifest; nothing is written then. Returns the parsed entry.
    """
    path = Path(path).expanduser()
    target = path.resolve()  # replace the file a symlink points to, not the link
    if target.exists():
        data = read_manifest_json(target)
        check_manifest_header(path, data)
        ascii_only = target.read_text(encoding="utf-8").isascii()
    else:
        data, ascii_only = {"schema_version": SCHEMA_VERSION, "models": {}}, False
    if name in data["models"] and not replace:
        raise ManifestError(f"{path} already lists {name!r}; replace it explicitly "
                            "(replace=True) or choose another name")
    entry = dict(entry)
    parsed = parse_entry(name, entry, manifest_path=path)
    data["models"][name] = entry
    write_text_atomic(target, json.dumps(data, indent=2, ensure_ascii=ascii_only) + "\n")
    reload_manifests()
    return parsed


def read_manifest_entry(path: str | os.PathLike, name: str) -> dict[str, Any]:
    """Entry ``name`` of the manifest at ``path`` as raw JSON (a copy, to edit and write
    back with :func:`write_manifest_entry`); ManifestError when the file has no such model."""
    data = read_manifest_json(path)
    check_manifest_header(path, data)
    if name not in data["models"]:
        raise ManifestError(f"{path} has no model {name!r}; its models: "
                            f"{sorted(data['models'])}")
    return dict(data["models"][name])


def record_metrics(path: str | os.PathLike, name: str, metrics: Mapping[str, Any]
                   ) -> ModelEntry:
    """Merge ``metrics`` into the ``metrics`` of entry ``name`` (new keys added, existing
    keys overwritten, the rest kept) and write the manifest at ``path`` atomically."""
    entry = read_manifest_entry(path, name)
    entry["metrics"] = {**entry.get("metrics", {}), **metrics}
    return write_manifest_entry(path, name, entry, replace=True)


def pin_weights(path: str | os.PathLike, name: str,
                verified: Mapping[str, tuple[str, int]]) -> ModelEntry:
    """Record the verified ``{filename: (sha256, size)}`` of entry ``name``'s weights files
    in the manifest at ``path`` (what ``histohub pin`` writes after hashing each file)."""
    entry = read_manifest_entry(path, name)
    files = [dict(file) for file in entry["weights"]]
    unknown = set(verified) - {file.get("filename") for file in files}
    if unknown:
        raise ManifestError(f"{path}: model {name!r} has no weights file(s) {sorted(unknown)}")
    for file in files:
        if file["filename"] in verified:
            file["sha256"], file["size"] = verified[file["filename"]]
    entry["weights"] = files
    return write_manifest_entry(path, name, entry, replace=True)
