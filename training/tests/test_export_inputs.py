"""``training/export.py`` checks every input before it writes a byte: a name that would
leave the output folder, a checkpoint that cannot be read, an output that is a file, a
manifest that already lists the name. Each mistake is one line on stderr, exit code 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import export
from histohub_training.simclr.checkpoint import save_checkpoint
from histohub_training.simclr.config import load_config, to_dict
from histohub_training.simclr.model import SimCLRModel


def _payload(arch: str = "resnet18") -> dict:
    torch.manual_seed(0)
    return {"model": SimCLRModel("resnet18", projection_dim=32).state_dict(), "epoch": 2,
            "global_step": 8, "config": to_dict(load_config("smoke", [f"model.arch={arch}"])),
            "arch": arch, "world_size": 1,
            "pool_summary": [{"name": "tiles", "kind": "images", "path": "/data/tiles",
                              "selected": 32, "available": 40}]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A training checkpoint in run_pretrain.py's layout (random smoke-config weights)."""
    return save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt", _payload())


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for folders)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


def _refused(capsys, argv: list[str], root: Path, match: str) -> str:
    """Run export.py with ``argv``; check exit code 2, one line naming ``match`` and that
    nothing under ``root`` changed."""
    before = _tree(root)
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert _tree(root) == before
    return err


@pytest.mark.parametrize("name", ["../../x", "a/b", "a\\b", "/tmp/x", "..", "a..b", "",
                                  "-x", ".x", "My-Model", "a b", "a\nb", "a\x00b", "x" * 65,
                                  "résumé"])
def test_unsafe_names_are_refused_before_anything_is_written(checkpoint, tmp_path, capsys,
                                                              name):
    out = tmp_path / "a" / "b" / "out"
    _refused(capsys, [str(checkpoint), f"--name={name}", "--out", str(out)], tmp_path,
             "--name")
    assert not out.exists()


