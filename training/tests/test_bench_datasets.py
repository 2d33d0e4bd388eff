"""Benchmark datasets: folders, CSV files, image/mask pairs, groups, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histohub_training.downstream import datasets as ds
from histohub_training.downstream.images import load_images, load_masks

Image = pytest.importorskip("PIL.Image")


def _image(path: Path, colour, size=(20, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_image_folder_classes_from_top_folder_at_any_depth_and_mixed_sizes(tmp_path):
    _image(tmp_path / "tumor" / "slide1" / "a.png", (200, 0, 0), (30, 20))
    _image(tmp_path / "tumor" / "b.tif", (200, 0, 0), (50, 50))
    _image(tmp_path / "stroma" / "slide2" / "deep" / "c.jpg", (0, 0, 200), (16, 64))
    (tmp_path / "stroma" / "notes.txt").write_text("not an image")
    data = ds.load_dataset(tmp_path)
    assert data.classes == ("stroma", "tumor")
    assert data.relative_paths() == ["stroma/slide2/deep/c.jpg", "tumor/b.tif",
                                     "tumor/slide1/a.png"]
    assert data.labels.tolist() == [0, 1, 1]
    images = load_images(data.paths, 32)     # mixed sizes are resized, not a crash
    assert images.shape == (3, 3, 32, 32) and images.dtype.is_floating_point is False
    assert images[1, 0].float().mean() > 150 and images[0, 2].float().mean() > 150
    assert len(data.content_hash()) == 64


def test_parent_folder_labels_and_group_pattern(tmp_path):
    for patient in ("p1", "p2"):
        for label in ("0", "1"):
            _image(tmp_path / patient / label / f"{patient}_{label}.png", (9, 9, 9))
    data = ds.load_dataset(tmp_path, label_from="parent", group_pattern=r"^([^/]+)/")
    assert data.classes == ("0", "1")
    assert data.groups.tolist() == ["p1", "p1", "p2", "p2"]
    with pytest.raises(ds.DatasetError, match="does not match"):
        ds.load_dataset(tmp_path, group_pattern=r"CRC-Prim-HE-\d+")


def test_image_mask_pairs_by_stem_and_coverage_scores(tmp_path):
    for name, cls in (("x1", "A"), ("x2", "A"), ("x3", "B")):
        _image(tmp_path / cls / "image" / f"{name}.png", (100, 100, 100), (8, 8))
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:2] = 255          # 25% covered
    mask[2, :4] = 128       # the threshold counts: + 4 pixels = 31.25%
    mask[3] = 127           # just below it
    (tmp_path / "A" / "label").mkdir()
    Image.fromarray(mask).save(tmp_path / "A" / "label" / "x1.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "A" / "label" / "x2.png")
    data = ds.load_dataset(tmp_path)      # label/ folders are masks, never images
    assert len(data) == 3 and data.classes == ("A", "B")
    assert [m.name if m else None for m in data.masks] == ["x1.png", "x2.png", None]
    with pytest.warns(UserWarning, match="1 image"):
        scored = ds.for_regression(data)
    assert scored.scores.tolist() == pytest.approx([31.25, 100.0])
    masks = load_masks(scored.masks, 8)
    assert masks.shape == (2, 8, 8) and int(masks[0].sum()) == 20
    with pytest.raises(ds.DatasetError, match="no masks"):
        ds.for_segmentation(ds.load_dataset(tmp_path / "B"))


def test_csv_labels_scores_groups_and_relative_paths(tmp_path):
    _image(tmp_path / "imgs" / "a.png", (1, 2, 3))
    _image(tmp_path / "imgs" / "b.png", (1, 2, 3))
    (tmp_path / "data.csv").write_text("path,label,score,group\nimgs/a.png,tumor,12.5,p1\n"
                                       "imgs/b.png,normal,80,p2\n")
    data = ds.load_dataset(tmp_path / "data.csv")
    assert data.name == "data" and data.classes == ("normal", "tumor")
    assert data.labels.tolist() == [1, 0] and data.scores.tolist() == [12.5, 80.0]
    assert data.groups.tolist() == ["p1", "p2"] and data.paths[0].is_file()


@pytest.mark.parametrize("text,match", [
    ("file,class\nimgs/a.png,tumor\n", r"columns \['file', 'class'\]; expected 'path'"),
    ("path,score\nimgs/a.png,140\n", r"percentages in \[0, 100\]"),
    ("path,score\nimgs/a.png,high\n", "must hold numbers"),
    ("path,label\n", "no rows"),
])
def test_csv_with_wrong_columns_or_values_is_a_clear_error(tmp_path, text, match):
    _image(tmp_path / "imgs" / "a.png", (1, 2, 3))
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(ds.DatasetError, match=match):
        ds.load_dataset(tmp_path / "bad.csv")


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a preset"):
        ds.load_dataset(tmp_path / "nowhere")
    (tmp_path / "list.csv").write_text("path,label\ngone.png,a\n")
    with pytest.raises(FileNotFoundError, match="1 file.*relative to the CSV"):
        ds.load_dataset(tmp_path / "list.csv")
    with pytest.raises(FileNotFoundError, match="HISTOHUB_BENCH_DATA"):
        ds.load_dataset("kather2016", root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ds.DatasetError, match="No images"):
        ds.load_dataset(tmp_path / "empty")


def test_single_class_and_unreadable_images_are_clear_errors(tmp_path):
    _image(tmp_path / "only" / "a.png", (1, 1, 1))
    with pytest.raises(ds.DatasetError, match="single class"):
        ds.for_classification(ds.load_dataset(tmp_path))
    (tmp_path / "only" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ds.DatasetError, match="Cannot read image"):
        load_images(ds.load_dataset(tmp_path).paths, 8)


def test_presets_on_the_shared_data(shared_data):
    kather = ds.load_dataset("kather2016", root=shared_data)
    assert len(kather) == 240 and len(kather.classes) == 8
    assert set(kather.groups.tolist()) == {f"CRC-Prim-HE-{i:02d}" for i in range(1, 11)}
    ebhi = ds.load_dataset("ebhi-seg", root=shared_data)
    assert len(ebhi) == 575 and len(ebhi.classes) == 6
    assert sum(m is None for m in ebhi.masks) == 2
    # the case id: GT2012149, GTGT2012149 and GTxc2012149 are one case
    assert ebhi.groups[[i for i, p in enumerate(ebhi.paths)
                        if p.name.startswith("GTGT2012149")][0]] == "2012149"
    idc = ds.load_dataset("idc-breast", root=shared_data)
    assert idc.classes == ("0", "1") and len(set(idc.groups.tolist())) == 279
