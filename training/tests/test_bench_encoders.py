"""``random`` and ``imagenet`` baselines are fed at the scale of the models they are
compared with: a model trained at 64 px is benchmarked against random weights at 64 px."""

from __future__ import annotations

from dataclasses import replace

import pytest

from histohub_training.downstream import encoders
from histohub_training.downstream.protocols import Protocol
from histohub.hub import Preprocessing

TRAINED_SIZES = {"mine64": 64, "other64": 64, "mine96": 96}


@pytest.fixture
def trained(monkeypatch):
    """Manifest names standing for trained ResNet18s with their own input size and mpp."""
    def load(spec: str, *, progress: bool) -> encoders.Encoder:
        size = TRAINED_SIZES[spec]
        pre = Preprocessing(input_size=size, mean=(0.6, 0.5, 0.7), std=(0.2, 0.2, 0.2),
                            mpp=0.495 * 150 / size)
        return replace(encoders.random_encoder("resnet18", seed=size), label=spec,
                       kind="self-supervised", identity=f"sha-{spec}", preprocessing=pre)

    def imagenet(arch: str, *, progress: bool = True) -> encoders.Encoder:
        pre = Preprocessing(input_size=224, mean=encoders.IMAGENET_MEAN,
                            std=encoders.IMAGENET_STD)
        return replace(encoders.random_encoder(arch, seed=1), label=f"imagenet-{arch}",
                       kind="imagenet", identity="sha-imagenet", preprocessing=pre)

    monkeypatch.setattr(encoders, "_from_pretrained", load)
    monkeypatch.setattr(encoders, "imagenet_encoder", imagenet)


def _by_label(specs: list[str]) -> dict[str, encoders.Encoder]:
    resolved, skipped = encoders.resolve_encoders(specs, progress=False)
    assert not skipped
    return {e.label: e for e in resolved}


def test_baselines_take_the_input_size_of_the_model_they_are_compared_with(trained):
    resolved = _by_label(["mine64", "random", "imagenet"])
    assert list(resolved) == ["mine64", "random-resnet18", "imagenet-resnet18"]
    random, imagenet = resolved["random-resnet18"], resolved["imagenet-resnet18"]
    assert random.preprocessing.input_size == imagenet.preprocessing.input_size == 64
    assert random.preprocessing.mpp == pytest.approx(0.495 * 150 / 64)
    # the size follows; each baseline keeps its own normalisation and weights
    assert random.preprocessing.mean == (0.5, 0.5, 0.5)
    assert imagenet.preprocessing.mean == encoders.IMAGENET_MEAN
    assert random.identity == encoders.random_encoder("resnet18", seed=0).identity
    assert Protocol(task="linear").size(random) == 64
    assert Protocol(task="linear", input_size=32).size(random) == 32
    assert random.describe()["preprocessing"]["input_size"] == 64


def test_baselines_alone_keep_the_papers_224_px():
    (random,), _ = encoders.resolve_encoders(["random"], progress=False)
    assert random.label == "random-resnet18"
    assert random.preprocessing == encoders.paper_preprocessing()
    assert random.preprocessing.input_size == 224


def test_one_baseline_per_input_size_when_the_models_differ(trained):
    resolved = _by_label(["mine64", "other64", "mine96", "random"])
    assert list(resolved) == ["mine64", "other64", "mine96", "random-resnet18-64px",
                              "random-resnet18-96px"]
    assert resolved["random-resnet18-64px"].preprocessing.input_size == 64
    assert resolved["random-resnet18-96px"].preprocessing.input_size == 96
    assert "mine64" in resolved["random-resnet18-64px"].preprocessing.mpp_note


def test_imagenet_that_cannot_be_had_is_skipped_with_the_reason(monkeypatch):
    from urllib.error import URLError

    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise URLError("no network here")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    resolved, skipped = encoders.resolve_encoders(["random", "imagenet"],
                                                  default_arch="resnet18")
    assert [e.label for e in resolved] == ["random-resnet18"]
    assert skipped[0].spec == "imagenet:resnet18"
    assert "cannot be had here" in skipped[0].reason and "resnet18-f37072fd.pth" in skipped[0].reason


def test_a_file_named_like_a_model_is_benchmarked_as_the_checkpoint(other_seed, tmp_path,
                                                                      monkeypatch):
    """histohub's one rule (``describe_model``): an existing file is the file, even when its
    name is a model's. Before, the benchmark labelled it that model (self-supervised)."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(other_seed, tmp_path / "resnet18-ssl-mini")
    (encoder,), _ = encoders.resolve_encoders(["resnet18-ssl-mini"], progress=False)
    assert encoder.kind == "checkpoint"
    assert encoder.identity == encoders.sha256_file(tmp_path / "resnet18-ssl-mini")
