"""What restricts a slide's patches beyond its tissue: the ROI (``--roi``) and the
coordinates of another tool (``--coords``), found for one slide and checked against it
(``slide_regions``): one place for the extractor and for the command line's checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histohub.errors import OptionError
from histohub.slides._jobs import Tiling


@dataclass(frozen=True)
class SlideRegions:
    """``roi``: a ``histohub.slides._qupath.Roi`` or None; ``coords`` (N, 2) level-0 and
    ``size0`` (their patch side) from a coordinates file, or None; ``coords_digest``."""

    roi: object = None
    coords: np.ndarray | None = None
    size0: int = 0
    coords_digest: str = ""

    @property
    def roi_digest(self) -> str:
        return self.roi.digest if self.roi is not None else ""


def slide_regions(tiling: Tiling, slide) -> SlideRegions:
    """The ROI and coordinates ``tiling`` names for the open ``slide`` (``_reader.Slide``).

    Raises:
        RoiError: an ROI or coordinates file that is malformed or not this slide's.
        OptionError: both ``roi`` and ``coords`` given.
    """
    if tiling.roi is not None and tiling.coords is not None:
        raise OptionError("--roi and --coords cannot be combined: --coords extracts exactly "
                          "the patches it lists")
    if tiling.roi is not None:
        from histohub.slides._qupath import find_roi, load_roi

        path = find_roi(tiling.roi, slide.path)
        return SlideRegions(roi=load_roi(path, slide_size=tuple(slide.dimensions),
                                         exclude=tuple(tiling.roi_exclude)))
    if tiling.coords is not None:
        from histohub.slides._coords import find_coords, read_coords

        coords, size0, digest = read_coords(find_coords(tiling.coords, slide.path),
                                            slide_size=tuple(slide.dimensions))
        return SlideRegions(coords=coords, size0=size0, coords_digest=digest)
    return SlideRegions()
