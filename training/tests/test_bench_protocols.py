"""Protocols and outputs: linear probe, fine-tuning, UNet encoder, tables, manifest, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from downstream import report
from downstream.cli import main
from downstream.encoders import random_encoder
from downstream.finetune import finetune
from downstream.linear import paper_weight_decay, train_linear

pytest.importorskip("sklearn")
Image = pytest.importorskip("PIL.Image")


def _blobs(n: int, *, seed: int, dim: int = 32, classes: int = 3):
    centres = np.random.default_rng(0).normal(0, 1, (classes, dim))
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = centres[labels] + rng.normal(0, 1, (n, dim))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(labels)


def test_linear_probe_on_separable_features_reaches_high_f1():
    train, val, test = _blobs(120, seed=1), _blobs(60, seed=2), _blobs(60, seed=3)
    result = train_linear(train, val, test, objective="classification", num_classes=3,
                          weight_decay=1e-5, epochs=100, seed=0)   # the paper's protocol
    assert result.test["macro_f1"] > 0.95
    assert len(result.history) == 100 and result.history[result.best_epoch] == max(result.history)
    assert len(result.test["per_class_f1"]) == 3


def test_linear_regression_fits_a_linear_score_in_0_100_units():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(0, 1, (300, 8)), dtype=torch.float32)
    score = (50 + 10 * x[:, 0] - 5 * x[:, 1]).clamp(0, 100)
    parts = [(x[s], score[s]) for s in (slice(0, 150), slice(150, 225), slice(225, 300))]
    result = train_linear(*parts, objective="regression", weight_decay=1e-5, epochs=100,
                          lr=1e-2, seed=0)
    constant = float((parts[2][1] - parts[0][1].mean()).abs().mean())
    assert result.test["l1"] < 2.0 < constant     # far better than predicting the mean


def test_paper_weight_decay():
    assert paper_weight_decay("resnet18") == 1e-5 and paper_weight_decay("resnet50") == 1e-4


def test_finetune_trains_every_layer_and_selects_on_validation():
    encoder = random_encoder("resnet18", seed=0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=generator)
    images[6:] //= 4                                   # dark vs bright: learnable
    labels = torch.tensor([0] * 6 + [1] * 6)
    order = torch.tensor([0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11])
    images, labels = images[order], labels[order]
    result = finetune(encoder, (images[:8], labels[:8]), (images[8:10], labels[8:10]),
                      (images[10:], labels[10:]), objective="classification", num_classes=2,
                      weight_decay=1e-5, epochs=2, batch_size=4, seed=0)
    assert result.epochs == 2 and 0 <= result.best_epoch < 2
    assert set(result.test) >= {"macro_f1", "accuracy", "balanced_accuracy", "per_class_f1"}
    # the encoder's own weights were not touched (each run starts from the same state)
    fresh = random_encoder("resnet18", seed=0)
    assert all(torch.equal(fresh.state_dict[k], encoder.state_dict[k])
               for k in fresh.state_dict)


def test_unet_encoder_holds_the_pretrained_weights_exactly():
    pytest.importorskip("segmentation_models_pytorch")
    from downstream.segmentation import build_unet

    encoder = random_encoder("resnet18", seed=3)
    unet = build_unet(encoder)[1]
    loaded = unet.encoder.state_dict()
    assert set(loaded) == set(encoder.state_dict)
    assert all(torch.equal(loaded[k], encoder.state_dict[k]) for k in loaded)
    out = build_unet(encoder)(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert out.shape == (1, 2, 64, 64)


# --------------------------------------------------------------------------- outputs

def _folder(root: Path, per_class: int = 12) -> Path:
    """Two colour classes of small RGB tiles with noise, mixed sizes, a group in the name."""
    rng = np.random.default_rng(0)
    for c, base in enumerate(((190, 60, 60), (60, 60, 190))):
        for i in range(per_class):
            size = 24 if i % 2 else 40
            pixels = np.clip(np.array(base) + rng.normal(0, 25, (size, size, 3)), 0, 255)
            path = root / f"class{c}" / f"slide{i % 6}_tile{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "other-seed.safetensors"
    save_file(random_encoder("resnet18", seed=123).state_dict, path)
    return path


@pytest.mark.slow
def test_cli_linear_run_writes_json_table_plot_and_reuses_cached_features(tmp_path,
                                                                         checkpoint):
    data, out = _folder(tmp_path / "tiles", per_class=8), tmp_path / "out"
    argv = ["--model", "random", "--model", str(checkpoint), "--task", "linear", "--data",
            str(data), "--group-pattern", r"(slide\d)_", "--input-size", "32",
            "--fractions", "50,100", "--repeats", "2", "--epochs", "3", "--out", str(out),
            "--quiet"]
    assert main(argv) == 0
    (run_file,) = (out / "runs").glob("linear_tiles_*.json")
    run = json.loads(run_file.read_text())
    assert [m["label"] for m in run["models"]] == ["random-resnet18", "other-seed"]
    assert run["models"][1]["sha256"] == hashlib.sha256(
        checkpoint.read_bytes()).hexdigest()
    assert run["models"][0]["identity"].startswith("random:resnet18:seed=0")
    assert len(run["data_hash"]) == 64 and run["split"]["kind"] == "grouped stratified"
    assert run["environment"]["versions"]["torch"] == torch.__version__
    result = run["results"]["other-seed"]
    assert set(result["summary"]) == {"0.5", "1"} and len(result["runs"]["0.5"]) == 2
    assert result["runs"]["0.5"][0]["train_sha256"] != result["runs"]["0.5"][1]["train_sha256"]
    assert all(not t["features_cached"] for t in run["timings"].values())
    table = (out / "tables.md").read_text()
    assert "| R | Pretraining | tiles | Average |" in table
    assert "| 18 | Random |" in table and "Checkpoint (other-seed)" in table
    assert (out / "plots" / "linear_fractions.png").stat().st_size > 1000
    # the same sweep again: features come from the cache, the numbers are the same
    assert main(argv) == 0
    second = report.load_runs(out)[-1]
    assert all(t["features_cached"] for t in second["timings"].values())
    assert second["results"]["other-seed"]["summary"] == result["summary"]


def test_cli_bad_input_exits_with_a_message(tmp_path, capsys):
    assert main(["--model", "random", "--task", "linear", "--data",
                 str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "neither an existing path nor a preset" in capsys.readouterr().err
    _folder(tmp_path / "one", per_class=4)
    shutil.rmtree(tmp_path / "one" / "class1")
    assert main(["--model", "random", "--task", "linear", "--data", str(tmp_path / "one"),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "single class" in capsys.readouterr().err
    assert main(["--model", "random", "--task", "linear", "--data", str(tmp_path / "one"),
                 "--fractions", "0,50", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "percentages in (0, 100]" in capsys.readouterr().err


def _manifest(path: Path) -> Path:
    from histohub import MANIFEST_PATH

    data = json.loads(MANIFEST_PATH.read_text())
    entry = data["models"]["resnet18-ssl"]
    path.write_text(json.dumps({"schema_version": 1, "models": {"my-ssl": entry}}))
    return path


def test_record_manifest_writes_validated_metrics(tmp_path, checkpoint, capsys):
    from histohub import read_manifest

    manifest = _manifest(tmp_path / "manifest.json")
    data = _folder(tmp_path / "tiles", per_class=8)
    argv = ["--model", "random", "--model", str(checkpoint), "--task", "clustering",
            "--data", str(data), "--input-size", "32", "--repeats", "2",
            "--out", str(tmp_path / "out"), "--record-manifest", str(manifest), "--quiet"]
    assert main(argv) == 2     # a checkpoint has no manifest name: say which entry
    assert "no model 'other-seed'" in capsys.readouterr().err
    assert main(argv + ["--record-name", "my-ssl"]) == 0
    run = report.load_runs(tmp_path / "out")[-1]
    recorded = read_manifest(manifest)["my-ssl"].metrics["clustering/tiles"]
    assert recorded["metric"] == "nmi" and recorded["repeats"] == 2
    assert recorded["model_sha256"] == run["models"][1]["sha256"]
    assert recorded["mean"] == run["results"]["other-seed"]["summary"]["1"]["nmi"]["mean"]
    assert read_manifest(manifest)["my-ssl"].preprocessing.mean == (0.5, 0.5, 0.5)


def test_table_lays_out_rows_per_architecture_with_unavailable_imagenet():
    def result(mean):
        stats = {"macro_f1": {"mean": mean, "std": 0.01, "n": 5}}
        return {"metric": "macro_f1", "higher_is_better": True, "runs": {},
                "summary": {"0.05": stats, "1": stats}}

    def run(dataset, means):
        models = [{"label": "random-resnet18", "kind": "random", "arch": "resnet18"},
                  {"label": "ssl", "kind": "self-supervised", "arch": "resnet18"},
                  {"label": "random-resnet50", "kind": "random", "arch": "resnet50"}]
        return {"task": "linear", "dataset": {"name": dataset}, "models": models,
                "results": {m["label"]: result(v) for m, v in zip(models, means)},
                "skipped": [{"spec": "imagenet:resnet18", "reason": "offline"}],
                "finished_utc": dataset}

    table = report.markdown_tables([run("a", [0.5, 0.7, 0.4]), run("b", [0.3, 0.5, 0.2])])
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[:5] == [
        "| R | Pretraining | a | b | Average |",
        "| 18 | Random | 50.0 ± 1.0 | 30.0 ± 1.0 | 40.0 |",
        "|  | ImageNet | n/a | n/a | n/a |",
        "|  | Self-supervised (ssl) | 70.0 ± 1.0 | 50.0 ± 1.0 | 60.0 |",
        "| 50 | Random | 40.0 ± 1.0 | 20.0 ± 1.0 | 30.0 |"]
    assert "`imagenet:resnet18` was not run: offline" in table
    assert "| ssl | 70.0 ± 1.0 | 70.0 ± 1.0 |" in table     # by label fraction


def test_imagenet_that_cannot_be_had_is_skipped_with_the_reason(monkeypatch):
    from urllib.error import URLError

    from torchvision.models._api import WeightsEnum

    from downstream.encoders import resolve_encoders

    def offline(self, *args, **kwargs):
        raise URLError("no network here")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    encoders, skipped = resolve_encoders(["random", "imagenet"], default_arch="resnet18")
    assert [e.label for e in encoders] == ["random-resnet18"]
    assert skipped[0].spec == "imagenet:resnet18"
    assert "cannot be had here" in skipped[0].reason and "resnet18-f37072fd.pth" in skipped[0].reason
