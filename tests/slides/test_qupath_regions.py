"""GeoJSON out and in (QuPath), --roi and --coords: round trips, restriction, identity,
and one-line errors naming the file with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cv2")
pytest.importorskip("shapely")

from histohub.errors import RoiError  # noqa: E402
from histohub.slides._qupath import load_roi, patch_features, tissue_features, write_geojson  # noqa
from histohub.slides import open_slide, tile_grid  # noqa: E402
from wsi_factory import tissue_image, write_slide  # noqa: E402


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    image = tissue_image(896, 1344, [(0, 0, 600, 896), (800, 200, 500, 500)], seed=3)
    image[350:550, 200:400] = 242  # a hole (100 um across) in the first section
    return write_slide(tmp_path_factory.mktemp("s") / "s.tif", image, levels=1)


def _geojson(path: Path, polygons: list, names: list[str] | None = None) -> Path:
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
                 "properties": {"classification": {"name": n}} if n else {}}
                for rings, n in zip(polygons, names or [None] * len(polygons))]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_written_geojson_loads_back_as_roi_giving_the_same_patches(slide_path, tmp_path):
    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, target_mpp=0.5, patch_size=112, method="contours")
        features = tissue_features(grid) + patch_features(grid.coords, grid.patch_size_level0)
        path = write_geojson(tmp_path / "s.geojson", features)
        data = json.loads(path.read_text())
        kinds = {f["properties"]["objectType"] for f in data["features"]}
        assert kinds == {"annotation", "tile"} and len(grid) > 5
        tissue = [f for f in data["features"] if f["properties"]["objectType"] == "annotation"]
        assert any(len(f["geometry"]["coordinates"]) > 1 for f in tissue)  # the hole
        roi = load_roi(path, slide_size=slide.dimensions)
        again = tile_grid(slide, target_mpp=0.5, patch_size=112, method="contours", roi=roi)
    assert np.array_equal(again.coords, grid.coords) and again.roi == roi.digest


def test_roi_restricts_and_excludes(slide_path, tmp_path):
    square = [[[0, 0], [600, 0], [600, 896], [0, 896], [0, 0]]]
    ignore = [[[0, 0], [600, 0], [600, 300], [0, 300], [0, 0]]]
    path = _geojson(tmp_path / "r.geojson", [square, ignore], [None, "Ignore region"])
    with open_slide(slide_path) as slide:
        full = tile_grid(slide, target_mpp=0.5, patch_size=112, method="contours")
        roi = load_roi(path, slide_size=slide.dimensions)
        part = tile_grid(slide, target_mpp=0.5, patch_size=112, method="contours", roi=roi)
    assert 0 < len(part) < len(full)
    assert (part.coords[:, 0] + 112 <= 600 + 56).all() and (part.coords[:, 1] >= 300 - 56).all()


@pytest.mark.parametrize("content, match", [
    ("{not json", "not a readable GeoJSON"),
    (json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]},
        "properties": {}}]}), "not a valid polygon"),
    (json.dumps({"type": "Polygon", "coordinates": [[[5000, 5000], [5100, 5000],
                                                      [5100, 5100], [5000, 5000]]]}),
     "outside the slide"),
    (json.dumps({"type": "FeatureCollection", "features": []}), "no polygon"),
])
def test_bad_roi_is_one_line_naming_the_file(tmp_path, content, match):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(RoiError, match=match) as error:
        load_roi(path, slide_size=(1000, 800))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def _clam_h5(path: Path, coords: np.ndarray, *, patch_size: int, **attrs) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        dataset = f.create_dataset("coords", data=coords)
        dataset.attrs.update({"patch_size": patch_size, "patch_level": 0,
                              "downsample": np.array([1.0, 1.0]), **attrs})
    return path


def test_coords_from_a_clam_file_are_reproduced(slide_path, tmp_path):
    from histohub.slides._coords import coords_grid, read_coords

    coords = np.array([[0, 0], [256, 128], [900, 300]], np.int64)
    path = _clam_h5(tmp_path / "s.h5", coords, patch_size=256)
    with open_slide(slide_path) as slide:
        got, size0, _ = read_coords(path, slide_size=slide.dimensions)
        grid = coords_grid(slide, got, size0, patch_size=224, method="contours")
    assert np.array_equal(grid.coords, coords) and grid.patch_size_level0 == 256
    assert grid.read_size == 256 and grid.patch_size == 224


@pytest.mark.parametrize("coords, attrs, match", [
    ([[0, 0], [1300, 0]], {}, "reach outside the slide"),
    ([[0, 0]], {"level0_width": 5000, "level0_height": 4000}, "another slide"),
])
def test_coords_of_another_slide_are_refused(tmp_path, coords, attrs, match):
    from histohub.slides._coords import read_coords

    path = _clam_h5(tmp_path / "c.h5", np.array(coords), patch_size=256, **attrs)
    with pytest.raises(RoiError, match=match) as error:
        read_coords(path, slide_size=(1344, 896))
    assert str(path) in str(error.value)


def _run(argv: list[str]) -> int:
    import histohub.cli as cli

    return cli.main(["extract", *argv])


def test_cli_geojson_roi_coords_round_trips(slide_path, resnet18_file, tmp_path, capsys):
    import h5py

    common = ["--model", str(resnet18_file), "--batch-size", "8", "--quiet",
              "--compile", "off"]
    first = tmp_path / "a"
    assert _run([str(slide_path), "--out", str(first), "--geojson", *common]) == 0
    geojson = first / "s.geojson"
    coords = h5py.File(first / "s.h5")["coords"][:]
    # the ROI is part of the request: the file made without it is not taken as done
    assert _run([str(slide_path), "--out", str(first), "--roi", str(geojson), *common]) == 1
    assert "another request" in capsys.readouterr().out
    roi_dir = tmp_path / "rois"
    roi_dir.mkdir()
    (roi_dir / "s.geojson").write_text(geojson.read_text())
    second = tmp_path / "b"
    assert _run([str(slide_path), "--out", str(second), "--roi", str(roi_dir), *common]) == 0
    assert np.array_equal(h5py.File(second / "s.h5")["coords"][:], coords)
    # --coords from histohub's own (CLAM layout) file gives exactly its patches
    third = tmp_path / "c"
    assert _run([str(slide_path), "--out", str(third), "--coords", str(first / "s.h5"),
                 *common]) == 0
    assert np.array_equal(h5py.File(third / "s.h5")["coords"][:], coords)


def test_cli_bad_roi_exits_2_and_writes_nothing(slide_path, resnet18_file, tmp_path, capsys):
    bad = tmp_path / "bad.geojson"
    bad.write_text("[1, 2")
    out = tmp_path / "out"
    assert _run([str(slide_path), "--out", str(out), "--roi", str(bad), "--model",
                 str(resnet18_file), "--quiet"]) == 2
    assert str(bad) in capsys.readouterr().err and not out.exists()
