"""Smoke test of benchmarks/bench_slides.py (and its bench_slides_data, bench_slides_arms):
the slides it builds, and one tiny round."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import bench_slides_arms as arms  # benchmarks/ is on pytest's path
import bench_slides_data as data
import numpy as np
import pytest

pytest.importorskip("openslide")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_slides.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_slides", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for path in (data.KATHER, data.CMU, data.TCGA):
        if not path.exists():
            pytest.skip(f"real data not available at {path}")
    return module


@pytest.fixture(scope="module")
def slides(bench, tmp_path_factory):
    """The --quick slides: a 1800 x 1500 px 'large' slide and a cohort of 3."""
    return data.build_slides(tmp_path_factory.mktemp("bench"), quick=True, log=lambda _: None)


@pytest.fixture(scope="module")
def weights(bench, tmp_path_factory):
    return arms.write_weights(tmp_path_factory.mktemp("weights"))


def test_built_slide_reads_like_a_scan(bench, slides):
    import tifffile

    import histohub

    large = slides["large"][0]
    with histohub.open_slide(large["path"]) as slide:
        assert slide.mpp == pytest.approx(data.MPP)  # from the TIFF resolution tag
        assert slide.dimensions == data.SIZES["quick"]["large"]
        assert slide.level_count == 3
        image = slide.read_region((0, 0), 1, slide.level_dimensions[1])
    tissue = histohub.tissue_mask(image).mean()
    assert 0.3 < tissue < 0.95  # tissue sections on glass
    with tifffile.TiffFile(large["path"]) as tif:
        page = tif.pages[0]
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert (page.tilewidth, page.tilelength) == (256, 256)
    assert large["patches"] == data.count_patches(Path(large["path"])) > 10


def test_cohort_and_shared_slides(bench, slides):
    sizes = [histohub_dimensions(s["path"]) for s in slides["cohort"]]
    assert len(sizes) == 3 and len(set(sizes)) == 3
    assert all(s["patches"] > 0 for s in slides["cohort"])
    assert len(data.SIZES["full"]["cohort"]) >= 20
    assert slides["cmu"][0]["patches"] == 30  # as PERFORMANCE.md reports
    assert slides["tcga"][0]["mpp"] == data.TCGA_MPP


def histohub_dimensions(path: str) -> tuple[int, int]:
    import histohub

    with histohub.open_slide(path) as slide:
        return slide.dimensions


def test_compose_is_deterministic(bench):
    pool = [np.full((data.CELL, data.CELL, 3), value, np.uint8) for value in (90, 160)]
    first = data.compose_slide(400, 300, pool, seed=3)
    assert first.shape == (300, 400, 3)
    np.testing.assert_array_equal(first, data.compose_slide(400, 300, pool, seed=3))
    assert (first == 90).all(axis=2).any() and (first > 230).all(axis=2).any()


def test_weights_are_the_seeded_random_resnet18(bench, weights):
    import torch

    import histohub

    torch.manual_seed(0)
    expected = histohub.load_pretrained("resnet18-ssl", pretrained=False, progress=False)
    loaded = arms.build_model(weights)
    assert not loaded.training
    for (name, a), b in zip(expected.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_one_round_of_every_arm(bench, slides, weights, tmp_path, capsys):
    smallest = [min(slides["cohort"], key=lambda s: s["patches"])]
    runs = {arm: [arms.run_arm(arm, smallest, tmp_path / arm, weights)]
            for arm in ("histohub", "cli", "eager", "naive")}
    patches = {arm: r[0]["patches"] for arm, r in runs.items()}
    assert set(patches.values()) == {smallest[0]["patches"]}, patches  # the same patches
    for arm, arm_runs in runs.items():
        assert arm_runs[0]["seconds"] > 0 and arm_runs[0]["peak_rss_mib"] > 0
        if arm != "cli":
            assert 0 < arm_runs[0]["first_s"] <= arm_runs[0]["seconds"]
    table = bench.model_table("cohort", runs)
    assert len(table) == 5 and "x best" in table[0]
    assert "1.00" in table[3]  # the model alone is its own best
    targets = bench.check_targets("cohort", runs)
    assert [line.split(" >=")[0] for line in targets] == ["cohort: histohub", "cohort: cli"]
    assert 0 < runs["naive"][0]["load_s"] < 60
    targets = bench.check_targets("cmu", runs)   # the CLI is also held to loop + its load
    assert [line.split(":")[1].split(" >=")[0].strip() for line in targets] == [
        "histohub", "cli", "cli"] and "from its model file" in targets[2]

    # the reader arms (extract_slide, slide_patches) through the worker entry point, as the
    # benchmark spawns them
    reader_arms = bench.reader_arms(arms.reader_options(), patches=True)
    results = {}
    for arm in (reader_arms[0], next(a for a in reader_arms if a.startswith("patches:"))):
        job = {"arm": arm, "slides": smallest, "out": str(tmp_path / "reader"),
               "weights": str(weights)}
        bench.main(["--worker", json.dumps(job)])
        results[arm] = [json.loads(capsys.readouterr().out.strip().splitlines()[-1])]
        assert results[arm][0]["patches"] == smallest[0]["patches"]
        assert results[arm][0]["cpu_s"] > 0
    two = sorted(slides["cohort"], key=lambda s: s["patches"])[:2]
    cohort = arms.run_arm("small22:num_workers:1", two, tmp_path / "cohort", weights)
    assert cohort["patches"] == sum(s["patches"] for s in two)
    assert 0 < cohort["first_s"] < cohort["seconds"]
    results["small22:num_workers:1"] = [cohort]
    lines, _ = bench.reader_table(results)
    assert len(lines) == 4 and "extract_slide (no-op model) read_threads=1" in lines[1]
    assert "slide_patches read_threads=1" in lines[2]
    assert "cohort_patches, the 22-slide cohort num_workers=1" in lines[3]


def test_cpu_seconds_count_less_than_a_clock_tick():
    """A reader arm over a small slide uses about 12 ms of CPU: os.times' 10 ms ticks read
    that as 0 (CI did), getrusage does not."""
    start = arms.cpu_seconds()
    until = time.perf_counter() + 0.002
    while time.perf_counter() < until:
        pass
    assert 0 < arms.cpu_seconds() - start < 1


def test_the_reader_cohort_is_copies_made_once_and_whole(bench, tmp_path):
    source = tmp_path / "large.tif"
    source.write_bytes(b"tiles" * 1000)
    slide = {"path": str(source), "mpp": None, "patches": 7}
    cohort = bench.copies(slide, tmp_path, 3)
    assert cohort[0] == slide and [c["patches"] for c in cohort] == [7, 7, 7]
    paths = [Path(c["path"]) for c in cohort]
    assert len(set(paths)) == 3 and all(p.read_bytes() == source.read_bytes() for p in paths)
    paths[2].write_bytes(b"cut sh")  # a copy left short by a killed run is made again
    made = paths[1].stat().st_mtime_ns
    bench.copies(slide, tmp_path, 3)
    assert paths[2].read_bytes() == source.read_bytes() and paths[1].stat().st_mtime_ns == made
    assert not list(tmp_path.rglob("*.partial"))


def test_naive_and_openslide_arms_read_through_openslide_only(bench, slides, weights, tmp_path,
                                                              monkeypatch):
    """The naive loop and the reader's OpenSlide arm decode no JPEG tile themselves."""
    import os

    import histohub.slides._jpeg_tiles as jpeg_tiles

    def no_tiles(self, index):
        raise AssertionError("a JPEG tile decoded by histohub")

    monkeypatch.setattr(jpeg_tiles.JpegTileLevel, "_decode", no_tiles)
    monkeypatch.delenv("HISTOHUB_JPEG_TILES", raising=False)
    smallest = [min(slides["cohort"], key=lambda s: s["patches"])]
    runs = {arm: [arms.run_arm(arm, smallest, tmp_path / arm.replace(":", "-"), weights)]
            for arm in ("naive", "reader:openslide:1")}
    assert "HISTOHUB_JPEG_TILES" not in os.environ  # restored
    assert {r[0]["patches"] for r in runs.values()} == {smallest[0]["patches"]}
    monkeypatch.undo()
    runs["reader:read_threads:1"] = [arms.run_arm("reader:read_threads:1", smallest,
                                                  tmp_path / "default", weights)]
    del runs["naive"]
    lines, _ = bench.reader_table(runs)
    assert "decoded by histohub vs every pixel through OpenSlide" in lines[-1]


