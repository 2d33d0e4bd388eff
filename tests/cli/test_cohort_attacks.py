"""Issue 23, item 7: cohorts under stress. Whatever happens to one slide or one process,
nothing is lost, nothing is written twice, each failed slide is one line, and the summary
comes at the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from child_patches import patched_env
from histohub import cli
from histohub.featurefile._layout import read_features
from wsi_factory import tissue_image, write_slide

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"slides: (\d+) extracted(?: \((\d+) resumed\))?, (\d+) already done, "
                     r"(\d+) failed")


@pytest.fixture
def commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["histohub.cli._extract"])


def _tiny(path: Path, seed: int) -> Path:
    return write_slide(path, tissue_image(224, 224, [(0, 0, 224, 224)], seed=seed), levels=1)


def _counts(text: str) -> tuple[int, int, int, int]:
    match = SUMMARY.search(text)
    assert match, text
    return tuple(int(g or 0) for g in match.groups())


@pytest.mark.parametrize("shard", ["2/2", "-1/2", "a/b", "0/0", "1/2/3",
                                   "0/99999999999999999999"])
def test_malformed_shards_are_one_line(commands, tmp_path, capsys, shard):
    _tiny(tmp_path / "s.tif", 0)
    code = cli.main(["extract", str(tmp_path / "s.tif"), "--out", str(tmp_path / "o"),
                     "--quiet", f"--shard={shard}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--shard" in err, err
    assert not (tmp_path / "o").exists()


def test_overlapping_shards_write_each_slide_once(commands, tmp_path, resnet18_file, capsys):
    """0/2 then 0/3 overlap on slide 0 (and 1/2 with 0/3 on slide 3): found done, not redone."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        _tiny(folder / f"s{i}.tif", i)
    out = tmp_path / "out"
    base = ["extract", str(folder), "--model", str(resnet18_file), "--out", str(out),
            "--batch-size", "4", "--quiet"]
    assert cli.main([*base, "--shard", "0/2"]) == 0
    assert _counts(capsys.readouterr().out) == (3, 0, 0, 0)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert cli.main([*base, "--shard", "0/3"]) == 0  # s0 and s3: s0 done
    assert _counts(capsys.readouterr().out) == (1, 0, 1, 0)
    assert cli.main(base) == 0
    assert _counts(capsys.readouterr().out) == (2, 0, 4, 0)
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in stamps.items())
    assert sorted(p.name for p in out.glob("*.h5")) == [f"s{i}.h5" for i in range(6)]
    assert not list(out.glob("*.partial")) and not list(out.glob(".*.lock"))


def test_a_slide_replaced_between_runs_is_kept_and_reported(commands, tmp_path, resnet18_file,
                                                            capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        _tiny(folder / f"s{i}.tif", i)
    out = tmp_path / "out"
    argv = ["extract", str(folder), "--model", str(resnet18_file), "--out", str(out),
            "--batch-size", "4", "--quiet"]
    assert cli.main(argv) == 0
    before = read_features(out / "s1.h5")["features"]
    capsys.readouterr()
    _tiny(folder / "s1.tif", 99)  # another slide under the same name
    assert cli.main(argv) == 1
    report = capsys.readouterr().out
    assert _counts(report) == (0, 0, 2, 1)
    failed = [line for line in report.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "s1.tif" in failed[0] and "--overwrite" in failed[0]
    assert np.array_equal(read_features(out / "s1.h5")["features"], before)  # kept


#: In every process of the command: slides named ``crash*`` kill whoever reads their
#: patches (SIGSEGV): the reader thread's process, or a DataLoader worker.
_CRASHING_READER = """
import os, signal
import histohub.slides._reader as wsi
read = wsi.Slide.read_region
def read_region(self, location, level, size):
    if self.path.name.startswith("crash") and size[0] >= 200:
        os.kill(os.getpid(), signal.SIGSEGV)
    return read(self, location, level, size)
wsi.Slide.read_region = read_region
"""


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_slide_that_kills_its_reader_costs_that_slide(tmp_path, resnet18_file, workers):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        _tiny(folder / (f"crash{i}.tif" if i == 1 else f"s{i}.tif"), i)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "histohub", "extract", str(folder), "--model",
         str(resnet18_file), "--out", str(out), "--batch-size", "4", "--quiet",
         "--workers", workers],
        cwd=ROOT, env=patched_env(tmp_path / "site", _CRASHING_READER), capture_output=True,
        text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert _counts(done.stdout) == (3, 0, 0, 1), done.stdout + done.stderr[-3000:]
    failed = [line for line in done.stdout.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "crash1.tif" in failed[0] and "died" in failed[0]
    assert done.stdout.rstrip().splitlines()[-1] == failed[0]  # the summary ends the output
    assert sorted(p.name for p in out.glob("*.h5")) == ["s0.h5", "s2.h5", "s3.h5"]


@pytest.mark.slow
def test_500_slides_with_one_unreadable_in_the_middle(commands, tmp_path, resnet18_file,
                                                      capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    first = _tiny(folder / "s000.tif", 0)
    for i in range(1, 500):
        if i == 250:
            (folder / "s250.tif").write_bytes(b"II*\x00" + os.urandom(4000))
        else:
            os.link(first, folder / f"s{i:03d}.tif")
    out = tmp_path / "out"
    code = cli.main(["extract", str(folder), "--model", str(resnet18_file), "--out", str(out),
                     "--batch-size", "64", "--quiet"])
    report = capsys.readouterr().out
    assert code == 1
    assert _counts(report) == (499, 0, 0, 1), report
    failed = [line for line in report.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "s250.tif" in failed[0]
    assert len(list(out.glob("*.h5"))) == 499
    assert not list(out.glob("*.partial")) and not list(out.glob(".*.lock"))
