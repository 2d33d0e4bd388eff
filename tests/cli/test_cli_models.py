"""``histohub list | info | download | pin | convert`` (loopback servers only)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from _servers import weights_file

import histohub
from histohub.hub import _cache
from histohub.hub._registry import get_entry
from histohub.cli import main

PAYLOAD = b"PK\x03\x04" + os.urandom(200_000)  # looks like a torch file
UNPINNED = b"PK\x03\x04" + os.urandom(100_000)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _cached(name: str, index: int = 0):
    """Where the cache keeps weights file ``index`` of model ``name``."""
    return _cache.cached_path(get_entry(name).weights[index])


@pytest.fixture
def served_model(file_server, make_manifest):
    """A pinned test model ``cli-model`` and an unpinned ``cli-unpinned``, both served."""
    file_server.files["/w/cli.bin"] = PAYLOAD
    file_server.files["/w/unpinned.bin"] = UNPINNED
    path = make_manifest({
        "cli-model": [weights_file("cli.bin", [{"url": file_server.url + "/w/cli.bin"}],
                                   data=PAYLOAD)],
        "cli-unpinned": [weights_file("unpinned.bin",
                                      [{"url": file_server.url + "/w/unpinned.bin"}])],
    })
    return path


def _row(out: str, name: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [name])


def test_list_shows_every_model_with_pinned_and_cached_columns(capsys, served_model):
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert out.splitlines()[0].split() == ["NAME", "ARCH", "DIM", "INPUT", "MPP", "PARAMS",
                                           "RUNS", "ON", "COMMERCIAL", "GATED", "PINNED",
                                           "CACHED", "LICENCE"]
    assert _row(out, "resnet18-ssl")[1:] == ["*", "resnet18", "512", "224px", "0.5", "11M",
                                             "CPU", "or", "GPU", "yes", "no", "no", "no", "MIT"]
    assert _row(out, "cli-model")[1:] == ["resnet18", "512", "224px", "0.5", "-", "CPU", "or",
                                          "GPU", "yes", "no", "yes", "no", "MIT"]
    assert _row(out, "cli-unpinned")[-3] == "no"

    assert run(capsys, "download", "-q", "cli-model")[0] == 0
    assert _row(run(capsys, "list")[1], "cli-model")[-2] == "yes"


def test_info_gives_preprocessing_sources_and_citation(capsys, served_model, file_server):
    code, out, _ = run(capsys, "info", "resnet18-ssl")
    assert code == 0
    assert "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in out and "0.5 um/px" in out
    assert "pytorchnative_tenpercent_resnet18.ckpt" in out and "tenpercent_resnet18.ckpt" in out
    assert "https://github.com/ozanciga/self-supervised-histopathology/releases" in out
    assert "Ciga O, Xu T, Martel AL." in out and "MIT" in out
    assert "not pinned" in out

    out = run(capsys, "info", "cli-model")[1]
    assert hashlib.sha256(PAYLOAD).hexdigest() in out and file_server.url + "/w/cli.bin" in out


def test_unknown_name_suggests_close_names(capsys):
    code, _, err = run(capsys, "info", "resnet18-sl")
    assert code == 2 and "resnet18-ssl" in err


def test_download_prefetches_into_the_cache(capsys, served_model, file_server):
    code, out, _ = run(capsys, "download", "-q", "cli-model", "cli-unpinned")
    assert code == 0
    assert _cached("cli-model").read_bytes() == PAYLOAD
    assert _cached("cli-unpinned").read_bytes() == UNPINNED
    assert hashlib.sha256(PAYLOAD).hexdigest() in out
    requests = len(file_server.requests)

    assert run(capsys, "download", "-q", "cli-model")[0] == 0  # cached: no request
    assert len(file_server.requests) == requests


def test_download_all_files_fills_a_mirror_folder(capsys, file_server, make_manifest,
                                                  monkeypatch):
    file_server.files.update({"/a.bin": PAYLOAD, "/b.bin": UNPINNED})
    make_manifest({"two-files": [
        weights_file("a.bin", [{"url": file_server.url + "/a.bin"}], data=PAYLOAD),
        weights_file("b.bin", [{"url": file_server.url + "/b.bin"}], data=UNPINNED)]})
    assert run(capsys, "download", "-q", "two-files")[0] == 0
    assert not _cached("two-files", 1).exists()  # the first file is enough

    assert run(capsys, "download", "-q", "--all-files", "two-files")[0] == 0
    assert _cached("two-files", 1).read_bytes() == UNPINNED
    # The cache's weights/ folder works as HISTOHUB_MIRROR for an offline machine.
    mirror = _cache.weights_dir()
    monkeypatch.setenv("HISTOHUB_HOME", str(mirror.parent.parent / "offline-machine"))
    monkeypatch.setenv("HISTOHUB_MIRROR", str(mirror))
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")
    requests = len(file_server.requests)
    assert run(capsys, "download", "-q", "--all-files", "two-files")[0] == 0
    assert _cached("two-files", 1).read_bytes() == UNPINNED
    assert len(file_server.requests) == requests


def test_download_reports_each_failure_and_exits_nonzero(capsys, served_model, file_server):
    del file_server.files["/w/cli.bin"]
    code, out, err = run(capsys, "download", "-q", "cli-model", "cli-unpinned", "nope")
    assert code == 2
    assert "cli-model: error" in err and "HTTP 404" in err
    assert "nope: error" in err and "Unknown model" in err
    assert "cli-unpinned:" in out  # the one that works is still fetched


def test_pin_writes_hash_and_size_into_the_manifest(capsys, served_model):
    before = json.loads(served_model.read_text())
    code, out, _ = run(capsys, "pin", "-q", "cli-unpinned")
    assert code == 0

    text = served_model.read_text()
    data = json.loads(text)
    pinned = data["models"]["cli-unpinned"]["weights"][0]
    assert pinned["sha256"] == hashlib.sha256(UNPINNED).hexdigest()
    assert pinned["size"] == len(UNPINNED)
    assert text == json.dumps(data, indent=2) + "\n"  # the file's own formatting
    before["models"]["cli-unpinned"]["weights"][0].update(sha256=pinned["sha256"],
                                                          size=pinned["size"])
    assert data == before  # nothing else changed
    entry = get_entry("cli-unpinned")  # the manifest cache was cleared
    assert (entry.weights[0].sha256, entry.weights[0].size) == (pinned["sha256"], len(UNPINNED))
    assert "pinned sha256" in out


def test_pin_refuses_a_file_whose_bytes_changed(capsys, served_model, file_server):
    assert run(capsys, "download", "-q", "cli-unpinned")[0] == 0
    cached = _cached("cli-unpinned")
    cached.write_bytes(b"tampered")  # and upstream changed too: nothing trustworthy left
    file_server.files["/w/unpinned.bin"] = b"changed upstream"

    code, _, err = run(capsys, "pin", "-q", "cli-unpinned")

    assert code == 2 and "recorded on first download" in err
    assert json.loads(served_model.read_text())["models"]["cli-unpinned"]["weights"][0][
        "sha256"] is None


def test_pin_with_explicit_manifest_needs_the_entry_there(capsys, served_model, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema_version": 1, "models": {}}, indent=2) + "\n")
    code, _, err = run(capsys, "pin", "cli-unpinned", "--manifest", str(other))
    assert code == 2 and "not defined in" in err


def test_convert_lightning_checkpoint_to_backbone_safetensors(capsys, lightning_ckpt, tmp_path,
                                                              torchvision_features,
                                                              backbone_state):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "resnet18.safetensors"
    code, stdout, _ = run(capsys, "convert", str(lightning_ckpt), str(out))

    assert code == 0 and "resnet18 backbone" in stdout
    tensors = load_file(out)
    assert set(tensors) == set(backbone_state)  # projection head and fc dropped
    for key, value in backbone_state.items():
        assert torch.equal(tensors[key], value), key
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["histohub_arch"] == "resnet18"
    assert metadata["source_sha256"] == hashlib.sha256(lightning_ckpt.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left

    model = histohub.load_pretrained(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torchvision_features(x), rtol=0, atol=0)


def test_convert_a_model_name_uses_its_cached_weights(capsys, file_server, make_manifest,
                                                      legacy_ckpt, backbone_state, tmp_path):
    from safetensors.torch import load_file

    data = legacy_ckpt.read_bytes()
    file_server.files["/epoch9.ckpt"] = data
    make_manifest({"old-model": [weights_file("_ckpt_epoch_9.ckpt",
                                              [{"url": file_server.url + "/epoch9.ckpt"}],
                                              data=data, format="lightning")]})
    out = tmp_path / "old.safetensors"
    assert run(capsys, "convert", "old-model", str(out))[0] == 0
    tensors = load_file(out)
    assert set(tensors) == set(backbone_state)
    assert all(torch.equal(tensors[k], v) for k, v in backbone_state.items())


def test_convert_with_wrong_arch_names_the_keys_and_writes_nothing(capsys, legacy_ckpt,
                                                                   tmp_path):
    out = tmp_path / "r50.safetensors"
    code, _, err = run(capsys, "convert", str(legacy_ckpt), str(out), "--arch", "resnet50")
    assert code == 2
    assert "missing" in err and "layer1.0.conv3.weight" in err
    assert not out.exists()
    assert run(capsys, "convert", str(legacy_ckpt), str(tmp_path / "x.pt"))[0] == 2


def test_convert_careless_paths_are_one_line_errors(capsys, legacy_ckpt, tmp_path):
    """Before, IN missing or a folder gave a FileNotFoundError traceback, and so did OUT
    being a folder or lying under a file."""
    out = tmp_path / "out.safetensors"
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder.safetensors").mkdir()
    for argv, says in [
        ((str(tmp_path / "missing.pt"), str(out)), "missing.pt' does not exist"),
        ((str(tmp_path), str(out)), "is a folder, not a checkpoint file"),
        ((str(legacy_ckpt), str(tmp_path / "folder.safetensors")), "is a folder"),
        ((str(legacy_ckpt), str(tmp_path / "a-file" / "x.safetensors")),
         "a-file is a file, not a folder"),
    ]:
        code, _, err = run(capsys, "convert", *argv)
        assert code == 2 and says in err and err.count("\n") == 1, err
        assert err.startswith("histohub convert: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder.safetensors"]


def test_convert_write_failure_is_one_line_and_leaves_nothing(capsys, legacy_ckpt, tmp_path,
                                                              monkeypatch):
    from safetensors import torch as safetensors_torch

    def full_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_torch, "save_file", full_disk)
    out = tmp_path / "out.safetensors"
    code, _, err = run(capsys, "convert", str(legacy_ckpt), str(out))
    assert code == 2 and "No space left on device" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_pin_with_a_folder_as_manifest_is_one_line(capsys, served_model, tmp_path):
    code, _, err = run(capsys, "pin", "cli-unpinned", "--manifest", str(tmp_path))
    assert code == 2 and str(tmp_path) in err and err.count("\n") == 1, err
