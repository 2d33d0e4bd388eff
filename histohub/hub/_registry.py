"""Read weights manifests, and the registry of every model in the manifests in use.

Weights are data: every model histohub serves is one entry of ``weights_manifest.json``
(shipped inside the package), plus entries from the files named in ``HISTOHUB_MANIFEST``
(``os.pathsep``-separated) for an organisation's own models. A file is read strictly
(duplicate keys in one object and nesting deeper than any manifest needs are errors) and
validated against the schema (``histohub.hub._schema``) when it is read.
``load_manifest``, ``get_entry`` and ``list_models`` serve the entries by name;
``default_model`` is the one the packaged manifest marks ``"default": true``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from histohub._env import manifest_files
from histohub.hub._parse import check_manifest_header, parse_entry
from histohub.hub._schema import PACKAGE_DIR, ModelEntry
from histohub.errors import ManifestError, UnknownModelError

MANIFEST_PATH = PACKAGE_DIR / "weights_manifest.json"
#: Deepest nesting of objects and lists a manifest may have (the shipped one needs 7).
MAX_DEPTH = 32


def read_manifest_json(path: str | os.PathLike) -> Any:
    """A manifest file's raw JSON; ManifestError when it is missing, unreadable, not JSON,
    has a duplicate key in one object or is nested more than ``MAX_DEPTH`` levels."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"Manifest {path} does not exist (check HISTOHUB_MANIFEST)") from None
    except (OSError, ValueError) as error:  # a NUL in the path, a name too long, not UTF-8
        raise ManifestError(f"Manifest {str(path)[:300]!r} cannot be read: "
                            f"{type(error).__name__}: {error} (check HISTOHUB_MANIFEST)"
                            ) from None
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as error:
        raise ManifestError(f"Manifest {path}: duplicate key {error.args[0]!r} in one object; "
                            "JSON would silently keep the last one, so remove one of them"
                            ) from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"Manifest {path} is not valid JSON: {error}") from None
    except RecursionError:
        raise ManifestError(f"Manifest {path} is nested too deeply to parse; a manifest is "
                            f"nested at most {MAX_DEPTH} levels") from None
    if _depth(data) > MAX_DEPTH:
        raise ManifestError(f"Manifest {path} is nested more than {MAX_DEPTH} levels; no "
                            "manifest field needs that")
    return data


class _DuplicateKey(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        children = (value.values() if isinstance(value, dict)
                    else value if isinstance(value, list) else None)
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_DEPTH:
            stack.extend((child, level + 1) for child in children)
    return deepest


def read_manifest(path: str | os.PathLike) -> dict[str, ModelEntry]:
    """Read and validate one manifest file into ``{name: ModelEntry}``."""
    path = Path(path)
    data = read_manifest_json(path)
    check_manifest_header(path, data)
    return {name: parse_entry(name, entry, manifest_path=path)
            for name, entry in data["models"].items()}


def manifest_paths() -> list[Path]:
    """The packaged manifest, then each file in ``HISTOHUB_MANIFEST`` (os.pathsep-separated)."""
    return [MANIFEST_PATH, *manifest_files()]


@functools.lru_cache(maxsize=8)
def _load_all(paths: tuple[Path, ...]) -> dict[str, ModelEntry]:
    entries: dict[str, ModelEntry] = {}
    for path in paths:
        for name, entry in read_manifest(path).items():
            if name in entries:
                raise ManifestError(f"Model {name!r} in {path} is already defined in "
                                    f"{entries[name].manifest_path}; choose another name")
            entries[name] = entry
    return entries


def reload_manifests() -> None:
    """Forget the manifests read so far: the next lookup reads the files again (call it
    after changing a manifest file; ``HISTOHUB_MANIFEST`` changes are noticed anyway)."""
    _load_all.cache_clear()


def load_manifest() -> dict[str, ModelEntry]:
    """Every entry of every manifest in use, by name (re-read when HISTOHUB_MANIFEST changes)."""
    return _load_all(tuple(manifest_paths()))


def get_entry(name: str) -> ModelEntry:
    """The entry for ``name``; raises UnknownModelError listing close names."""
    entries = load_manifest()
    if name not in entries:
        raise UnknownModelError(name, entries)
    return entries[name]


def list_models() -> list[str]:
    """Names of every model in the manifests in use, sorted."""
    return sorted(load_manifest())


def default_model() -> str:
    """The model the packaged manifest marks ``"default": true`` (what ``load_pretrained()``
    and ``get_transform()`` use when no model is named)."""
    defaults = [name for name, entry in _load_all((MANIFEST_PATH,)).items() if entry.default]
    if len(defaults) != 1:
        raise ManifestError(f"{MANIFEST_PATH} must mark exactly one model \"default\": true, "
                            f"it marks {defaults or 'none'}; reinstall histohub")
    return defaults[0]
