"""Fine-tuning (all layers): every layer trains, the model is chosen on validation, and the
encoder's own weights stay as they were (each run starts from the same state)."""

from __future__ import annotations

import torch

from histohub_training.downstream.encoders import random_encoder
from histohub_training.downstream.finetune import finetune


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
