"""Every front door gives the same features as a torchvision ResNet18 loaded by hand.

A test manifest (``HISTOHUB_MANIFEST``) lists a checkpoint in the authors' plain-PyTorch
layout (random weights), served by an HTTP server on 127.0.0.1, so ``load_pretrained``
runs the real download, verification and key mapping. From that one entry:
``histohub.load_pretrained``, ``torch.hub.load(..., source="local")`` and
``timm.create_model("local-dir:<export_hf directory>")`` must all agree with the
reference. ``push`` is checked with huggingface_hub's upload patched (no Hub is reachable).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import http.server
import inspect
import json
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import encoder_state, reference_encoder, upstream_state_dict
from PIL import Image

import histohub
from histohub.hub._export import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, export_hf, push

REPO = Path(__file__).resolve().parents[2]
NAME = "frontdoor-resnet18"
HUB_NAME = "frontdoor_resnet18"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def frontdoor_weights(tmp_path_factory):
    """(encoder state dict, path of the upstream-layout checkpoint, its sha256)."""
    state = encoder_state("resnet18", seed=7)
    path = tmp_path_factory.mktemp("served") / "pytorchnative_tenpercent_resnet18.ckpt"
    torch.save({"state_dict": upstream_state_dict(state)}, path)
    return state, path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def frontdoor_reference(frontdoor_weights):
    """A batch and the features of torchvision's resnet18 (fc = Identity) loaded by hand."""
    state, _, _ = frontdoor_weights
    torch.manual_seed(3)
    batch = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        return batch, reference_encoder(state)(batch)


@pytest.fixture(scope="session")
def frontdoor_server(frontdoor_weights):
    """An HTTP server on 127.0.0.1 serving the checkpoint's folder."""
    folder = frontdoor_weights[1].parent

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def frontdoor_model(tmp_path, monkeypatch, frontdoor_weights, frontdoor_server):
    """``NAME`` in a HISTOHUB_MANIFEST file: pinned sha256 and size, the loopback URL."""
    _, path, sha256 = frontdoor_weights
    entry = copy.deepcopy(json.loads(histohub.hub.MANIFEST_PATH.read_text())["models"]
                          ["resnet18-ssl"])
    entry.update(description="Random-weight ResNet18 in the upstream layout (tests).",
                 default=False)
    # Not the upstream file: its own hash, size and fingerprint instead of the reported ones.
    conv1 = float(torch.linalg.vector_norm(frontdoor_weights[0]["conv1.weight"]))
    weights = {key: value for key, value in entry["weights"][0].items() if key != "reported"}
    entry["weights"] = [{**weights, "sha256": sha256, "size": path.stat().st_size,
                         "sources": [{"url": f"{frontdoor_server}/{path.name}"}],
                         "fingerprint": {**weights["fingerprint"], "l2_norm": conv1,
                                         "verified": True}}]
    manifest = tmp_path / "frontdoor.json"
    manifest.write_text(json.dumps({"schema_version": 1, "models": {NAME: entry}}))
    monkeypatch.setenv("HISTOHUB_MANIFEST", str(manifest))
    histohub.hub.reload_manifests()
    yield NAME
    histohub.hub.reload_manifests()


def features(model, batch):
    with torch.no_grad():
        return model(batch)


