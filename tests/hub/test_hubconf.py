"""``hubconf.py``, the torch.hub front door: exactly one entry point per manifest entry
(``HISTOHUB_MANIFEST`` files included), documented from the entry, names that cannot
collide, and the core dependencies declared to torch.hub."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from _servers import weights_file

import histohub
from histohub.errors import ManifestError

REPO = Path(__file__).resolve().parents[2]
#: Import names of pyproject's core dependencies, where they differ from the distribution's.
IMPORT_NAMES = {"pillow": "PIL"}


def load_hubconf():
    """Import ``hubconf.py`` the way torch.hub does (a fresh module from the file)."""
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry_points(hubconf) -> set[str]:
    """What ``torch.hub.list`` reports: public callables of hubconf."""
    return {name for name in dir(hubconf)
            if callable(getattr(hubconf, name)) and not name.startswith("_")}


def _weights() -> list[dict]:
    return [weights_file("model.bin", [{"url": "http://127.0.0.1:9/model.bin"}])]


def test_hubconf_has_one_entry_point_per_model():
    hubconf = load_hubconf()
    models = histohub.hub.load_manifest().values()
    assert entry_points(hubconf) == {e.hub_name for e in models} | {"get_transform"}
    for entry in models:
        doc = getattr(hubconf, entry.hub_name).__doc__
        pre = entry.preprocessing
        for fact in (entry.arch, f"(B, {entry.feature_dim})", f"mean {pre.mean}",
                     f"std {pre.std}", f"{pre.mpp:g} um/px",
                     f"Licence: {entry.license}", entry.citation.split(".")[0],
                     f'get_transform("{entry.name}")'):
            assert fact in doc.replace("\n    ", " "), (entry.name, fact)


def test_hubconf_follows_histohub_manifest(make_manifest):
    make_manifest({"org-resnet18.v2": _weights()})
    assert "org_resnet18_v2" in entry_points(load_hubconf())


def test_hubconf_refuses_names_that_collide_as_entry_points(make_manifest):
    make_manifest({"resnet18.ssl": _weights()})
    with pytest.raises(ManifestError, match=r"'resnet18\.ssl'.*'resnet18_ssl'.*taken"):
        load_hubconf()


def test_hubconf_dependencies_are_the_core_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower()
            for dep in project["dependencies"]}
    assert set(load_hubconf().dependencies) == {IMPORT_NAMES.get(d, d) for d in core}
