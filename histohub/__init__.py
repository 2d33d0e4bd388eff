"""histohub: histopathology encoders in one verified line, and features from whole slides.

>>> import histohub
>>> model = histohub.load_pretrained("resnet18-ssl")     # eval mode, (B, 3, 224, 224) -> (B, 512)
>>> transform = histohub.get_transform("resnet18-ssl")   # mean = std = 0.5, 224 px

The public API is this module's ``__all__``; each wing (``histohub.hub``,
``histohub.slides``, ``histohub.featurefile``, ``histohub.cluster``) states more public
names in its own ``__all__`` (``docs/api.md``). Every module whose name starts with an
underscore is private. Names that need torch, torchvision or the slide libraries are
imported on first use, so ``import histohub`` (and ``histohub list``) reads the manifest
without loading torch.
"""

from __future__ import annotations

from histohub._lazy import lazy_exports
from histohub._version import __version__
from histohub.errors import HistohubError
from histohub.hub import get_entry, list_models

_LAZY = {
    "PatchBatch": "histohub.slides._patches",
    "Tiling": "histohub.slides._jobs",
    "cohort_patches": "histohub.slides._patches",
    "extract_features": "histohub._features",
    "extract_slide": "histohub.slides._extract",
    "get_transform": "histohub.hub._transforms",
    "load_pretrained": "histohub.hub._pretrained",
    "open_slide": "histohub.slides._reader",
    "slide_patches": "histohub.slides._patches",
    "tissue_mask": "histohub.slides._tissue",
}

__all__ = ["HistohubError", "__version__", "get_entry", "list_models", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
