"""Random-weight checkpoints in the upstream layouts, for the tests (one factory).

``encoder_state`` is a torchvision encoder's state dict with random weights and BatchNorm
statistics; ``upstream_state_dict`` puts it in the authors' layout (``model.resnet.`` prefix,
SimCLR projection head as ``fc.1``/``fc.3``); ``lightning_checkpoint`` wraps that as
PyTorch Lightning writes it (optimizer and scheduler state, hyper-parameter objects), to be
saved inside ``fake_lightning()`` so pickle can name Lightning's classes without
``pytorch_lightning`` installed. ``reference_encoder`` loads a state by hand into
torchvision's model: what histohub's loader must reproduce exactly.
"""

from __future__ import annotations

import argparse
import sys
import types
from contextlib import contextmanager

import torch
import torchvision


def encoder_state(arch: str = "resnet18", *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision encoder's state dict (no ``fc``) with random weights and BN statistics."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    model.fc = torch.nn.Identity()
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_()
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
    return state


def upstream_state_dict(state: dict, *, seed: int = 1) -> dict[str, torch.Tensor]:
    """The authors' layout: ``model.resnet.`` prefix plus the projection head as ``fc.*``."""
    generator = torch.Generator().manual_seed(seed)
    out = {f"model.resnet.{k}": v for k, v in state.items()}
    out.update({"model.resnet.fc.1.weight": torch.randn(512, 512, generator=generator),
                "model.resnet.fc.1.bias": torch.randn(512, generator=generator),
                "model.resnet.fc.3.weight": torch.randn(128, 512, generator=generator),
                "model.resnet.fc.3.bias": torch.randn(128, generator=generator)})
    return out


def reference_encoder(state: dict) -> torch.nn.Module:
    """torchvision's resnet18 with fc = Identity, loaded by hand, in eval mode."""
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(state)
    return model.eval()


def shapes(arch: str) -> dict[str, torch.Size]:
    """``{key: shape}`` of torchvision's ``arch`` with fc = Identity (on the meta device)."""
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    model.fc = torch.nn.Identity()
    return {k: v.shape for k, v in model.state_dict().items()}


class _AttributeDict(dict):
    """Lightning's ``AttributeDict`` as it is written: a dict whose attributes are items."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as error:
            raise AttributeError(key) from error

    def __setattr__(self, key, value):
        self[key] = value


class _ModelCheckpoint:
    """Lightning 1.0-1.4 keyed ``checkpoint["callbacks"]`` by the callback's class."""


@contextmanager
def fake_lightning():
    """``pytorch_lightning`` importable while saving only, as on the authors' machine."""
    classes = {"pytorch_lightning.utilities.parsing": ("AttributeDict", _AttributeDict),
               "pytorch_lightning.callbacks.model_checkpoint": ("ModelCheckpoint",
                                                                _ModelCheckpoint)}
    if "pytorch_lightning" in sys.modules:
        raise RuntimeError("pytorch_lightning is imported; these tests make their own stand-in")
    added = []
    saved = {cls: (cls.__module__, cls.__qualname__) for _, cls in classes.values()}
    try:
        for module, (name, cls) in classes.items():
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix not in sys.modules:
                    sys.modules[prefix] = types.ModuleType(prefix)
                    added.append(prefix)
            setattr(sys.modules[module], name, cls)
            cls.__module__, cls.__qualname__ = module, name
        yield
    finally:
        for cls, (module, qualname) in saved.items():
            cls.__module__, cls.__qualname__ = module, qualname
        for prefix in added:
            sys.modules.pop(prefix, None)
    assert "pytorch_lightning" not in sys.modules


def lightning_checkpoint(state: dict, *, callbacks: bool = False,
                         attribute_dict: bool = True) -> dict:
    """What Lightning writes: weights, optimizer and scheduler state, hyper-parameters.

    ``hyper_parameters`` is Lightning's ``AttributeDict`` (written when omegaconf was
    installed, and by later versions), or with ``attribute_dict=False`` a plain dict (what
    Lightning 1.0 wrote without omegaconf); either holds an ``argparse.Namespace``.
    """
    weights = upstream_state_dict(state)
    params = [torch.nn.Parameter(v.clone()) for k, v in weights.items() if "running" not in k
              and "num_batches" not in k][:6]
    optimizer = torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=1e-6)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)
    hyper = (_AttributeDict if attribute_dict else dict)(
        lr=0.3, batch_size=512, temperature=0.1, args=argparse.Namespace(epochs=1000, lars=True))
    checkpoint = {
        "epoch": 999, "global_step": 781000, "pytorch-lightning_version": "1.1.8",
        "state_dict": weights,
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "hparams",
        "hyper_parameters": hyper,
        "hparams": argparse.Namespace(lr=0.3, batch_size=512),
    }
    if callbacks:
        checkpoint["callbacks"] = {_ModelCheckpoint: {"best_model_score": torch.tensor(0.5),
                                                      "best_model_path": "epoch=999.ckpt"}}
    return checkpoint
