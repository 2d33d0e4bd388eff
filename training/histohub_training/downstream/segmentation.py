"""Segmentation: a UNet whose encoder is the pretrained ResNet (segmentation-models-pytorch).

Paper, section 4.2: "For segmentation tasks, we use a UNet architecture which contains a
pretrained encoder and a randomly initialized decoder" (Yakubovskiy 2020, i.e.
segmentation-models-pytorch); macro F1 over pixels, test metric at the best validation
epoch. smp's ResNet encoders are torchvision ResNets without ``fc``, so a histohub
encoder's state dict loads into ``unet.encoder`` strictly, key for key.
"""

from __future__ import annotations

import torch
from torch import nn

from histohub.errors import require

from .encoders import Encoder
from .finetune import Normalise, _batches, augment_batch
from .metrics import confusion_counts, metrics_from_confusion
from .selection import BestEpoch, RunResult


def build_unet(encoder: Encoder, *, classes: int = 2) -> nn.Module:
    """``Normalise`` + ``smp.Unet(arch)`` with ``encoder``'s weights in its encoder:
    uint8 ``(B, 3, S, S)`` -> logits ``(B, classes, S, S)``, ``S`` divisible by 32."""
    smp = require("segmentation_models_pytorch", extra="training",
                  purpose="The segmentation benchmark (a UNet with the pretrained encoder)")
    unet = smp.Unet(encoder.arch, encoder_weights=None, classes=classes)
    state = {k: v for k, v in encoder.state_dict.items() if not k.startswith("fc.")}
    unet.encoder.load_state_dict(state, strict=True)
    return nn.Sequential(Normalise(encoder.preprocessing.mean, encoder.preprocessing.std), unet)


def train_segmentation(encoder: Encoder, train: tuple[torch.Tensor, torch.Tensor],
                       val: tuple[torch.Tensor, torch.Tensor],
                       test: tuple[torch.Tensor, torch.Tensor], *, classes: int = 2,
                       weight_decay: float, epochs: int = 100, batch_size: int = 16,
                       lr: float = 1e-3, seed: int = 0, device: str = "cpu",
                       augment: bool = False) -> RunResult:
    """Train the UNet on ``(uint8 images (N, 3, S, S), int64 masks (N, S, S))`` pairs."""
    size = train[0].shape[-1]
    if size % 32:
        raise ValueError(f"UNet inputs must be a multiple of 32 px, got {size}; "
                         "pass --input-size 224 (or 64, 96, ...)")
    torch.manual_seed(seed)   # the decoder's initialisation
    generator = torch.Generator().manual_seed(seed)
    model = build_unet(encoder, classes=classes).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    images, masks = train
    tracker = BestEpoch("segmentation")
    for epoch in range(epochs):
        model.train()
        for batch in _batches(torch.randperm(len(images), generator=generator), batch_size):
            pair = torch.cat([images[batch].float(), masks[batch].unsqueeze(1).float()], dim=1)
            if augment:   # the same flips and turns for image and mask
                pair = augment_batch(pair, generator)
            x, y = pair[:, :3].to(device), pair[:, 3].long().to(device)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        tracker.update(epoch, evaluate_masks(model, *val, classes=classes, device=device), model)
    model.load_state_dict(tracker.state)
    test_metrics = evaluate_masks(model, *test, classes=classes, device=device)
    return RunResult(tracker.epoch, epochs, tracker.val, test_metrics, tracker.history)


@torch.inference_mode()
def evaluate_masks(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, *, classes: int,
                   device: str = "cpu", batch_size: int = 16) -> dict:
    """Pixel metrics (macro F1 over classes, accuracy, per-class F1) over a whole part."""
    model.eval()
    confusion = torch.zeros((classes, classes), dtype=torch.int64)
    for i in range(0, len(images), batch_size):
        predicted = model(images[i:i + batch_size].to(device)).argmax(dim=1).cpu()
        confusion += confusion_counts(masks[i:i + batch_size], predicted, classes)
    return metrics_from_confusion(confusion)
