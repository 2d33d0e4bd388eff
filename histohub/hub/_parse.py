"""Reading a manifest: each entry checked field by field into the schema's dataclasses.

``check_manifest_header`` checks ``{"schema_version": SCHEMA_VERSION, "models": {...}}``;
``parse_entry(name, entry)`` validates one entry into a ``ModelEntry`` (``_schema``).
Unknown or missing fields, wrong types and bad values are ``ManifestError``s naming the
field (as torchvision's ``test_schema_meta_validation`` does for its weights).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from histohub.errors import ManifestError
from histohub.hub._archs import FEATURE_DIMS
from histohub.hub._schema import (FORMATS, Fingerprint, INTERPOLATIONS, KeyMap, Licence, ModelEntry,
                                  Preprocessing, Reported, SCHEMA_VERSION, Source, WeightsFile)
from histohub.hub._zoo_archs import POOLINGS, ZOO_ARCHS

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REVISION = re.compile(r"^[0-9a-f]{40}$")
#: Longest weights file name (UTF-8 bytes): the cache adds suffixes such as ``.1a2b3c4d.part``
#: and ``.json`` (plus ``_files``' temporary-name affixes, under 30 bytes), and most file
#: systems stop at 255 bytes.
MAX_FILENAME_BYTES = 200
_PACKAGE_FILE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")

_ENTRY_FIELDS = {
    "description": str, "arch": str, "feature_dim": int, "weights": list,
    "preprocessing": dict, "license": str, "citation": str, "recipe": dict,
    "training_data": str, "metrics": dict,
}
_OPTIONAL_ENTRY_FIELDS = {"default": bool, "commercial": (bool, type(None)), "gated": bool,
                          "license_url": str, "pooling": str, "params": int, "facts": dict}
_FILE_FIELDS = {"filename": str, "format": str, "sha256": (str, type(None)),
                "size": (int, type(None)), "sources": list}
_OPTIONAL_FILE_FIELDS = {"key_map": dict, "reported": dict, "fingerprint": dict}
_REPORTED_FIELDS = {"note": str}
_OPTIONAL_REPORTED_FIELDS = {"sha256": str, "size": int}
_FINGERPRINT_FIELDS = {"tensor": str, "l2_norm": (int, float), "rtol": (int, float),
                       "verified": bool}
_OPTIONAL_FINGERPRINT_FIELDS = {"note": str}
_SOURCE_FIELDS = {"url": str, "repo_id": str, "filename": str,
                  "revision": (str, type(None)), "revision_note": str, "package": str}
_KEY_MAP_FIELDS = {"state_dict_key": (str, type(None)), "strip_prefixes": list, "drop": list,
                   "layout": str}
_PREPROCESSING_FIELDS = {"input_size": int, "mean": list, "std": list}
_OPTIONAL_PREPROCESSING_FIELDS = {"interpolation": str, "mpp": (int, float, type(None)),
                                  "mpp_note": str}


def _check_fields(where: str, data: Any, required: dict, optional: dict | None = None) -> None:
    optional = optional or {}
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object, got {type(data).__name__}")
    unknown = set(data) - set(required) - set(optional)
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {sorted(unknown)}; "
                            f"allowed: {sorted({**required, **optional})}")
    missing = set(required) - set(data)
    if missing:
        raise ManifestError(f"{where}: missing field(s) {sorted(missing)}")
    for key, value in data.items():
        expected = {**required, **optional}[key]
        allowed = expected if isinstance(expected, tuple) else (expected,)
        numeric = int in allowed or float in allowed
        if isinstance(value, bool) and numeric and bool not in allowed:  # bool is an int
            raise ManifestError(f"{where}.{key}: expected a number, got {value!r}")
        if not isinstance(value, expected):
            raise ManifestError(f"{where}.{key}: wrong type {type(value).__name__} ({value!r})")


def _parse_source(where: str, data: Any) -> Source:
    _check_fields(where, data, {}, _SOURCE_FIELDS)
    if "package" in data:
        path = data["package"]
        if set(data) != {"package"} or not _PACKAGE_FILE.match(path) \
                or ".." in path.split("/") or not path.startswith("weights/"):
            # under weights/ only: the manifest or a module is never a weights file
            raise ManifestError(f"{where}: a package source is {{'package': "
                                f"'weights/x.safetensors'}} alone, a relative path inside "
                                f"histohub/weights/ without '..', got {path!r}")
        return Source(package=path)
    if ("url" in data) == ("repo_id" in data):
        raise ManifestError(f"{where}: give either 'url' or 'repo_id' (+ 'filename', 'revision')")
    if "url" in data:
        if set(data) != {"url"} or not re.match(r"^(https?|file)://", data["url"]):
            raise ManifestError(f"{where}: a URL source is {{'url': 'https://...'}} alone")
        return Source(url=data["url"])
    if not {"filename", "revision"} <= set(data):
        raise ManifestError(f"{where}: a Hugging Face source needs 'repo_id', 'filename' and a "
                            "pinned 'revision' (a 40-hex commit hash)")
    revision = data["revision"]
    if revision is None and not data.get("revision_note", "").strip():
        raise ManifestError(f"{where}.revision: null (not established) needs a 'revision_note' "
                            "saying why; pin a full 40-hex commit hash where one is known")
    if revision is not None and not _REVISION.match(revision):
        raise ManifestError(f"{where}.revision: pin a full 40-hex commit hash, got "
                            f"{revision!r}")
    return Source(repo_id=data["repo_id"], filename=data["filename"], revision=revision,
                  revision_note=data.get("revision_note", ""))


def _parse_file(where: str, data: Any) -> WeightsFile:
    _check_fields(where, data, _FILE_FIELDS, _OPTIONAL_FILE_FIELDS)
    if data["format"] not in FORMATS:
        raise ManifestError(f"{where}.format: {data['format']!r} is not one of {FORMATS}")
    if data["sha256"] is not None and not _SHA256.match(data["sha256"]):
        raise ManifestError(f"{where}.sha256: must be the full 64-hex lower-case sha256 "
                            f"(or null when not yet pinned), got {data['sha256']!r}")
    if data["size"] is not None and data["size"] <= 0:
        raise ManifestError(f"{where}.size: must be positive, got {data['size']}")
    _check_filename(f"{where}.filename", data["filename"])
    if not data["sources"]:
        raise ManifestError(f"{where}.sources: list at least one source")
    sources = tuple(_parse_source(f"{where}.sources[{i}]", s)
                    for i, s in enumerate(data["sources"]))
    if any(s.package for s in sources) and (data["sha256"] is None or data["size"] is None):
        raise ManifestError(f"{where}: a file shipped in the package needs its verified "
                            "'sha256' and 'size' (it is checked at every load)")
    key_map = data.get("key_map", {})
    _check_fields(f"{where}.key_map", key_map, {}, _KEY_MAP_FIELDS)
    if key_map.get("layout") is not None:
        from histohub.hub._key_maps import LAYOUTS

        if key_map["layout"] not in LAYOUTS:
            raise ManifestError(f"{where}.key_map.layout: {key_map['layout']!r} is not one of "
                                f"{sorted(LAYOUTS)}")
    for pattern in key_map.get("drop", []):
        try:
            re.compile(pattern)
        except re.error as error:
            raise ManifestError(f"{where}.key_map.drop: bad pattern {pattern!r}: {error}") from None
    return WeightsFile(
        filename=data["filename"], format=data["format"], sha256=data["sha256"],
        size=data["size"], sources=sources,
        key_map=KeyMap(state_dict_key=key_map.get("state_dict_key"),
                       strip_prefixes=tuple(key_map.get("strip_prefixes", ())),
                       drop=tuple(key_map.get("drop", ())),
                       layout=key_map.get("layout")),
        reported=_parse_reported(f"{where}.reported", data["reported"])
        if "reported" in data else None,
        fingerprint=_parse_fingerprint(f"{where}.fingerprint", data["fingerprint"])
        if "fingerprint" in data else None,
    )


def _check_filename(where: str, name: str) -> None:
    """A plain file name the cache can add suffixes to: no folders, no control characters."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ManifestError(f"{where}: a plain file name, got {name!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ManifestError(f"{where}: contains a control character: {name!r}")
    if len(name.encode("utf-8")) > MAX_FILENAME_BYTES:
        raise ManifestError(f"{where}: at most {MAX_FILENAME_BYTES} bytes, got "
                            f"{len(name.encode('utf-8'))} ({name[:40]!r}...)")


def _parse_reported(where: str, data: Any) -> Reported:
    _check_fields(where, data, _REPORTED_FIELDS, _OPTIONAL_REPORTED_FIELDS)
    if "sha256" not in data and "size" not in data:
        raise ManifestError(f"{where}: give 'sha256', 'size' or both (with the 'note' saying "
                            "who reported them)")
    if "sha256" in data and not _SHA256.match(data["sha256"]):
        raise ManifestError(f"{where}.sha256: must be the full 64-hex lower-case sha256, got "
                            f"{data['sha256']!r}")
    if "size" in data and data["size"] <= 0:
        raise ManifestError(f"{where}.size: must be positive, got {data['size']}")
    if not data["note"].strip():
        raise ManifestError(f"{where}.note: say who reported these numbers")
    return Reported(note=data["note"], sha256=data.get("sha256"), size=data.get("size"))


def _parse_fingerprint(where: str, data: Any) -> Fingerprint:
    _check_fields(where, data, _FINGERPRINT_FIELDS, _OPTIONAL_FINGERPRINT_FIELDS)
    if not data["l2_norm"] > 0:
        raise ManifestError(f"{where}.l2_norm: must be positive, got {data['l2_norm']!r}")
    if not 0 < data["rtol"] < 1:
        raise ManifestError(f"{where}.rtol: a relative tolerance in (0, 1), got "
                            f"{data['rtol']!r}")
    return Fingerprint(tensor=data["tensor"], l2_norm=float(data["l2_norm"]),
                       rtol=float(data["rtol"]), verified=data["verified"],
                       note=data.get("note", ""))


def _parse_preprocessing(where: str, data: Any) -> Preprocessing:
    _check_fields(where, data, _PREPROCESSING_FIELDS, _OPTIONAL_PREPROCESSING_FIELDS)
    for key in ("mean", "std"):
        values = data[key]
        if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
            raise ManifestError(f"{where}.{key}: three numbers (R, G, B), got {values!r}")
    if any(v <= 0 for v in data["std"]):
        raise ManifestError(f"{where}.std: must be positive, got {data['std']!r}")
    if data["input_size"] <= 0:
        raise ManifestError(f"{where}.input_size: must be positive")
    if data.get("interpolation", "bilinear") not in INTERPOLATIONS:
        raise ManifestError(f"{where}.interpolation: bilinear, bicubic or nearest")
    mpp = data.get("mpp")
    if mpp is not None and mpp <= 0:
        raise ManifestError(f"{where}.mpp: must be positive microns per pixel, got {mpp}")
    return Preprocessing(input_size=data["input_size"], mean=tuple(map(float, data["mean"])),
                         std=tuple(map(float, data["std"])),
                         interpolation=data.get("interpolation", "bilinear"),
                         mpp=None if mpp is None else float(mpp),
                         mpp_note=data.get("mpp_note", ""))


def parse_entry(name: str, data: Any, *, manifest_path: Path | None = None) -> ModelEntry:
    """Validate one manifest entry (raises ManifestError naming the bad field)."""
    where = f"{manifest_path or 'manifest'}: models[{name!r}]"
    if not re.match(r"^[a-z0-9][a-z0-9.\-]*$", name):
        raise ManifestError(f"{where}: model names are lower-case letters, digits, '-' and '.'")
    _check_fields(where, data, _ENTRY_FIELDS, _OPTIONAL_ENTRY_FIELDS)
    if data["arch"] not in FEATURE_DIMS and data["arch"] not in ZOO_ARCHS:
        raise ManifestError(f"{where}.arch: {data['arch']!r} is not one of "
                            f"{tuple(FEATURE_DIMS) + tuple(ZOO_ARCHS)}")
    if data["feature_dim"] <= 0:
        raise ManifestError(f"{where}.feature_dim: must be positive")
    pooling = _check_zoo_fields(where, data)
    if not data["weights"]:
        raise ManifestError(f"{where}.weights: list at least one weights file")
    return ModelEntry(
        name=name, description=data["description"], arch=data["arch"],
        feature_dim=data["feature_dim"],
        weights=tuple(_parse_file(f"{where}.weights[{i}]", f)
                      for i, f in enumerate(data["weights"])),
        preprocessing=_parse_preprocessing(f"{where}.preprocessing", data["preprocessing"]),
        license=data["license"], citation=data["citation"], recipe=data["recipe"],
        training_data=data["training_data"], metrics=data["metrics"],
        default=data.get("default", False), manifest_path=manifest_path,
        licence=Licence(commercial=data.get("commercial", True),
                        gated=data.get("gated", False), url=data.get("license_url", "")),
        pooling=pooling, params=data.get("params"),
        facts={str(k): str(v) for k, v in data.get("facts", {}).items()},
    )


def _check_zoo_fields(where: str, data: dict) -> str | None:
    """Check pooling, feature_dim, params and facts; returns the pooling (None for ResNets)."""
    from histohub.hub._zoo_archs import feature_dim

    for key, value in data.get("facts", {}).items():
        if not isinstance(value, str) or not value.strip():
            raise ManifestError(f"{where}.facts.{key}: say where the fact came from (a string)")
    if data.get("params") is not None and data["params"] <= 0:
        raise ManifestError(f"{where}.params: must be positive")
    if data["arch"] not in ZOO_ARCHS:
        if "pooling" in data:
            raise ManifestError(f"{where}.pooling: only zoo ViTs take a pooling; a ResNet "
                                "returns its global average pool")
        return None
    pooling = data.get("pooling", "cls")
    if pooling not in POOLINGS:
        raise ManifestError(f"{where}.pooling: one of {POOLINGS}, got {pooling!r}")
    if data["feature_dim"] != feature_dim(data["arch"], pooling):
        raise ManifestError(f"{where}.feature_dim: {data['arch']} with pooling {pooling!r} "
                            f"gives {feature_dim(data['arch'], pooling)}, not "
                            f"{data['feature_dim']}")
    return pooling


def check_manifest_header(path: str | os.PathLike, data: Any) -> None:
    """Check a manifest's top level: exactly ``schema_version`` (this histohub's) and
    ``models`` (an object); the entries themselves are :func:`parse_entry`'s job."""
    _check_fields(str(path), data, {"schema_version": int, "models": dict})
    if data["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {data['schema_version']} is not supported "
                            f"by this histohub (expects {SCHEMA_VERSION}); upgrade histohub")
