"""``histohub._env``: every HISTOHUB_* setting read in one module, parsed by one rule per
kind, a bad value refused in one line naming the setting (issue 20, item 5)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from _servers import weights_file

from histohub import _env
from histohub.cli import main
from histohub.errors import OptionError

PACKAGE = Path(__file__).resolve().parents[1] / "histohub"


def _environment_reads(source: str) -> list[str]:
    """The names read from the environment in ``source``: ``os.environ.get(X)``,
    ``os.environ[X]``, ``os.getenv(X)``, ``X`` a string or a module-level string constant."""
    tree = ast.parse(source)
    constants = {target.id: node.value.value for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                 and isinstance(node.value.value, str)
                 for target in node.targets if isinstance(target, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and (
                getattr(node.func, "attr", None) == "getenv"
                or (getattr(node.func, "attr", None) == "get"
                    and getattr(node.func.value, "attr", None) == "environ")):
            arg = node.args[0]
        elif isinstance(node, ast.Subscript) and getattr(node.value, "attr", None) == "environ":
            arg = node.slice
        else:
            continue
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            found.append(arg.value)
        elif isinstance(arg, ast.Name):
            found.append(constants.get(arg.id, f"<{arg.id}>"))
    return found


NUMBERS = {"HISTOHUB_MAX_DOWNLOAD_BYTES": _env.max_download_bytes,
           "HISTOHUB_DOWNLOAD_TIMEOUT": _env.download_timeout,
           "HISTOHUB_LOCK_TIMEOUT": _env.lock_timeout}
SWITCHES = {"HISTOHUB_OFFLINE": (_env.is_offline, False),
            "HISTOHUB_MALLOPT": (_env.mallopt_enabled, True),
            "HISTOHUB_JPEG_TILES": (_env.jpeg_tiles_enabled, True)}
SHA = "ab" * 32


def test_no_module_but_env_reads_a_histohub_setting():
    readers = sorted(f"{path.relative_to(PACKAGE)}: {name}" for path in PACKAGE.rglob("*.py")
                     if path.name != "_env.py"
                     for name in _environment_reads(path.read_text(encoding="utf-8"))
                     if name.startswith("HISTOHUB_"))
    assert readers == []


@pytest.mark.parametrize("source", [
    'os.environ.get("HISTOHUB_MALLOPT", "1")', "os.environ['HISTOHUB_HOME']",
    'os.getenv( "HISTOHUB_X")', 'ENV = "HISTOHUB_X"\ndef f():\n    return os.environ.get(ENV, "")'])
def test_the_scan_sees_each_way_of_reading_the_environment(source):
    assert [name for name in _environment_reads(source) if name.startswith("HISTOHUB_")]


@pytest.mark.parametrize("name", sorted(NUMBERS))
@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan", "1e999", "12 s"])
def test_a_bad_number_is_one_line_naming_the_setting(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(OptionError) as caught:
        NUMBERS[name]()
    message = str(caught.value)
    assert name in message and repr(value) in message and "\n" not in message


def test_numbers_defaults_and_blanks(monkeypatch):
    for name in NUMBERS:
        monkeypatch.setenv(name, "  ")  # blank: the default
    assert _env.max_download_bytes() == _env.DEFAULT_MAX_DOWNLOAD_BYTES
    assert _env.lock_timeout() == _env.DEFAULT_DOWNLOAD_TIMEOUT + 60
    monkeypatch.setenv("HISTOHUB_DOWNLOAD_TIMEOUT", " 2.5 ")
    monkeypatch.setenv("HISTOHUB_MAX_DOWNLOAD_BYTES", "1e6")
    assert (_env.download_timeout(), _env.lock_timeout()) == (2.5, 62.5)
    assert _env.max_download_bytes() == 1_000_000


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_switches_share_one_rule(monkeypatch, name):
    read, default = SWITCHES[name]
    monkeypatch.delenv(name, raising=False)
    assert read() is default
    for value, expected in [("1", True), (" TRUE ", True), ("Yes", True), ("on", True),
                            ("0", False), ("False", False), ("NO", False), ("off", False),
                            ("", default)]:
        monkeypatch.setenv(name, value)
        assert read() is expected, value
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(OptionError, match=f"^{name} takes 1/true/yes/on or 0/false/no/off"):
        read()


def test_lists_drop_empty_items(monkeypatch, tmp_path):
    monkeypatch.setenv("HISTOHUB_ACCEPT_SHA256", f" a.bin={SHA},, b.pt={'cd' * 32}\n")
    assert _env.accepted_sha256s() == {("a.bin", SHA), ("b.pt", "cd" * 32)}
    monkeypatch.setenv("HISTOHUB_ACCEPT_SHA256", f"a.bin={SHA},a.bin={SHA.upper()}")
    with pytest.raises(OptionError, match="^HISTOHUB_ACCEPT_SHA256 takes FILENAME=SHA256"):
        _env.accepted_sha256s()
    monkeypatch.setenv("HISTOHUB_ACCEPT_SHA256", SHA)  # unscoped: it held for every file
    with pytest.raises(OptionError, match="FILENAME=SHA256"):
        _env.accepted_sha256s()
    monkeypatch.setenv("HISTOHUB_ACCEPT_LICENCES", "UNI, CC-BY-NC-ND-4.0,")
    assert _env.accepted_licences() == {"uni", "cc-by-nc-nd-4.0"}
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    monkeypatch.setenv("HISTOHUB_MANIFEST", f"{os.pathsep}{first}{os.pathsep}{os.pathsep}{second}")
    assert _env.manifest_files() == [first, second]


def test_home_and_mirror(monkeypatch, tmp_path):
    monkeypatch.delenv("HISTOHUB_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _env.histohub_home() == tmp_path / "xdg" / "histohub"
    monkeypatch.setenv("HISTOHUB_HOME", str(tmp_path / "home"))
    assert _env.histohub_home() == tmp_path / "home"
    monkeypatch.setenv("HISTOHUB_MIRROR", "   ")
    assert _env.mirror() is None
    monkeypatch.setenv("HISTOHUB_MIRROR", " https://mirror.example/weights ")
    assert _env.mirror() == "https://mirror.example/weights"


@pytest.mark.parametrize("name, value", [("HISTOHUB_DOWNLOAD_TIMEOUT", "soon"),
                                         ("HISTOHUB_ACCEPT_SHA256", "not-a-hash"),
                                         ("HISTOHUB_OFFLINE", "perhaps")])
def test_histohub_download_refuses_a_bad_setting_in_one_line_before_writing(
        monkeypatch, tmp_path, capsys, make_manifest, name, value):
    """Exit code 2, one line naming the setting (not a list of failed sources), nothing
    written to the cache, no request made (the source cannot be reached anyway)."""
    monkeypatch.setenv("HISTOHUB_HOME", str(tmp_path / "home"))
    make_manifest({"test-model": [weights_file("model.bin",
                                               [{"url": "https://127.0.0.1:9/model.bin"}])]})
    monkeypatch.setenv(name, value)

    assert main(["download", "-q", "test-model"]) == 2

    error = capsys.readouterr().err.strip()
    assert name in error and repr(value) in error and "\n" not in error, error
    home = tmp_path / "home"
    assert not home.exists() or not any(p.is_file() for p in home.rglob("*"))