def test_bad_inputs_are_refused_before_anything_is_written(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"

    def refused(argv: list[str], match: str) -> str:
        return _refused(capsys, argv, tmp_path, match)

    refused([str(tmp_path / "missing.pt"), "--name", "m", "--out", str(out)], "missing.pt")
    refused([str(tmp_path), "--name", "m", "--out", str(out)], "is a folder")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02not a pickle at all")
    refused([str(tmp_path / "junk.pt"), "--name", "m", "--out", str(out)], "junk.pt")
    torch.save({"format_version": 1, "model": {}}, tmp_path / "partial.pt")
    refused([str(tmp_path / "partial.pt"), "--name", "m", "--out", str(out)],
            "not a training checkpoint")
    (tmp_path / "a-file").write_text("x")
    refused([str(checkpoint), "--name", "m", "--out", str(tmp_path / "a-file")], "a-file")
    refused([str(checkpoint), "--name", "m", "--out", str(tmp_path / "a-file" / "sub")],
            "a-file")
    refused([str(checkpoint), "--name", "m", "--out", str(out), "--manifest", str(tmp_path)],
            "is a folder")
    (tmp_path / "bad.json").write_text("{")
    refused([str(checkpoint), "--name", "m", "--out", str(out), "--manifest",
             str(tmp_path / "bad.json")], "bad.json")
    refused([str(checkpoint), "--name", "resnet18-ssl", "--out", str(out)], "ships")
    refused([str(checkpoint), "--name", "m", "--out", str(out), "--url", "ftp://host/m"],
            "url")
    assert not out.exists()


def test_unknown_arch_in_the_checkpoint_is_refused(tmp_path, capsys):
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", _payload())
    payload = torch.load(path, weights_only=True)
    payload["config"]["model"]["arch"] = "vit_b16"
    torch.save(payload, path)
    _refused(capsys, [str(path), "--name", "m", "--out", str(tmp_path / "out")], tmp_path,
             "vit_b16")


def test_an_existing_export_is_kept_without_force(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert export.main([str(checkpoint), "--name", "m", "--out", str(out)]) == 0
    capsys.readouterr()
    weights = out / "m.safetensors"
    entry = json.loads((out / "manifest.json").read_text())["models"]["m"]
    assert entry["weights"][0]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == ["m.md", "m.safetensors", "manifest.json"]

    # Before, the weights were replaced and only then was the manifest found to list "m":
    # its sha256 no longer matched the file.
    _refused(capsys, [str(checkpoint), "--name", "m", "--out", str(out)], tmp_path,
             "--force")
    # A weights file the manifest does not list is not replaced either.
    (out / "other.safetensors").write_bytes(b"someone else's file")
    _refused(capsys, [str(checkpoint), "--name", "other", "--out", str(out)], tmp_path,
             "--force")
    assert export.main([str(checkpoint), "--name", "m", "--out", str(out), "--force"]) == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


def test_half_export_into_the_package_states_the_scale_the_model_saw(tmp_path, monkeypatch):
    """--into-package: fp16 weights under histohub/weights/, a 'package' source in
    histohub's own manifest; the input mpp is what a whole stored patch becomes at
    image_size (0.77 um/px stored in 96 px, shown at 64 px: 1.155 um/px)."""
    import histohub

    payload = _payload()
    payload["config"]["image_size"] = 64
    payload["config"]["data"]["cache_size"] = 96
    payload["config"]["data"]["datasets"] = [
        {"path": "/data/tiles"}, {"path": "/data/wsis", "kind": "slides", "mpp": 0.77}]
    payload["pool_summary"].append({"name": "wsis", "kind": "slides", "path": "/data/wsis",
                                    "selected": 5, "available": 5})
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    package = tmp_path / "histohub"
    package.mkdir()
    manifest = package / "weights_manifest.json"
    manifest.write_text(histohub.hub.MANIFEST_PATH.read_text())
    monkeypatch.setattr(export, "MANIFEST_PATH", manifest)
    monkeypatch.setattr(export, "PACKAGE_WEIGHTS", package / "weights")
    # histohub has no public seam for where it is installed: the test stands in for it
    monkeypatch.setattr("histohub.hub._schema.PACKAGE_DIR", package)

    entry = export.export(tmp_path / "checkpoint.pt", name="tiny-ssl", half=True,
                          into_package=True, data_note="Tiles: CC0.")

    weights = package / "weights" / "tiny-ssl.safetensors"
    assert entry["weights"][0]["sources"] == [{"package": "weights/tiny-ssl.safetensors"}]
    assert entry["weights"][0]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert entry["preprocessing"]["input_size"] == 64 and entry["preprocessing"]["mpp"] == 1.155
    assert entry["training_data"].endswith("Tiles: CC0.")
    assert "tiny-ssl" in json.loads(manifest.read_text())["models"]
    monkeypatch.setenv("HISTOHUB_MANIFEST", "")
    monkeypatch.setattr("histohub.hub._registry.MANIFEST_PATH", manifest)
    histohub.hub.reload_manifests()
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")
    model = histohub.load_pretrained("tiny-ssl")
    expected = {k[len("backbone."):]: v for k, v in payload["model"].items()
                if k.startswith("backbone.")}
    for key, value in model.state_dict().items():   # fp16 on disk, fp32 in the model
        assert value.dtype == expected[key].dtype
        torch.testing.assert_close(value, expected[key].half().to(value.dtype))
    histohub.hub.reload_manifests()
    with pytest.raises(ValueError, match="decides --out"):
        export.export(tmp_path / "checkpoint.pt", name="tiny-ssl", into_package=True,
                      out=tmp_path / "elsewhere")


def test_slides_at_several_scales_state_the_configs_scale_and_name_the_others(tmp_path):
    """Slide patches stored at 0.5, 0.77 and 1.15 um/px: the entry states data.slide_mpp's
    scale (0.77 stored in 96 px, shown at 64 px: 1.155) and names the other two; without a
    slide_mpp among them, export refuses (one input scale must be stated)."""
    payload = _payload()
    payload["config"]["image_size"] = 64
    data = payload["config"]["data"]
    data["cache_size"], data["slide_mpp"] = 96, 0.77
    data["datasets"] = [{"path": "/data/tiles", "max_images": 3}] + [
        {"path": "/data/wsis", "kind": "slides", "mpp": mpp} for mpp in (0.5, 0.77, 1.15)]
    payload["pool_summary"].append({"name": "wsis", "kind": "slides", "path": "/data/wsis",
                                    "selected": 5, "available": 5})
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    entry = export.export(tmp_path / "checkpoint.pt", name="multi", out=tmp_path / "exp")
    assert entry["preprocessing"]["mpp"] == 1.155
    note = entry["preprocessing"]["mpp_note"]
    assert "0.77 um/px in 96 px" in note and "0.5 (0.75), 1.15 (1.725)" in note
    assert "at 0.5, 0.77, 1.15 um/px" in entry["training_data"]
    assert "(tiles: max 3)" in entry["training_data"]

    data["slide_mpp"] = 0.6
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    with pytest.raises(ValueError, match="set data.slide_mpp"):
        export.export(tmp_path / "checkpoint.pt", name="multi2", out=tmp_path / "exp2")
