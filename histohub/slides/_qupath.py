"""QuPath interop: GeoJSON out (tissue contours, patches, clusters) and in (regions of
interest), in level-0 pixel coordinates.

Out: ``tissue_features(grid)`` (annotations: the tissue mask's polygons with holes),
``patch_features(coords, size, names)`` (tiles, one classification per patch, e.g. its
cluster) and ``write_geojson`` (a FeatureCollection QuPath imports by drag and drop:
``objectType`` and ``classification`` with a name and an RGB colour).

In: ``load_roi(path, slide_size=..., exclude=...)`` reads a GeoJSON (a FeatureCollection,
a Feature, a bare geometry or QuPath's list of features) into a ``Roi``: the union of its
polygons less those whose class matches an ``exclude`` pattern (default ``Ignore*``), as a
shapely geometry, with a digest that makes it part of the extraction request. Bad input
(not JSON, no polygon, a self-intersecting ring, a polygon outside the slide) raises
``RoiError`` naming the file. Needs shapely and OpenCV (``pip install 'histohub[wsi]'``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histohub.files import atomic_path
from histohub.errors import RoiError, require

#: Classes whose annotations are cut out of the ROI unless ``exclude`` says otherwise.
DEFAULT_EXCLUDE = ("Ignore*",)
TISSUE_CLASS = ("Tissue", (40, 200, 60))
PATCH_CLASS = ("Patch", (30, 60, 220))
#: Cluster colours (matplotlib's tab20), by cluster id modulo 20.
CLUSTER_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
                   (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
                   (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
                   (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
                   (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229))
ROI_SUFFIXES = (".geojson", ".json")


def _feature(rings: list[list[list[float]]], object_type: str, name: str,
             colour: tuple[int, int, int], measurements: dict[str, float] | None = None
             ) -> dict[str, Any]:
    properties: dict[str, Any] = {"objectType": object_type,
                                  "classification": {"name": name, "color": list(colour)}}
    if measurements:
        properties["measurements"] = measurements
    return {"type": "Feature", "id": str(uuid.uuid4()),
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": properties}


def tissue_features(grid) -> list[dict[str, Any]]:
    """The tissue mask of a ``TileGrid`` as QuPath annotations: one polygon with holes per
    connected piece, level-0 px (each mask pixel's centre)."""
    from histohub.slides._contours import mask_polygons

    shapely = require("shapely", extra="wsi", purpose="Writing tissue contours (--geojson)")
    ds = grid.mask_downsample
    features = []
    for exterior, holes in mask_polygons(grid.mask):
        if len(exterior) < 3:
            continue
        traced = shapely.Polygon((exterior + 0.5) * ds,
                                 [(h + 0.5) * ds for h in holes if len(h) >= 3])
        # a traced border touching itself at one pixel is a self-intersecting ring: split
        for polygon in _polygons(shapely.make_valid(traced)):
            rings = [_ring(np.asarray(polygon.exterior.coords)[:-1])] + [
                _ring(np.asarray(r.coords)[:-1]) for r in polygon.interiors]
            features.append(_feature(rings, "annotation", *TISSUE_CLASS))
    return features


def _polygons(geometry) -> list:
    """The polygons of a geometry (nested collections flattened; lines, points dropped)."""
    if geometry.geom_type == "Polygon":
        return [] if geometry.is_empty else [geometry]
    return [p for g in getattr(geometry, "geoms", []) for p in _polygons(g)]


def _ring(points: np.ndarray) -> list[list[float]]:
    ring = [[round(float(x), 2), round(float(y), 2)] for x, y in points]
    return ring + ring[:1]


def patch_features(coords: np.ndarray, size: int, *, names: list[str] | None = None,
                   colours: list[tuple[int, int, int]] | None = None,
                   measurements: list[dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Patches (level-0 top-left ``coords`` ``(N, 2)``, ``size`` px squares) as QuPath tiles,
    classified ``Patch`` or by ``names[i]`` with ``colours[i]``."""
    out = []
    for i, (x, y) in enumerate(np.asarray(coords).tolist()):
        square = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        name, colour = (names[i], colours[i]) if names is not None else PATCH_CLASS
        out.append(_feature([square], "tile", name, colour,
                            measurements[i] if measurements is not None else None))
    return out


def cluster_features(coords: np.ndarray, size: int, labels: np.ndarray,
                     distances: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Patches classified ``Cluster <id>`` with one colour per cluster."""
    labels = np.asarray(labels).tolist()
    return patch_features(
        coords, size, names=[f"Cluster {k}" for k in labels],
        colours=[CLUSTER_COLOURS[k % len(CLUSTER_COLOURS)] for k in labels],
        measurements=None if distances is None else
        [{"distance": float(d)} for d in np.asarray(distances).tolist()])


def write_geojson(path: str | os.PathLike, features: list[dict[str, Any]]) -> Path:
    """A FeatureCollection written atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps({"type": "FeatureCollection", "features": features}),
                             encoding="utf-8")
    return path


# --------------------------------------------------------------------------- ROI in

@dataclass(frozen=True)
class Roi:
    """A region of interest: ``geometry`` (shapely, level-0 px), ``path`` it came from,
    ``digest`` (sha256 of the geometry and the exclusions; identifies the request)."""

    geometry: Any
    path: Path
    digest: str

    def raster(self, shape: tuple[int, int], downsample: float) -> np.ndarray:
        """bool ``shape`` mask of the region at ``downsample`` level-0 px per pixel."""
        cv2 = require("cv2", extra="wsi", purpose="Rasterising a region of interest")
        out = np.zeros(shape, np.uint8)
        for polygon in getattr(self.geometry, "geoms", [self.geometry]):
            rings = [polygon.exterior, *polygon.interiors]
            pts = [(np.asarray(r.coords) / downsample * 16).round().astype(np.int32)
                   for r in rings]
            cv2.fillPoly(out, pts, 1, shift=4)  # even-odd: the holes stay empty
        return out.astype(bool)


def find_roi(roi: str | os.PathLike, slide: str | os.PathLike) -> Path:
    """The ROI file for ``slide``: ``roi`` itself, or ``<roi>/<slide stem>.geojson|.json``."""
    roi, stem = Path(roi), Path(slide).stem
    if roi.is_file():
        return roi
    if roi.is_dir():
        for suffix in ROI_SUFFIXES:
            if (roi / f"{stem}{suffix}").is_file():
                return roi / f"{stem}{suffix}"
        raise RoiError(f"{roi}: no {stem}.geojson for the slide {Path(slide).name}; add "
                       "one, or leave the slide out")
    raise RoiError(f"--roi {roi}: no such file or folder")


def load_roi(path: str | os.PathLike, *, slide_size: tuple[int, int],
             exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> Roi:
    """Read a GeoJSON ROI for a slide of ``slide_size`` (level-0 width, height).

    Raises:
        RoiError: the file is not GeoJSON, holds no polygon, has a self-intersecting ring or
            a polygon outside the slide, or leaves nothing of the slide.
    """
    shapely = require("shapely", extra="wsi", purpose="Regions of interest (--roi)")
    from shapely.geometry import box, shape
    from shapely.validation import explain_validity

    path = Path(path)
    features = _features(path)
    slide = box(0, 0, *slide_size)
    keep, cut = [], []
    for i, feature in enumerate(features):
        try:
            geometry = shape(feature["geometry"])
        except (KeyError, TypeError, ValueError, AttributeError,
                shapely.errors.GEOSException) as error:
            raise RoiError(f"{path}: feature {i} has no valid geometry ({error})") from None
        if geometry.geom_type not in ("Polygon", "MultiPolygon"):
            continue  # points, lines: not regions
        if not geometry.is_valid:
            raise RoiError(f"{path}: feature {i} is not a valid polygon "
                           f"({explain_validity(geometry)}); fix it in QuPath")
        if not geometry.intersects(slide):
            bounds = ", ".join(f"{b:g}" for b in geometry.bounds)
            raise RoiError(f"{path}: feature {i} (bounds {bounds}) lies outside the slide "
                           f"({slide_size[0]} x {slide_size[1]} px): an ROI of another slide?")
        name = _class_name(feature)
        excluded = any(fnmatch.fnmatch(name.lower(), p.lower()) for p in exclude)
        (cut if excluded else keep).append(geometry)
    if not keep and not cut:
        raise RoiError(f"{path}: no polygon in it; draw the region as an annotation")
    region = shapely.unary_union(keep) if keep else slide
    region = region.difference(shapely.unary_union(cut)) if cut else region
    region = region.intersection(slide)
    region = shapely.MultiPolygon(_polygons(region))
    if region.is_empty:
        raise RoiError(f"{path}: the region does not overlap the slide ({slide_size[0]} x "
                       f"{slide_size[1]} px) once exclusions are cut out")
    digest = hashlib.sha256(shapely.to_wkb(shapely.normalize(region)) +
                            "\0".join(exclude).encode()).hexdigest()
    return Roi(region, path, digest)


def _features(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RoiError(f"{path}: not a readable GeoJSON file ({error})") from None
    if isinstance(data, list):  # QuPath's "export as list of features"
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        features = None
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        raise RoiError(f"{path}: not GeoJSON (expected a FeatureCollection, a Feature or a "
                       "list of features)")
    return features


def _class_name(feature: dict[str, Any]) -> str:
    properties = feature.get("properties") or {}
    classification = properties.get("classification") or {}
    name = classification.get("name") if isinstance(classification, dict) else None
    return str(name or properties.get("name") or "")
