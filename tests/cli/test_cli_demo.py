"""``histohub demo-slide``: the README's main job runs on a fresh machine, on this slide."""

from __future__ import annotations

import pytest

pytest.importorskip("openslide")
h5py = pytest.importorskip("h5py")

from histohub.cli import main  # noqa: E402


def test_the_readmes_main_job_runs_on_the_demo_slide(tmp_path, capsys):
    slide = tmp_path / "demo.tiff"
    assert main(["demo-slide", str(slide)]) == 0
    assert capsys.readouterr().out.strip() == str(slide)
    out = tmp_path / "features"
    assert main(["extract", str(slide), "--model", "resnet18-ssl-mini", "--out", str(out),
                 "--preview"]) == 0
    with h5py.File(out / "demo.h5") as f:
        features, coords = f["features"][:], f["coords"][:]
    assert features.shape[1] == 512 and len(features) == len(coords) > 50
    assert (out / "demo.png").stat().st_size > 0 or list(out.glob("demo*.png"))


def test_an_existing_file_is_never_overwritten(tmp_path, capsys):
    slide = tmp_path / "mine.svs"
    slide.write_bytes(b"my slide")
    assert main(["demo-slide", str(slide)]) == 2
    assert "exists" in capsys.readouterr().err
    assert slide.read_bytes() == b"my slide"
