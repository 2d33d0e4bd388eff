"""Segmentation: the UNet's encoder is the benchmarked ResNet, weights exactly as given."""

from __future__ import annotations

import pytest
import torch

from histohub_training.downstream.encoders import random_encoder


def test_unet_encoder_holds_the_pretrained_weights_exactly():
    pytest.importorskip("segmentation_models_pytorch")
    from histohub_training.downstream.segmentation import build_unet

    encoder = random_encoder("resnet18", seed=3)
    unet = build_unet(encoder)[1]
    loaded = unet.encoder.state_dict()
    assert set(loaded) == set(encoder.state_dict)
    assert all(torch.equal(loaded[k], encoder.state_dict[k]) for k in loaded)
    out = build_unet(encoder)(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert out.shape == (1, 2, 64, 64)