def tile(size: int = 224, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- the three doors


def test_load_pretrained_matches_torchvision(frontdoor_model, frontdoor_weights,
                                             frontdoor_reference):
    batch, expected = frontdoor_reference
    model = histohub.load_pretrained(frontdoor_model, progress=False)
    assert not model.training
    assert model.histohub_info.sha256 == frontdoor_weights[2]
    assert torch.equal(features(model, batch), expected)


def test_torch_hub_local_matches_torchvision(frontdoor_model, frontdoor_reference):
    batch, expected = frontdoor_reference
    model = torch.hub.load(str(REPO), HUB_NAME, source="local", progress=False)
    assert not model.training
    assert torch.equal(features(model, batch), expected)
    transform = torch.hub.load(str(REPO), "get_transform", frontdoor_model, source="local")
    image = tile()
    assert torch.equal(transform(image), histohub.get_transform(frontdoor_model)(image))


def test_timm_loads_the_exported_directory(tmp_path, frontdoor_model, frontdoor_reference):
    timm = pytest.importorskip("timm")
    batch, expected = frontdoor_reference
    out = export_hf(frontdoor_model, tmp_path / "export", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert (model.num_classes, model.num_features) == (0, 512)
    torch.testing.assert_close(features(model, batch), expected, rtol=0, atol=1e-6)

    from safetensors.torch import load_file
    assert load_file(out / WEIGHTS_NAME).keys() == model.state_dict().keys()

    config = timm.data.resolve_model_data_config(model)
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5) or \
        list(config["mean"]) == list(config["std"]) == [0.5, 0.5, 0.5]
    assert (config["interpolation"], config["crop_pct"]) == ("bilinear", 1.0)
    image = tile()
    timm_input = timm.data.create_transform(**config, is_training=False)(image)
    torch.testing.assert_close(timm_input, histohub.get_transform(frontdoor_model)(image),
                               rtol=0, atol=1e-6)


def test_export_config_and_card(tmp_path, frontdoor_model, frontdoor_weights):
    out = export_hf(frontdoor_model, tmp_path / "export", repo_id="org/frontdoor",
                    progress=False)
    config = json.loads((out / CONFIG_NAME).read_text())
    cfg = config["pretrained_cfg"]
    assert (config["architecture"], config["num_classes"], config["num_features"]) == \
        ("resnet18", 0, 512)
    assert (cfg["input_size"], cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["license"]) == \
        ([3, 224, 224], [0.5] * 3, [0.5] * 3, 1.0, "mit")
    assert cfg["paper_ids"] == "doi:10.1016/j.mlwa.2021.100198"
    assert config["histohub"]["source_sha256"] == frontdoor_weights[2]
    assert config["histohub"]["mpp"] == 0.5
    card = (out / CARD_NAME).read_text()
    assert card.startswith("---\n") and "license: mit" in card
    for fact in ('timm.create_model("hf-hub:org/frontdoor"', f'load_pretrained("{NAME}")',
                 "mean [0.5, 0.5, 0.5]", "0.5 um/px", "Ciga O, Xu T, Martel AL"):
        assert fact in card, fact
    for path in out.iterdir():  # no local paths (user names, cache folders) are published
        assert str(tmp_path) not in path.read_text(errors="replace")


def test_export_from_a_checkpoint_path(tmp_path, frontdoor_weights, frontdoor_reference):
    _, path, sha256 = frontdoor_weights
    out = export_hf(path, tmp_path / "export")
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["architecture"] == "resnet18"
    assert config["histohub"]["source_sha256"] == sha256
    assert "license: other" in (out / CARD_NAME).read_text()
    exported = histohub.load_pretrained(out / WEIGHTS_NAME)
    batch, expected = frontdoor_reference
    assert torch.equal(features(exported, batch), expected)


# --------------------------------------------------------------------------- nothing half-written


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_export_refuses_a_non_empty_directory(tmp_path, frontdoor_weights):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf(frontdoor_weights[1], out)
    assert _snapshot(out) == {"notes.txt": b"mine"}


def test_failed_export_leaves_the_old_directory(tmp_path, monkeypatch, frontdoor_weights):
    import safetensors.torch

    out = export_hf(frontdoor_weights[1], tmp_path / "export")
    before = _snapshot(out)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_hf(frontdoor_weights[1], out, overwrite=True)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]

    monkeypatch.undo()
    (out / "stale.txt").write_text("old")
    export_hf(frontdoor_weights[1], out, overwrite=True)
    assert sorted(_snapshot(out)) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


# --------------------------------------------------------------------------- push


