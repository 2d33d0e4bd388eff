"""The feature-file wing: the HDF5 layout histohub writes (CLAM/TRIDENT's, plus attributes).

``features`` (N, D) float32 and ``coords`` (N, 2) int64 level-0 top-left corners, one row
per patch, with the model, slide and request in the file's attributes (``_layout``), and
the writer that fills a file batch by batch, resumes it and survives a full disk
(``_writer``). The public names are this package's ``__all__``; the modules are private.
"""

from __future__ import annotations

from histohub._lazy import lazy_exports

_LAZY = {
    "FORMAT": "histohub.featurefile._layout",
    "FORMAT_VERSION": "histohub.featurefile._layout",
    "is_complete": "histohub.featurefile._layout",
    "read_features": "histohub.featurefile._layout",
    "read_header": "histohub.featurefile._layout",
}

__all__ = [*_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
