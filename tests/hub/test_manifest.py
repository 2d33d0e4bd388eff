"""The weights manifest's schema, like torchvision's ``test_schema_meta_validation``.

Every shipped entry is checked field by field; malformed entries are refused with an
error naming the field; ``HISTOHUB_MANIFEST`` adds entries. (``hubconf.py``, which offers
one torch.hub entry point per entry: tests/hub/test_hubconf.py.)
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

import histohub
from histohub.hub import _registry as _manifest
from histohub.hub._registry import MANIFEST_PATH, read_manifest
from histohub.hub._parse import parse_entry
from histohub.errors import ManifestError, UnknownModelError
from histohub.hub._archs import FEATURE_DIMS

SHIPPED = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
SHA256 = re.compile(r"^[0-9a-f]{64}$")
REVISION = re.compile(r"^[0-9a-f]{40}$")


@pytest.fixture(autouse=True)
def _fresh_manifest_cache():
    histohub.hub.reload_manifests()
    yield
    histohub.hub.reload_manifests()


def write_manifest(path: Path, models: dict) -> Path:
    path.write_text(json.dumps({"schema_version": 1, "models": models}), encoding="utf-8")
    return path


def entry_data(name: str = "resnet18-ssl") -> dict:
    return copy.deepcopy(SHIPPED["models"][name])


# --------------------------------------------------------------------------- shipped entries


# The paper's ResNet18s; the zoo's entries: tests/hub/test_zoo_layouts.py, test_zoo_licences.py.
@pytest.mark.parametrize("name", sorted(n for n in SHIPPED["models"] if n.startswith("resnet18")))
def test_shipped_entry_is_valid(name):
    data = SHIPPED["models"][name]
    entry = parse_entry(name, data)
    assert entry.feature_dim == FEATURE_DIMS[entry.arch]
    bundled = any("package" in source for f in data["weights"] for source in f["sources"])
    # The authors' models take 224 px; the bundled one was trained at 64 px (its recipe).
    assert entry.preprocessing.input_size == (64 if bundled else 224)
    # The authors normalised with mean = std = 0.5 per channel (their answer in an issue of
    # ozanciga/self-supervised-histopathology).
    assert entry.preprocessing.mean == entry.preprocessing.std == (0.5, 0.5, 0.5)
    assert entry.preprocessing.mpp is not None and entry.preprocessing.mpp > 0
    assert entry.license and entry.citation and entry.training_data and entry.recipe
    for i, file in enumerate(data["weights"]):
        where = f"{name}.weights[{i}]"
        assert file["sha256"] is None or SHA256.match(file["sha256"]), where
        assert file["size"] is None or (type(file["size"]) is int and file["size"] > 0), where
        # `histohub pin` records both from the file, or neither is known.
        assert (file["sha256"] is None) == (file["size"] is None), where
        for source in file["sources"]:
            if "repo_id" in source:
                assert REVISION.match(source["revision"]), f"{where}: unpinned revision"
            elif "package" in source:
                assert file["sha256"] and file["fingerprint"]["verified"], where
            else:
                assert source["url"].startswith("https://"), f"{where}: {source['url']}"


def test_upstream_facts_are_recorded_as_reported_not_verified():
    """Issue 10, item 6: sizes, the independently reported sha256 and the conv1 norm are in
    the manifest with their provenance; nothing in it claims histohub verified them."""
    native, lightning = SHIPPED["models"]["resnet18-ssl"]["weights"]
    assert (native["sha256"], native["size"]) == (None, None)  # not verified by histohub
    assert native["reported"]["size"] == 46_104_139
    assert native["reported"]["sha256"] == ("ae652d1a586c1be11b8ed7f4033094a98ac9c620"
                                            "e43a28998c6c86d248e750ab")
    assert "independent" in native["reported"]["note"]
    assert native["fingerprint"] == {**native["fingerprint"], "tensor": "conv1.weight",
                                     "l2_norm": 12.58, "verified": False}
    assert 0 < native["fingerprint"]["rtol"] <= 0.05  # far from ImageNet's 29.24
    assert lightning["reported"]["size"] == 92_148_628
    entry = parse_entry("resnet18-ssl", SHIPPED["models"]["resnet18-ssl"])
    assert entry.weights[0].expected_size == 46_104_139
    assert entry.weights[0].expected_sha256 == native["reported"]["sha256"]
    assert entry.weights[0].sha256_provenance == "reported"
    assert entry.weights[1].expected_size == 92_148_628
    assert entry.weights[1].expected_sha256 is None


def test_verified_pin_takes_precedence_over_reported_values():
    data = entry_data()
    data["weights"][0].update(sha256="ab" * 32, size=1234)
    file = parse_entry("resnet18-ssl", data).weights[0]
    assert (file.expected_sha256, file.expected_size) == ("ab" * 32, 1234)
    assert file.sha256_provenance == "verified"


def test_packaged_manifest_is_a_regular_file():
    """torch.hub fetches GitHub's zip archive and extracts it with zipfile, which writes a
    symlink as a text file holding the link's target (so do Windows checkouts without
    symlink support): the manifest the package reads must be the real file."""
    assert not MANIFEST_PATH.is_symlink(), (
        f"{MANIFEST_PATH} is a symlink: in torch.hub's GitHub download it becomes a text "
        f"file containing {MANIFEST_PATH.readlink()!s}; make the packaged file the real one")


def test_resnet18_ssl_is_the_default_with_native_release_first():
    defaults = [n for n, e in SHIPPED["models"].items() if e.get("default")]
    assert defaults == ["resnet18-ssl"]
    files = SHIPPED["models"]["resnet18-ssl"]["weights"]
    assert [f["filename"] for f in files] == ["pytorchnative_tenpercent_resnet18.ckpt",
                                              "tenpercent_resnet18.ckpt"]
    assert [f["format"] for f in files] == ["torch", "lightning"]
    assert "resnet18-ssl-epoch9" in SHIPPED["models"]


def test_no_unreleased_architecture_is_listed():
    """Only ResNet18 weights were ever released upstream (the GitHub releases of
    ozanciga/self-supervised-histopathology: tags tenpercent, nativetenpercent and 1)."""
    paper = [e for n, e in SHIPPED["models"].items() if n.startswith("resnet18")]
    assert {e["arch"] for e in paper} == {"resnet18"}


def test_projection_head_is_dropped_for_every_shipped_file():
    """Upstream checkpoints carry the head (fc.1/fc.3): their key map drops it. The bundled
    file was exported without it: it holds exactly the encoder's keys."""
    from safetensors import safe_open

    from histohub.hub._archs import build_encoder

    for name, entry in SHIPPED["models"].items():
        if not name.startswith("resnet18"):  # the zoo: tests/hub/test_zoo_layouts.py
            continue
        for file in entry["weights"]:
            shipped = [s["package"] for s in file["sources"] if "package" in s]
            if shipped:
                with safe_open(str(Path(histohub.__file__).parent / shipped[0]), "pt") as handle:
                    assert set(handle.keys()) == set(build_encoder("resnet18").state_dict()), name
            else:
                assert any(re.match(p, "fc.1.weight") for p in file["key_map"]["drop"]), name


