"""Issue 23, item 6: weak points closed (bundled size first, accepted hashes scoped to
their file, the manifest as a package source, names in logs, locks, a warning once)."""

from __future__ import annotations

import hashlib
import os

import pytest
from _servers import weights_file

from histohub import _env
from histohub.hub import _cache, _fetch
from histohub.hub._registry import get_entry
from histohub.errors import ChecksumError, DownloadError, OptionError

PAYLOAD = b"PK\x03\x04" + os.urandom(100_000)
OTHER = PAYLOAD[:-10] + b"other file"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bundled_file_of_the_wrong_size_is_not_hashed(make_manifest, tmp_path, monkeypatch):
    import histohub.hub._schema as schema

    monkeypatch.setattr(schema, "PACKAGE_DIR", tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "big.bin").write_bytes(PAYLOAD + b"x" * 1000)
    make_manifest({"bundled": [weights_file("big.bin", [{"package": "weights/big.bin"}],
                                            data=PAYLOAD)]})

    def hashed(*args, **kwargs):
        raise AssertionError("hashed before its size was compared")

    monkeypatch.setattr(_cache, "sha256_file", hashed)
    with pytest.raises(ChecksumError, match=f"{len(PAYLOAD) + 1000} bytes.*damaged"):
        _fetch.fetch_weights(get_entry("bundled"), progress=False)


def test_an_accepted_hash_holds_for_its_file_only(file_server, make_manifest, monkeypatch):
    """Accepting a.bin's new hash neither accepts that content for b.bin nor drops b.bin's
    reported size check."""
    file_server.files["/a.bin"] = OTHER
    file_server.files["/b.bin"] = OTHER
    file_server.files["/c.bin"] = PAYLOAD + b"more"
    reported = {"sha256": _sha(PAYLOAD), "size": len(PAYLOAD), "note": "a user"}
    make_manifest({name: [weights_file(f"{name}.bin", [{"url": f"{file_server.url}/{name}.bin"}],
                                       reported=reported)] for name in ("a", "b", "c")})
    monkeypatch.setenv("HISTOHUB_ACCEPT_SHA256", f"a.bin={_sha(OTHER)}")

    assert _fetch.fetch_weights(get_entry("a"), progress=False).path.read_bytes() == OTHER
    with pytest.raises(ChecksumError, match="HISTOHUB_ACCEPT_SHA256=b.bin="):
        _fetch.fetch_weights(get_entry("b"), progress=False)
    with pytest.raises((ChecksumError, DownloadError), match=f"{len(PAYLOAD)} bytes"):
        _fetch.fetch_weights(get_entry("c"), progress=False)


def test_an_unscoped_accepted_hash_is_one_line_saying_the_form(monkeypatch):
    monkeypatch.setenv("HISTOHUB_ACCEPT_SHA256", _sha(OTHER))
    with pytest.raises(OptionError, match="FILENAME=SHA256"):
        _env.accepted_sha256s()


# --------------------------------------------------------------------------- a cohort's run


@pytest.fixture
def evil_cohort(tmp_path):
    from wsi_factory import tissue_image, write_slide

    folder = tmp_path / "slides"
    folder.mkdir()
    write_slide(folder / "plain.tif", tissue_image(448, 448, [(0, 0, 448, 448)], seed=1),
                levels=1)
    write_slide(folder / "evil\nERROR: fake.tif",
                tissue_image(448, 448, [(0, 0, 448, 448)], seed=2), levels=1)
    return folder


def test_names_cannot_forge_log_lines_and_a_clean_run_leaves_no_locks(
        evil_cohort, resnet18_file, tmp_path, monkeypatch, capsys, caplog):
    import logging

    from histohub import cli

    monkeypatch.setattr(cli, "COMMANDS", ["histohub.cli._extract"])
    out = tmp_path / "out"
    argv = ["extract", str(evil_cohort), "--model", str(resnet18_file), "--out", str(out),
            "--batch-size", "4", "--quiet"]
    with caplog.at_level(logging.INFO):
        assert cli.main([*argv, "--max-patches", "2"]) == 0
        assert not list(out.glob(".*.lock")), "locks left after a clean run"
        caplog.clear()
        assert cli.main(argv) == 0  # extends both trials
    assert not list(out.glob(".*.lock"))
    trial = [r for r in caplog.records if "a trial of" in r.getMessage()]
    assert len(trial) == 2, [r.getMessage() for r in trial]  # once per slide, not twice
    printed = capsys.readouterr()
    for text in (caplog.text, printed.out, printed.err):
        assert not any(line.startswith("ERROR: fake") for line in text.splitlines()), text
    assert "evil\\nERROR: fake" in caplog.text


@pytest.mark.parametrize("package", ["weights_manifest.json", "errors.py", "cli/__init__.py"])
def test_a_package_source_outside_weights_is_a_manifest_error(make_manifest, package):
    """The manifest (or a module) named as a weights file got the advice to 'delete it and
    download again'; a package source lies under histohub/weights/."""
    from histohub.errors import ManifestError

    with pytest.raises(ManifestError, match="weights/"):
        make_manifest({"selfref": [weights_file("m.bin", [{"package": package}],
                                                data=PAYLOAD)]})
        get_entry("selfref")
