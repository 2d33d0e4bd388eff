"""``histohub bundle``: weights, an extra manifest and licence terms in one folder for
air-gapped machines.

The folder is a ``HISTOHUB_MIRROR``: each weights file lies at ``<cache key>/<file name>``
(the layout the mirror lookup reads), ``histohub-bundle.json`` records every file's sha256
and size as verified here, ``manifest.json`` holds the bundled models that came from extra
manifests (``HISTOHUB_MANIFEST``) with those hashes pinned, and ``LICENCES/<model>.txt``
states each model's terms. On the other machine the mirror lookup checks every copy against
``histohub-bundle.json`` on arrival (``_sources``), on top of what the manifest pins.

    histohub bundle uni kaiko-vits16 /media/usb/histohub --accept-licence
    # elsewhere: HISTOHUB_MIRROR=/media/usb/histohub HISTOHUB_OFFLINE=1 histohub extract ...
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from histohub.hub._cache import cache_key
from histohub.hub._fetch import fetch_weights
from histohub.hub._sources import BUNDLE_RECORD as RECORD
from histohub.hub._verify import sha256_file
from histohub.hub._registry import MANIFEST_PATH, get_entry, read_manifest_json
from histohub.hub._schema import SCHEMA_VERSION, ModelEntry
from histohub.errors import OutputExistsError
from histohub.hub._licences import check_accepted, terms

MANIFEST = "manifest.json"


def bundle(names: list[str], out: str | os.PathLike, *, accept_licence: bool = False,
           progress: bool = True) -> Path:
    """Write the verified weights of ``names`` into the new folder ``out`` (see module).

    Every name is checked (known, licence accepted) before anything is fetched; the folder
    is written under a temporary name beside ``out`` and renamed when complete.

    Raises:
        UnknownModelError, LicenceError: before any download; OutputExistsError: ``out``
        exists and is not empty.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} exists and is not an empty folder; give a new one")
    entries = [get_entry(name) for name in names]
    for entry in entries:
        check_accepted(entry, accept_now=accept_licence)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files, extra = [], {}
        for entry in entries:
            record = _add_weights(entry, work, progress=progress)
            files.append(record)
            _write_terms(entry, work / "LICENCES" / f"{entry.name}.txt")
            if entry.manifest_path is not None and \
                    Path(entry.manifest_path).resolve() != MANIFEST_PATH.resolve():
                extra[entry.name] = _pinned_entry(entry, record)
        (work / RECORD).write_text(json.dumps({"files": files}, indent=2) + "\n")
        if extra:
            (work / MANIFEST).write_text(json.dumps(
                {"schema_version": SCHEMA_VERSION, "models": extra}, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _add_weights(entry: ModelEntry, folder: Path, *, progress: bool) -> dict:
    fetched = fetch_weights(entry, progress=progress)
    key = cache_key(fetched.file)
    target = folder / key / fetched.file.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fetched.path, target)
    digest = sha256_file(target)
    if digest != fetched.sha256:
        raise OSError(f"{target} changed while being copied; run the bundle again")
    return {"model": entry.name, "filename": fetched.file.filename, "cache_key": key,
            "sha256": digest, "size": target.stat().st_size, "license": entry.license,
            "license_url": entry.licence.url}


def _write_terms(entry: ModelEntry, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([
        f"Model: {entry.name}",
        f"Licence: {terms(entry) if entry.licence.restricted else entry.license}",
        f"Licence text: {entry.licence.url or 'see the model card'}",
        f"Commercial use: {entry.licence.commercial}",
        f"Gated upstream: {entry.licence.gated}",
        f"Citation: {entry.citation}",
        "Whoever uses these weights is bound by that licence; read its full text at the "
        "address above before use.", ""]), encoding="utf-8")


def _pinned_entry(entry: ModelEntry, record: dict) -> dict:
    """The entry as its manifest writes it, with the bundled file's sha256 and size pinned."""
    data = json.loads(json.dumps(read_manifest_json(entry.manifest_path)["models"][entry.name]))
    for file in data["weights"]:
        if file["filename"] == record["filename"]:
            file["sha256"], file["size"] = record["sha256"], record["size"]
    return data