# --------------------------------------------------------------------------- rejections

def _set(path: str, value):
    def mutate(data):
        *parents, last = path.split(".")
        target = data
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(last) if last.isdigit() else last] = value
    return mutate


def _delete(path: str):
    def mutate(data):
        *parents, last = path.split(".")
        target = data
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        del target[last]
    return mutate


HF = {"repo_id": "org/resnet18-ssl", "filename": "model.safetensors", "revision": "0" * 40}

BAD_ENTRIES = {
    "unknown entry field": (_set("weights_url", "https://x"), r"unknown field.*weights_url"),
    "missing licence": (_delete("license"), r"missing field.*license"),
    "feature_dim as string": (_set("feature_dim", "512"), r"\.feature_dim: wrong type"),
    "feature_dim as bool": (_set("feature_dim", True), r"\.feature_dim"),
    "feature_dim zero": (_set("feature_dim", 0), r"\.feature_dim"),
    "unknown arch": (_set("arch", "resnet152"), r"\.arch: 'resnet152'"),
    "no weights": (_set("weights", []), r"\.weights"),
    "default as string": (_set("default", "yes"), r"\.default: wrong type"),
    "unknown file field": (_set("weights.0.md5", "abc"), r"weights\[0\].*unknown.*md5"),
    "missing sha256": (_delete("weights.0.sha256"), r"weights\[0\].*missing.*sha256"),
    "sha256 prefix": (_set("weights.0.sha256", "d63eafa0"), r"weights\[0\]\.sha256"),
    "sha256 upper case": (_set("weights.0.sha256", "A" * 64), r"weights\[0\]\.sha256"),
    "sha256 as int": (_set("weights.0.sha256", 123), r"weights\[0\]\.sha256: wrong type"),
    "size zero": (_set("weights.0.size", 0), r"weights\[0\]\.size"),
    "size negative": (_set("weights.0.size", -5), r"weights\[0\]\.size"),
    "size as text": (_set("weights.0.size", "46 MB"), r"weights\[0\]\.size: wrong type"),
    "size as bool": (_set("weights.0.size", True), r"weights\[0\]\.size"),
    "mpp as bool": (_set("preprocessing.mpp", True),
                    r"preprocessing\.mpp: expected a number"),
    "description as bool": (_set("description", True), r"\.description: wrong type"),
    "unknown format": (_set("weights.0.format", "pickle"), r"weights\[0\]\.format"),
    "path as filename": (_set("weights.0.filename", "../x.ckpt"), r"weights\[0\]\.filename"),
    "no sources": (_set("weights.0.sources", []), r"weights\[0\]\.sources"),
    "ftp url": (_set("weights.0.sources", [{"url": "ftp://h/x"}]), r"sources\[0\]"),
    "url and repo_id": (_set("weights.0.sources", [{"url": "https://h/x", **HF}]),
                        r"sources\[0\]"),
    "hf without revision": (_set("weights.0.sources", [{k: v for k, v in HF.items()
                                                        if k != "revision"}]),
                            r"sources\[0\].*revision"),
    "hf branch revision": (_set("weights.0.sources", [{**HF, "revision": "main"}]),
                           r"sources\[0\]\.revision.*'main'"),
    "hf short revision": (_set("weights.0.sources", [{**HF, "revision": "0" * 39}]),
                          r"sources\[0\]\.revision"),
    "unknown source field": (_set("weights.0.sources", [{**HF, "token": "x"}]),
                             r"sources\[0\].*unknown.*token"),
    "unknown key_map field": (_set("weights.0.key_map.rename", {}),
                              r"key_map.*unknown.*rename"),
    "bad drop pattern": (_set("weights.0.key_map.drop", ["("]), r"key_map\.drop"),
    "strip_prefixes as string": (_set("weights.0.key_map.strip_prefixes", "model."),
                                 r"key_map\.strip_prefixes: wrong type"),
    "two-value mean": (_set("preprocessing.mean", [0.5, 0.5]), r"preprocessing\.mean"),
    "zero std": (_set("preprocessing.std", [0.5, 0, 0.5]), r"preprocessing\.std"),
    "unknown preprocessing field": (_set("preprocessing.crop_pct", 1.0),
                                    r"preprocessing.*unknown.*crop_pct"),
    "missing input_size": (_delete("preprocessing.input_size"),
                           r"preprocessing.*missing.*input_size"),
    "negative mpp": (_set("preprocessing.mpp", -0.5), r"preprocessing\.mpp"),
    "unknown interpolation": (_set("preprocessing.interpolation", "lanczos"),
                              r"preprocessing\.interpolation"),
    "recipe as string": (_set("recipe", "SimCLR"), r"\.recipe: wrong type"),
    "filename with NUL": (_set("weights.0.filename", "model\x00.ckpt"),
                          r"weights\[0\]\.filename.*control character"),
    "filename of 300 characters": (_set("weights.0.filename", "m" * 296 + ".pth"),
                                   r"weights\[0\]\.filename.*at most 200 bytes"),
    "filename with backslash": (_set("weights.0.filename", "..\\x.ckpt"),
                                r"weights\[0\]\.filename"),
    "reported without note": (_set("weights.0.reported", {"size": 5}),
                              r"reported.*missing.*note"),
    "reported with nothing": (_set("weights.0.reported", {"note": "a user"}),
                              r"reported: give 'sha256', 'size' or both"),
    "reported sha256 prefix": (_set("weights.0.reported.sha256", "ae652d1a"),
                               r"reported\.sha256"),
    "reported size zero": (_set("weights.0.reported.size", 0), r"reported\.size"),
    "fingerprint zero rtol": (_set("weights.0.fingerprint.rtol", 0), r"fingerprint\.rtol"),
    "fingerprint negative norm": (_set("weights.0.fingerprint.l2_norm", -1.0),
                                  r"fingerprint\.l2_norm"),
    "fingerprint unknown field": (_set("weights.0.fingerprint.mean", 1.0),
                                  r"fingerprint.*unknown.*mean"),
    "fingerprint verified as text": (_set("weights.0.fingerprint.verified", "no"),
                                     r"fingerprint\.verified: wrong type"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_malformed_entry_is_refused_naming_the_field(case):
    mutate, message = BAD_ENTRIES[case]
    data = entry_data()
    mutate(data)
    with pytest.raises(ManifestError, match=message):
        parse_entry("resnet18-ssl", data)


def test_pinned_hugging_face_source_is_accepted():
    data = entry_data()
    data["weights"][0]["sources"].insert(0, HF)
    data["weights"][0]["sha256"], data["weights"][0]["size"] = "ab" * 32, 46_000_000
    entry = parse_entry("resnet18-ssl", data)
    source = entry.weights[0].sources[0]
    assert source.is_hf and source.revision == "0" * 40
    assert not entry.weights[0].sources[1].is_hf


@pytest.mark.parametrize("name", ["ResNet18", "resnet 18", "-resnet", "resnet/18", ""])
def test_bad_model_names_are_refused(name):
    with pytest.raises(ManifestError, match="model names"):
        parse_entry(name, entry_data())


@pytest.mark.parametrize("document, message", [
    ({"schema_version": 2, "models": {}}, r"schema_version 2.*upgrade histohub"),
    ({"schema_version": 1}, r"missing field.*models"),
    ({"schema_version": 1, "models": {}, "extra": 1}, r"unknown field.*extra"),
    ({"schema_version": "1", "models": {}}, r"schema_version: wrong type"),
    ([], r"expected an object"),
])
def test_malformed_manifest_file_is_refused(tmp_path, document, message):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_deeply_nested_manifest_is_a_manifest_error(tmp_path):
    """Nesting deep enough for a RecursionError in the JSON parser broke every command."""
    path = tmp_path / "deep.json"
    path.write_text('{"schema_version": 1, "models": ' + "[" * 100_000 + "]" * 100_000 + "}",
                    encoding="utf-8")
    with pytest.raises(ManifestError, match=r"deep\.json.*nested"):
        read_manifest(path)
    data = entry_data()
    recipe: dict = data["recipe"]
    for _ in range(100):  # parses, but nothing in a manifest is nested this deep
        recipe["more"] = {}
        recipe = recipe["more"]
    write_manifest(path, {"org-model": data})
    with pytest.raises(ManifestError, match=r"deep\.json.*nested more than 32"):
        read_manifest(path)


def test_duplicate_keys_are_refused_naming_the_key(tmp_path):
    path = tmp_path / "dup.json"
    text = json.dumps({"schema_version": 1, "models": {"org-model": entry_data()}}, indent=1)
    path.write_text(text.replace('"arch": "resnet18",', '"arch": "resnet50", "arch": "resnet18",'),
                    encoding="utf-8")
    with pytest.raises(ManifestError, match=r"dup\.json.*duplicate key 'arch'"):
        read_manifest(path)


@pytest.mark.parametrize("name", ["bad\x00name.json", "m" * 300 + ".json"], ids=["nul", "long"])
def test_unusable_manifest_path_is_a_manifest_error(tmp_path, name):
    with pytest.raises(ManifestError, match="cannot be read"):
        read_manifest(tmp_path / name)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema_version": 1, "models": {', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"broken\.json is not valid JSON"):
        read_manifest(path)


# --------------------------------------------------------------------------- HISTOHUB_MANIFEST


def test_histohub_manifest_adds_entries(tmp_path, monkeypatch):
    first = write_manifest(tmp_path / "a.json", {"org-resnet18": entry_data()})
    second = write_manifest(tmp_path / "b.json", {"org-resnet18-v2": entry_data()})
    monkeypatch.setenv("HISTOHUB_MANIFEST", f"{first}{_manifest.os.pathsep}{second}")
    names = _manifest.list_models()
    assert {"resnet18-ssl", "resnet18-ssl-epoch9", "org-resnet18", "org-resnet18-v2"} <= set(names)
    assert _manifest.get_entry("org-resnet18").manifest_path == first
    assert _manifest.get_entry("resnet18-ssl").manifest_path == MANIFEST_PATH


def test_histohub_manifest_cannot_redefine_a_model(tmp_path, monkeypatch):
    extra = write_manifest(tmp_path / "extra.json", {"resnet18-ssl": entry_data()})
    monkeypatch.setenv("HISTOHUB_MANIFEST", str(extra))
    with pytest.raises(ManifestError, match=r"'resnet18-ssl' in .*extra\.json is already "
                                            r"defined in .*weights_manifest\.json"):
        _manifest.list_models()


def test_duplicate_between_two_extra_manifests_is_refused(tmp_path, monkeypatch):
    first = write_manifest(tmp_path / "a.json", {"org-model": entry_data()})
    second = write_manifest(tmp_path / "b.json", {"org-model": entry_data()})
    monkeypatch.setenv("HISTOHUB_MANIFEST", f"{first}{_manifest.os.pathsep}{second}")
    with pytest.raises(ManifestError, match=r"b\.json is already defined in .*a\.json"):
        _manifest.load_manifest()


def test_missing_or_invalid_extra_manifest_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOHUB_MANIFEST", str(tmp_path / "absent.json"))
    with pytest.raises(ManifestError, match="check HISTOHUB_MANIFEST"):
        _manifest.list_models()
    bad = entry_data()
    bad["weights"][0]["sha256"] = "d63eafa0"
    path = write_manifest(tmp_path / "bad.json", {"org-model": bad})
    monkeypatch.setenv("HISTOHUB_MANIFEST", str(path))
    with pytest.raises(ManifestError, match=r"bad\.json.*org-model.*sha256"):
        _manifest.list_models()


def test_unknown_name_lists_close_names():
    with pytest.raises(UnknownModelError, match="resnet18-ssl") as caught:
        _manifest.get_entry("resnet18_ssl")
    assert isinstance(caught.value, KeyError)
    assert "resnet18-ssl" in caught.value.close_matches
