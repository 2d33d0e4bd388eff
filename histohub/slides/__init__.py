"""The slides wing: whole-slide images -> tissue patches -> feature files.

Opening a slide and reading its levels (``_reader``; JPEG tiles decoded straight from the
file in ``_jpeg_tiles``), the tissue mask (``_tissue``), the grid of patches with tissue
(``_tiling``), a grid's patches read in batches by reader threads or DataLoader workers
(``_batches``), a cohort as one stream (``_stream``), patches for a model histohub does not
run (``_patches``), a preview of the grid (``_preview``), and extraction into feature files
(``_jobs``, ``_outputs``, ``_extract``). The public names are this package's ``__all__``;
the modules are private.
"""

from __future__ import annotations

from histohub._lazy import lazy_exports

_LAZY = {
    "MASK_METHODS": "histohub.slides._tissue",
    "PatchBatch": "histohub.slides._patches",
    "PatchReader": "histohub.slides._reader",
    "SLIDE_EXTENSIONS": "histohub.slides._reader",
    "Slide": "histohub.slides._reader",
    "SlideExtractor": "histohub.slides._extract",
    "SlideJob": "histohub.slides._jobs",
    "SlideResult": "histohub.slides._jobs",
    "TileGrid": "histohub.slides._tiling",
    "Tiling": "histohub.slides._jobs",
    "cohort_patches": "histohub.slides._patches",
    "extract_slide": "histohub.slides._extract",
    "open_slide": "histohub.slides._reader",
    "slide_patches": "histohub.slides._patches",
    "tile_grid": "histohub.slides._tiling",
    "tissue_mask": "histohub.slides._tissue",
}

__all__ = [*_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
