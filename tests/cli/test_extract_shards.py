"""``histohub extract`` in several processes on one output folder: job-array shards and
torchrun ranks split the slides, every slide is written exactly once, a crashed process's
slide is resumed by the next run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from histohub.featurefile._layout import partial_path, read_features
from histohub.cli._extract import launcher_rank, parse_shard, pick_device, shard_slides
from wsi_factory import tissue_image, write_slide

SUMMARY = re.compile(r"slides: (\d+) extracted(?: \((\d+) resumed\))?, (\d+) already done, "
                     r"(\d+) failed")


@pytest.fixture(scope="module")
def cohort_folder(tmp_path_factory, cmu_slide) -> Path:
    """Seven small synthetic slides at 0.5 um/px and the shared CMU slide (0.499 um/px)."""
    folder = tmp_path_factory.mktemp("cohort_folder")
    for i in range(7):
        write_slide(folder / f"s{i}.tif",
                    tissue_image(448, 448 + 224 * (i % 3), [(0, 0, 448 + 224 * (i % 3), 448)],
                                 seed=i), mpp=0.5, levels=1)
    shutil.copy(cmu_slide, folder / "cmu.svs")
    return folder


def extract(cohort_folder: Path, resnet18_file: Path, out: Path, *extra: str,
            env: dict[str, str] | None = None) -> subprocess.Popen:
    """``histohub extract`` in a new process (stdout: its summary)."""
    command = [sys.executable, "-m", "histohub", "extract", str(cohort_folder), "--model",
               str(resnet18_file), "--out", str(out), "--device", "cpu", "--batch-size", "4",
               "--max-patches", "6", "--quiet", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                            **(env or {})})


def finish(process: subprocess.Popen) -> tuple[int, int, int, int]:
    """(extracted, resumed, already done, failed) from a finished process's summary."""
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    match = SUMMARY.search(out)
    assert match, out
    return tuple(int(g or 0) for g in match.groups())


def outputs(out: Path) -> dict[str, int]:
    """Finished feature files -> rows; and nothing unfinished is left."""
    assert not list(out.glob("*.partial"))
    return {p.stem: read_features(p)["attrs"]["n_patches"] for p in out.glob("*.h5")}


def test_shard_split_is_deterministic_and_complete(tmp_path):
    slides = [tmp_path / f"{name}.svs" for name in "dbeacf"]
    shares = [shard_slides(slides, i, 4) for i in range(4)]
    assert shares[0] == [tmp_path / "a.svs", tmp_path / "e.svs"]  # sorted, i % 4 == 0
    assert shard_slides(list(reversed(slides)), 0, 4) == shares[0]  # input order is irrelevant
    assert sorted(p for share in shares for p in share) == sorted(slides)  # none twice or missed
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) == (0, 1)


@pytest.mark.parametrize("text", ["3/3", "1", "-1/2", "a/b", "1/0"])
def test_bad_shard_is_one_line(text):
    from histohub.errors import OptionError

    with pytest.raises(OptionError, match=r"--shard .*: must be I/N with 0 <= I < N"):
        parse_shard(text)


def test_launcher_environment(monkeypatch):
    from histohub.errors import OptionError

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_rank() == (0, 1, None)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launcher_rank() == (3, 4, 1)
    assert pick_device("cuda", 1) == "cuda:1" and pick_device("cuda:0", 1) == "cuda:0"
    assert pick_device("cpu", 1) == "cpu"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(OptionError, match="RANK=4 and WORLD_SIZE=4"):
        launcher_rank()


@pytest.mark.slow
def test_two_processes_write_every_slide_once(cohort_folder, resnet18_file, tmp_path):
    """--shard 0/2 and 1/2 side by side: each slide is extracted by exactly one process;
    then the same split as torchrun ranks finds everything done."""
    slides = sorted(cohort_folder.iterdir())
    out = tmp_path / "shards"
    runs = [extract(cohort_folder, resnet18_file, out, "--shard", f"{i}/2") for i in range(2)]
    counts = [finish(run) for run in runs]
    assert [c[0] for c in counts] == [4, 4]  # 8 slides: 4 each, extracted once in all
    assert sum(c[2] + c[3] for c in counts) == 0
    written = outputs(out)
    assert sorted(written) == sorted(p.stem for p in slides)
    assert all(4 <= rows <= 6 for rows in written.values())  # 4-8 tissue patches, at most 6

    again = [extract(cohort_folder, resnet18_file, out, env={"RANK": str(i), "WORLD_SIZE": "2",
                                                       "LOCAL_RANK": str(i)}) for i in range(2)]
    assert [finish(run) for run in again] == [(0, 0, 4, 0), (0, 0, 4, 0)]


@pytest.mark.slow
def test_concurrent_runs_without_shards_never_write_a_slide_twice(cohort_folder, resnet18_file,
                                                                     tmp_path):
    """Two unsharded runs on one folder at once: the output locks let one write each slide;
    the other finds it done, or busy (reported as failed, exit code 1); a rerun finds all
    done."""
    out = tmp_path / "both"
    runs = [extract(cohort_folder, resnet18_file, out) for _ in range(2)]
    results = []
    for run in runs:
        stdout, err = run.communicate(timeout=600)
        assert run.returncode in (0, 1), err
        results.append(tuple(int(g or 0) for g in SUMMARY.search(stdout).groups()))
    n = len(list(cohort_folder.iterdir()))
    assert sum(r[0] for r in results) == n  # each slide by one of them, never twice
    assert all(r[0] + r[2] + r[3] == n for r in results)  # busy ones are reported
    assert finish(extract(cohort_folder, resnet18_file, out)) == (0, 0, n, 0)
    assert len(outputs(out)) == n


@pytest.mark.slow
def test_a_killed_process_slide_is_resumed_by_the_next_run(tmp_path, resnet18_file):
    """kill -9 one process mid-slide; the next run of its shard resumes that slide's partial
    file, and the other shard's slides are found done."""
    import h5py

    cohort_folder = tmp_path / "in"
    cohort_folder.mkdir()
    for i in range(2):  # 6 x 4 = 24 patches each, 12 batches: killed midway
        write_slide(cohort_folder / f"big{i}.tif", tissue_image(896, 1344, [(0, 0, 1344, 896)],
                                                         seed=i), mpp=0.5, levels=2)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "histohub", "extract", str(cohort_folder), "--model",
               str(resnet18_file), "--out", str(out), "--device", "cpu", "--batch-size", "2",
               "--quiet"]
    victim = subprocess.Popen([*command, "--shard", "0/2"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    partial = partial_path(out / "big0.h5")
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and victim.poll() is None:
            try:
                with h5py.File(partial, "r", locking=False) as f:
                    if int(f.attrs["next_index"]) >= 4:
                        break
            except (OSError, KeyError):
                pass
            time.sleep(0.05)
        assert victim.poll() is None, "the process ended before it could be killed"
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.wait()
    assert partial.exists() and not (out / "big0.h5").exists()
    other = subprocess.run([*command, "--shard", "1/2"], capture_output=True, text=True)
    assert SUMMARY.search(other.stdout).groups()[0] == "1"
    rerun = subprocess.run(command, capture_output=True, text=True)  # unsharded: both
    assert rerun.returncode == 0, rerun.stderr
    extracted, resumed, done, failed = (int(g or 0) for g in SUMMARY.search(rerun.stdout).groups())
    assert (extracted, resumed, done, failed) == (1, 1, 1, 0)
    assert outputs(out) == {"big0": 24, "big1": 24}
