"""The smoke config end to end: the loss goes down, ``--resume`` after an interruption
repeats the uninterrupted run exactly, and the export loads through a manifest."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import export
import run_pretrain
from histohub_training.simclr.augment import BatchAugment
from histohub_training.simclr.config import load_config
from histohub_training.simclr.data import Pool, PoolDataset
from histohub_training.simclr.loss import nt_xent_loss
from histohub_training.simclr.model import SimCLRModel
from histohub_training.simclr.train import resolve_precision, resume_config, train


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny 32 px steps gain nothing from a second thread, and on a shared, loaded machine
    two OpenMP threads can wait on each other for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiles(request, tmp_path_factory) -> Path:
    """Kather 2016 tiles from ../shared/data, or generated textured images where absent."""
    try:
        folder = request.getfixturevalue("shared_data") / "kather2016-tiles"
        if folder.is_dir():
            return folder
    except pytest.skip.Exception:
        pass
    folder = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    for i in range(40):  # four textures with random colours and frequencies
        yy, xx = np.mgrid[0:48, 0:48] / 48
        freq, colour = rng.uniform(1, 8), rng.uniform(0, 255, 3)
        wave = np.sin(2 * np.pi * freq * (xx if i % 2 else yy))[..., None]
        pixels = np.clip(colour + 60 * wave + rng.normal(0, 10, (48, 48, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"tile{i:02d}.png")
    return folder


def _config(tiles: Path, *extra: str):
    return load_config("smoke", [f"data.datasets={json.dumps([str(tiles)])}", *extra])


@pytest.fixture(scope="module")
def finished(tiles, tmp_path_factory):
    """The uninterrupted smoke run: (run folder, per-step losses)."""
    out = tmp_path_factory.mktemp("run") / "smoke"
    losses = train(_config(tiles), out, progress=False)
    return out, losses


def _log_losses(out: Path) -> list[str]:
    with open(out / "log.csv", newline="") as handle:
        return [row["loss"] for row in csv.DictReader(handle)]


def _fixed_batch_loss(model: SimCLRModel, out: Path) -> float:
    """NT-Xent of a fixed pair of views of the run's first 16 images (BN in batch mode)."""
    dataset = PoolDataset(Pool.load(out / "pool.json").items[:16], 32)
    images = torch.stack([dataset[i][0] for i in range(16)])
    view1, view2 = BatchAugment(32, crop_min_area=0.25, jitter="light").two_views(
        images, torch.Generator().manual_seed(123))
    with torch.no_grad():
        z = model.train()((torch.cat([view1, view2]) - 0.5) / 0.5)
    return nt_xent_loss(*z.chunk(2), temperature=0.1).item()


@pytest.mark.slow
def test_smoke_run_lowers_the_loss(finished):
    out, losses = finished
    assert len(losses) == 8 and all(np.isfinite(losses))
    torch.manual_seed(0)  # the trainer's seed: the same initial weights
    initial = SimCLRModel("resnet18", projection_dim=32)
    trained = SimCLRModel("resnet18", projection_dim=32)
    trained.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    before, after = _fixed_batch_loss(initial, out), _fixed_batch_loss(trained, out)
    assert after < before - 0.1, (before, after)
    assert [float(v) for v in _log_losses(out)] == losses


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run_exactly(finished, tiles, tmp_path):
    reference, losses = finished
    out = tmp_path / "interrupted"

    class Interrupt(Exception):
        pass

    def stop_in_second_epoch(epoch, step, loss):
        if epoch == 1 and step == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_config(tiles), out, progress=False, on_step=stop_in_second_epoch)
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    assert run_pretrain.main(["--resume", "--out", str(out), "--no-progress"]) == 0
    assert _log_losses(out) == _log_losses(reference)  # bit for bit, as written by repr
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    expected = torch.load(reference / "checkpoint.pt", weights_only=True)
    assert resumed["epoch"] == expected["epoch"] == 2
    for key, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key