@pytest.fixture
def fake_hub(monkeypatch):
    """Record HfApi.create_repo / upload_folder calls, with the folder's files as uploaded."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    api, calls = huggingface_hub.HfApi, []
    real = {name: inspect.signature(getattr(api, name))
            for name in ("create_repo", "upload_folder")}

    def create_repo(self, repo_id, **kwargs):
        real["create_repo"].bind(self, repo_id, **kwargs)  # the real method takes these
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        real["upload_folder"].bind(self, repo_id=repo_id, folder_path=folder_path, **kwargs)
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        calls.append(("upload_folder", repo_id, {**kwargs, "folder_path": Path(folder_path),
                                                 "files": files}))
        return "https://huggingface.co/org/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_the_export(fake_hub, frontdoor_model):
    assert push(frontdoor_model, "org/frontdoor", private=True, progress=False) == \
        "https://huggingface.co/org/commit/abc"
    (create, upload) = fake_hub
    assert create == ("create_repo", "org/frontdoor",
                      {"repo_type": "model", "private": True, "exist_ok": True})
    assert upload[1] == "org/frontdoor" and upload[2]["repo_type"] == "model"
    files = upload[2]["files"]
    assert sorted(files) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]
    assert json.loads(files[CONFIG_NAME])["pretrained_cfg"]["mean"] == [0.5] * 3
    assert b'hf-hub:org/frontdoor"' in files[CARD_NAME]
    assert not upload[2]["folder_path"].exists(), "the temporary export is removed"


def test_push_an_existing_export_directory(tmp_path, fake_hub, frontdoor_weights):
    out = export_hf(frontdoor_weights[1], tmp_path / "reviewed")
    push(out, "org/reviewed")
    assert fake_hub[1][2]["folder_path"] == out
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json, model.safetensors missing"):
        push(tmp_path / "empty", "org/x")


# --------------------------------------------------------------------------- CLI


def test_cli_export_hf_and_push(tmp_path, monkeypatch, capsys, fake_hub, frontdoor_weights):
    from histohub import cli

    monkeypatch.setattr(cli, "COMMANDS", ["histohub.cli._hub"])
    out = tmp_path / "export"
    assert cli.main(["export-hf", str(frontdoor_weights[1]), str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert cli.main(["export-hf", str(frontdoor_weights[1]), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["push", str(out), "org/cli", "--private"]) == 0
    assert fake_hub[0] == ("create_repo", "org/cli",
                           {"repo_type": "model", "private": True, "exist_ok": True})
    assert cli.main(["export-hf", "resnet18_ssl", str(tmp_path / "x")]) == 2
    assert "Did you mean 'resnet18-ssl'" in capsys.readouterr().err


# --------------------------------------------------------------------------- torch.hub from GitHub


@pytest.mark.slow
def test_torch_hub_github_download_layout(tmp_path):
    """``torch.hub.load("<org>/histohub:main", ...)`` on the archive GitHub would serve
    (``git archive`` of HEAD), extracted the way torch.hub extracts it, in a fresh process
    so that the archive's ``histohub`` is the one imported."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout to build GitHub's archive")
    archive = tmp_path / "main.zip"
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=zip",
                    "--prefix=histohub-main/", "-o", str(archive), "HEAD"], check=True)
    hub_dir = tmp_path / "hub"
    with zipfile.ZipFile(archive) as handle:
        extract = getattr(torch.hub, "_safe_extract_zip", None)
        extract(handle, hub_dir) if extract else handle.extractall(hub_dir)
    (hub_dir / "histohub-main").rename(hub_dir / "histohub_histohub_main")
    script = f"""
import json, torch
torch.hub.set_dir({str(hub_dir)!r})
repo, opts = "histohub/histohub:main", dict(trust_repo=True, skip_validation=True)
names = torch.hub.list(repo, verbose=False, **opts)
doc = torch.hub.help(repo, "resnet18_ssl", **opts)
model = torch.hub.load(repo, "resnet18_ssl", pretrained=False, verbose=False, **opts)
import histohub
with torch.no_grad():
    shape = list(model(torch.zeros(1, 3, 64, 64)).shape)
print(json.dumps({{"names": names, "doc": doc, "shape": shape, "file": histohub.__file__}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(hub_dir)), "the archive's histohub was imported"
    assert {"resnet18_ssl", "resnet18_ssl_epoch9", "get_transform"} <= set(result["names"])
    assert "mean (0.5, 0.5, 0.5)" in result["doc"].replace("\n    ", " ")
    assert result["shape"] == [1, 512]