def test_reader_ratios_and_targets(bench):
    """2 vs 1 per kind and option; the decoding processes are the ceiling, not a target."""
    def run(seconds, **first):
        return [{"patches": 100, "seconds": seconds, "cpu_s": 1.0, "peak_rss_mib": 2.0,
                 "rss_start_mib": 1.0, **first}]

    runs = {f"{kind}:{option}:{n}": run(1.0 / (n * speedup))
            for kind, option, speedup in [("reader", "read_threads", 0.6),
                                          ("reader", "decode", 0.85)] for n in (1, 2)}
    # slide_patches: the first batch (10 patches) after 0.5 s, then 90 in 1 s (one
    # reader) or 0.6 s (two)
    runs["patches:read_threads:1"] = run(1.5, first_s=0.5, first_patches=10)
    runs["patches:read_threads:2"] = run(1.1, first_s=0.5, first_patches=10)
    lines, ratios = bench.reader_table(runs)
    assert ratios == pytest.approx({"reader:read_threads": 2, "reader:decode": 2,
                                    "patches:read_threads": 1.5 / 1.1,
                                    "patches:read_threads:reading": 1 / 0.6})
    table = "\n".join(lines)
    assert "slide_patches read_threads=2" in table and "90.0" in table and "150.0" in table
    summary, targets = bench.reader_targets({**ratios, "reader:read_threads": 1.2})
    assert summary == ["the machine's ceiling (processes decoding, nothing else): 2 vs 1 x2.00"
                       "; extract_slide (no-op model) read_threads reaches 20% of its gain"
                       "; slide_patches read_threads reaches 36% of its gain"
                       "; slide_patches read_threads from its first batch reaches 67% of "
                       "its gain"]
    assert targets == [
        "reader: extract_slide (no-op model) read_threads 2 vs 1 >= 1.7: x1.20 NOT MET "
        "(ceiling here x2.00)",
        "reader: slide_patches read_threads 2 vs 1 >= 1.7: x1.36 NOT MET (ceiling here x2.00)",
        "reader: slide_patches read_threads from its first batch 2 vs 1 >= 1.7: x1.67 "
        "NOT MET (ceiling here x2.00)"]


def test_an_arm_starts_without_what_a_killed_run_left(bench, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "000.h5.partial").write_bytes(b"left by a killed benchmark")
    seen = []

    class Done:
        returncode, stderr, stdout = 0, "", '{"patches": 1, "seconds": 1.0}'

    monkeypatch.setattr(bench.subprocess, "run",
                        lambda *a, **k: seen.append(out.exists()) or Done())
    assert bench.spawn_arm("histohub", [], out, tmp_path / "w.safetensors")["patches"] == 1
    assert seen == [False]