@pytest.mark.slow
def test_export_loads_through_the_manifest(finished, tmp_path, monkeypatch):
    import histohub

    out, _ = finished
    entry = export.export(out / "checkpoint.pt", name="smoke-resnet18", out=tmp_path / "exp",
                          license="CC BY 4.0")
    weights = tmp_path / "exp" / "smoke-resnet18.safetensors"
    assert entry["weights"][0]["sha256"] == histohub.hub.sha256_file(weights)
    assert entry["recipe"]["backbone_parameters"] == 11_176_512
    assert "projection_head" not in json.dumps(list(
        __import__("safetensors.torch").torch.load_file(weights)))
    assert (tmp_path / "exp" / "smoke-resnet18.md").read_text().count(entry["weights"][0]["sha256"])

    monkeypatch.setenv("HISTOHUB_MANIFEST", str(tmp_path / "exp" / "manifest.json"))
    histohub.hub.reload_manifests()
    model = histohub.load_pretrained("smoke-resnet18", progress=False)
    assert model.histohub_info.preprocessing.input_size == 32
    trained = SimCLRModel("resnet18", projection_dim=32)
    trained.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained.eval().backbone(x))

    with pytest.raises(ValueError, match="--force"):
        export.export(out / "checkpoint.pt", name="smoke-resnet18", out=tmp_path / "exp")
    with pytest.raises(ValueError, match="ships"):
        export.export(out / "checkpoint.pt", name="resnet18-ssl", out=tmp_path / "exp2")


def test_bf16_autocast_on_cpu():
    model = SimCLRModel("resnet18", projection_dim=16).to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(x)
    assert z.dtype == torch.bfloat16
    loss = nt_xent_loss(*z.chunk(2), temperature=0.1)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.backbone.conv1.weight.grad.dtype == torch.float32
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_precision("auto", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))


def test_config_overrides_and_resume_rules(tmp_path, tiles):
    config = load_config("paper_resnet18", ["optim.name=lamb", "augment.jitter=heavy",
                                            "augment.rotate=false", "epochs=5"])
    assert (config.optim.name, config.augment.jitter, config.augment.rotate, config.epochs) == (
        "lamb", "heavy", False, 5)
    assert config.batch_size == 512 and config.optim.temperature == 0.1
    with pytest.raises(ValueError, match="unknown key"):
        load_config("smoke", ["optim.learning_rate=0.1"])
    with pytest.raises(ValueError, match="choose lars, lamb or adam"):
        load_config("smoke", ["optim.name=sgd"])
    with pytest.raises(FileNotFoundError, match="smoke"):
        load_config("no_such_config")
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 3}))
    assert resume_config(tmp_path, ["epochs=4"]).epochs == 4
    with pytest.raises(ValueError, match="cannot change when resuming"):
        resume_config(tmp_path, ["batch_size=16"])
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(FileExistsError, match="--resume"):
        train(_config(tiles), tmp_path, progress=False)


def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, tiles, capsys):
    """A careless user's input gets run_benchmark.py's answer: one line, exit code 2."""
    missing = tmp_path / "no-such-folder"
    argv = ["--config", "smoke", "--out", str(tmp_path / "run"), "--no-progress"]
    assert run_pretrain.main([*argv, f"data.datasets={json.dumps([str(missing)])}"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: Dataset folder {missing} does not exist\n"
    assert run_pretrain.main(["--config", "no_such_config"]) == 2
    assert capsys.readouterr().err.startswith("error: No config 'no_such_config'")
    assert run_pretrain.main(["--config", "smoke", "optim.name=sgd"]) == 2
    assert "choose lars, lamb or adam" in capsys.readouterr().err
    assert run_pretrain.main(["--resume", "--out", str(missing)]) == 2
    assert "a run folder?" in capsys.readouterr().err
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "checkpoint.pt").write_bytes(b"")
    assert run_pretrain.main(["--config", "smoke", "--out", str(tmp_path / "done"),
                              f"data.datasets={json.dumps([str(tiles)])}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
