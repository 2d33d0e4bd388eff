"""Issue 23, items 4 and 5: every numeric option has an upper bound the machine can
honour, and a bad device or output path is one line (exit code 2) before anything runs."""

from __future__ import annotations

import os

import pytest

from histohub import cli
from histohub._limits import cpu_count, max_batch_size, max_workers


@pytest.fixture
def commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["histohub.cli._extract", "histohub.cli._cluster"])


@pytest.fixture
def a_slide(tmp_path):
    from wsi_factory import tissue_image, write_slide

    return write_slide(tmp_path / "s.tif", tissue_image(448, 448, [(0, 0, 448, 448)]),
                       levels=1)


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_limits_follow_the_machine():
    assert max_workers() == 2 * cpu_count() and cpu_count() >= 1
    assert 64 <= max_batch_size() < 10**9


@pytest.mark.parametrize(("option", "value"), [
    ("--workers", "100000"), ("--batch-size", "99999999999999999999"),
    ("--read-threads", "1000"), ("--max-patches", "99999999999999999999")])
def test_extract_numbers_are_bounded_before_anything(commands, a_slide, tmp_path, capsys,
                                                     option, value):
    out = tmp_path / "out"
    code = cli.main(["extract", str(a_slide), "--out", str(out), "--quiet", option, value])
    _one_line_error(capsys, code, f"{option} {value}: must be", "in [")
    assert not out.exists()


@pytest.mark.parametrize(("option", "value"), [
    ("--threads", "100000"), ("--max-memory", "1e9"), ("--batch-size", "99999999999999999999"),
    ("--passes", "100000000")])
def test_cluster_numbers_are_bounded(commands, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as caught:
        cli.main(["cluster", str(tmp_path / "x.h5"), "--k", "2", "--out", str(tmp_path / "o"),
                  option, value])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and option in err and "at most" in err, err
    assert not (tmp_path / "o").exists()


def test_out_an_existing_file_is_one_line(commands, a_slide, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    code = cli.main(["extract", str(a_slide), "--out", str(out), "--quiet"])
    _one_line_error(capsys, code, "--out", "not a folder")
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "cpu:x"])
def test_bad_device_is_one_line_before_out_is_made(commands, a_slide, tmp_path, capsys,
                                                   device):
    out = tmp_path / "out"
    code = cli.main(["extract", str(a_slide), "--out", str(out), "--quiet", "--device", device])
    _one_line_error(capsys, code, f"--device {device}")
    assert not out.exists()


def test_cuda_without_a_gpu_is_one_line(commands, a_slide, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code = cli.main(["extract", str(a_slide), "--out", str(tmp_path / "o"), "--quiet",
                     "--device", "cuda"])
    _one_line_error(capsys, code, "--device cuda")
    assert os.path.exists(a_slide)
