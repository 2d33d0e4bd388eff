"""Benchmark: histohub vs the model alone vs a naive loop, on slides made of real tissue.

    python benchmarks/bench_slides.py [--rounds 3] [--only large cohort shared reader]
                                      [--work DIR] [--quick] [--arms histohub cli ...]

Issue 11, item 1 (and item 3's reader scaling). Not a test: timings depend on the machine.

What it builds, once, into ``--work DIR`` (kept and reused) or a temporary folder: slides
that read like a scanner's files, i.e. tiled pyramidal TIFFs (256 px JPEG tiles at
quality 90, 3 levels, a resolution tag of 0.5 um/px that OpenSlide reports as the mpp),
whose tissue sections (irregular blobs on noisy glass) are a mosaic of real H&E: the
Kather 2016 tiles (150 px at 0.495 um/px) and 150 px cells cut from the two shared slides,
each turned and flipped at random. Only cells with at least half tissue under histohub's
HSV rule enter the mosaic.

- large:  one 15,000 x 12,500 px slide, over 2,000 tissue patches of 224 px at 0.5 um/px;
- cohort: 22 slides of 1,100-3,800 px a side (about 10 to 150 tissue patches each);
- shared: the two slides of ../shared/data/slides, each on its own (CMU-1-Small-Region,
  JPEG SVS at 0.499 um/px, 30 patches; the TCGA cut-down, JPEG 2000 without mpp: 0.5 given).

What it measures, for each, with the same random ResNet18 weights (``torch.manual_seed(0)``,
``histohub.load_pretrained("resnet18-ssl", pretrained=False)``, saved as safetensors and
loaded by every arm with ``histohub.load_pretrained(path)``) and the same patches (224 px at
0.5 um/px, >= 50% tissue), each arm in a fresh process, rounds interleaved (A, B, C, ...,
A, B, C, ...), medians of the rounds:

- histohub:  the library's defaults in one process with one model: ``extract_slide`` for
             one slide, one ``SlideExtractor``'s ``extract_many`` for several (HDF5
             outputs written);
- cli:       ``histohub extract SLIDES --model WEIGHTS --out DIR`` with its defaults, run
             in-process through the ``histohub`` console-script entry point (what a user
             runs; it may share work across slides that separate ``extract_slide`` calls
             cannot), timed from the call (its model load included, imports done);
- eager:     the model alone on the patches already in memory: eager, ``inference_mode``,
             channels_last, batch 32, uint8 -> normalised per batch, one warm-up batch;
- compiled:  the same with ``torch.compile`` (inductor, tail batch padded); compile time
             (first call) reported apart, not in patches/s;
- naive:     a CLAM-style loop in the main process: tissue mask of a thumbnail
             (``histohub.tissue_mask``), the grid, ``read_region`` per patch, the eager
             channels_last model on batches of 32; timed, like the histohub arm, from a
             loaded model (so its channels_last conversion counts, as histohub's does).

All arms run with glibc told to keep freed memory (``histohub.tune_allocator``, which
``extract_slide`` applies itself). Printed per arm: patches/s, the ratio to the best
model-alone arm and to the naive loop (per round, then the median), peak RSS (``VmHWM`` of
the arm's process, children not included; in brackets its rise over the RSS once torch and
the model are loaded; the model-alone arms hold every patch in memory), and the time from
the start of the job to the first feature (end-to-end arms: from before the first slide is
opened; histohub's is when the model's first forward pass returns, seen by a forward hook,
not measured for the CLI; model-alone arms: from the timed loop's start).

reader: the reader pipeline alone. ``extract_slide`` on the large slide with the model
replaced by a no-op module returning zeros ``(B, 512)``, with 1 and 2 readers for each
reader option ``extract_slide`` offers (looked up in its signature when the benchmark
runs: ``read_threads``, ``num_workers``), in patches/s, patches/s per reader and patches
per CPU-second (the process and its reaped children), and the 2-vs-1 ratio; beside them
the machine's ceiling: 1 and 2 processes decoding disjoint shares of the patches and doing
nothing else (on the 2-core development VM two such processes reached only about 1.55x
one: decoding does not scale 2x there, whatever the pipeline).

A matrix-multiply probe (fp32 1024^3, GFLOP/s) before and after each part tells whether
the machine was in a slow spell (about 170 GFLOP/s at 2 threads when quiet, 72-84 in one).
Targets (issue 11), checked for both histohub arms: >= 0.90x the best model-alone arm on the
large slide and on the cohort; on the 30-patch slide at least the naive loop; 2 readers
>= 1.7x one.

Uses only histohub's public API, so it runs across refactors of the library.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from _probes import memory_mib, probe

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
KATHER = SHARED / "kather2016-tiles"
CMU = SHARED / "slides" / "cmu_small_region.svs"
TCGA = SHARED / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
#: The TCGA cut-down records no microns per pixel; it is a 20x scan.
TCGA_MPP = 0.5

#: Microns per pixel of the built slides, and of the patches every arm cuts.
MPP = 0.5
PATCH = 224
MIN_FOREGROUND = 0.5
#: Batch of the model-alone and naive arms (histohub uses its own default).
BATCH = 32
#: Side of a mosaic cell: a Kather 2016 tile.
CELL = 150
#: Fraction of a built slide's area (inside a glass margin) covered by tissue sections.
COVERAGE = 0.72
GLASS = (243, 241, 245)
#: Bump when the slides change, so cached ones are rebuilt.
BUILDER_VERSION = 1
LARGE_MIN_PATCHES = 2000

SIZES: dict[str, dict[str, Any]] = {
    "full": {"large": (15000, 12500),
             "cohort": [(round(s * a), round(s / a)) for s, a in zip(
                 np.geomspace(1100, 3800, 22), [1.0, 1.2, 0.85, 1.35, 0.75] * 5)]},
    "quick": {"large": (1800, 1500), "cohort": [(700, 800), (1000, 900), (1300, 1000)]},
}

MODEL_ARMS = ("histohub", "cli", "eager", "compiled", "naive")
HISTOHUB_ARMS = ("histohub", "cli")
ARM_LABELS = {
    "histohub": "histohub library (defaults)",
    "cli": "histohub extract (CLI defaults)",
    "eager": "model alone, eager, channels_last, b32",
    "compiled": "model alone, torch.compile, channels_last, b32",
    "naive": "naive loop: mask, read_region, model, b32",
}
#: extract_slide options that set how many readers run, in the order they are measured.
READER_OPTIONS = ("read_threads", "num_workers")


# --------------------------------------------------------------------------- real tissue

def tissue_pool() -> list[np.ndarray]:
    """150 px RGB uint8 cells of real H&E at about 0.5 um/px, each >= 50% tissue.

    Sources: the Kather 2016 tiles (150 px, 0.495 um/px) and cells cut from the two shared
    slides (CMU-1-Small-Region at 0.499 um/px; the TCGA slide, taken as 0.5 um/px).
    """
    from PIL import Image

    import histohub

    candidates = [np.asarray(Image.open(path).convert("RGB"))
                  for path in sorted(KATHER.glob("*/*")) if path.is_file()]
    for path in (CMU, TCGA):
        with histohub.open_slide(path) as slide:
            image = slide.read_region((0, 0), 0, slide.dimensions)
        height, width = image.shape[:2]
        candidates += [image[y:y + CELL, x:x + CELL] for y in range(0, height - CELL + 1, CELL)
                       for x in range(0, width - CELL + 1, CELL)]
    pool = [np.ascontiguousarray(c) for c in candidates
            if c.shape == (CELL, CELL, 3) and histohub.tissue_mask(c).mean() >= MIN_FOREGROUND]
    if len(pool) < 50:
        raise SystemExit(f"only {len(pool)} tissue cells found in {KATHER} and {CMU.parent}; "
                         "the benchmark needs the shared data")
    return pool


def _sections(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Irregular tissue sections: bool ``(height, width)``, ``COVERAGE`` of the area inside
    a glass margin. A smooth random field (features about 1,000 px) thresholded."""
    from PIL import Image

    step = 16  # level-0 px per field pixel
    fw, fh = -(-width // step), -(-height // step)
    coarse = rng.random((fh * step // 512 + 2, fw * step // 512 + 2))
    field = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize(
        (fw, fh), Image.Resampling.BICUBIC), np.float64)
    margin = max(2, min(fw, fh) // 20)
    ys, xs = np.mgrid[0:fh, 0:fw]
    border = np.minimum.reduce([xs, ys, fw - 1 - xs, fh - 1 - ys]) / margin
    inside = border >= 1
    field = np.where(inside, field, -np.inf)
    threshold = np.quantile(field[inside], 1 - COVERAGE)
    small = Image.fromarray(((field > threshold) * 255).astype(np.uint8))
    return np.asarray(small.resize((width, height), Image.Resampling.BILINEAR)) > 127


def compose_slide(width: int, height: int, pool: Sequence[np.ndarray], *, seed: int
                  ) -> np.ndarray:
    """RGB uint8 ``(height, width, 3)``: tissue sections filled with ``pool`` cells (each
    turned by a random multiple of 90 degrees and maybe flipped) on noisy glass."""
    rng = np.random.default_rng(seed)
    sections = _sections(width, height, rng)
    glass = [np.clip(np.asarray(GLASS) + rng.normal(0, 1.5, (CELL, CELL, 3)), 0, 255)
             .astype(np.uint8) for _ in range(8)]
    image = np.empty((height, width, 3), np.uint8)
    for y in range(0, height, CELL):
        for x in range(0, width, CELL):
            h, w = min(CELL, height - y), min(CELL, width - x)
            background = glass[rng.integers(len(glass))][:h, :w]
            inside = sections[y:y + h, x:x + w]
            if not inside.any():
                image[y:y + h, x:x + w] = background
                continue
            cell = np.rot90(pool[rng.integers(len(pool))], int(rng.integers(4)))
            cell = cell[:, ::-1] if rng.integers(2) else cell
            image[y:y + h, x:x + w] = np.where(inside[..., None], cell[:h, :w], background)
    return image


def write_pyramid(path: Path, image: np.ndarray) -> Path:
    """A tiled JPEG pyramidal TIFF (3 levels) with a 0.5 um/px resolution tag, written to a
    temporary name then renamed."""
    from wsi_factory import write_slide

    partial = path.with_name(path.name + ".partial")
    write_slide(partial, image, mpp=MPP, levels=3, tile=256, quality=90)
    partial.replace(path)
    return path


# --------------------------------------------------------------------------- slides to measure

def naive_grid(slide: Any, mpp: float | None) -> tuple[np.ndarray, int]:
    """CLAM-style tiling: level-0 ``(x, y)`` int64 ``(N, 2)`` of the non-overlapping patches
    of ``PATCH`` px at ``MPP`` with >= ``MIN_FOREGROUND`` tissue, and their level-0 side.

    The tissue mask (``histohub.tissue_mask``, the paper's HSV rule) is taken on a thumbnail
    of about 32 px per patch side (at most 4,096 px a side), as histohub tiles.
    """
    import histohub

    mpp = mpp if mpp is not None else slide.mpp
    size0 = max(1, round(PATCH * MPP / mpp))
    width, height = slide.dimensions
    downsample = max(1.0, size0 / 32, max(width, height) / 4096)
    mask = histohub.tissue_mask(slide.thumbnail(downsample))
    ys, xs = np.mgrid[0:height // size0, 0:width // size0]
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64) * size0
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    x0, y0 = (np.clip(np.round(coords[:, i] / downsample).astype(np.int64), 0, mask.shape[1 - i])
              for i in (0, 1))
    x1, y1 = (np.clip(np.round((coords[:, i] + size0) / downsample).astype(np.int64), 0,
                      mask.shape[1 - i]) for i in (0, 1))
    x1 = np.maximum(x1, x0 + 1).clip(max=mask.shape[1])
    y1 = np.maximum(y1, y0 + 1).clip(max=mask.shape[0])
    tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    fraction = tissue / np.maximum((x1 - x0) * (y1 - y0), 1)
    return coords[fraction >= MIN_FOREGROUND], size0


def count_patches(path: Path, mpp: float | None = None) -> int:
    import histohub

    with histohub.open_slide(path) as slide:
        return len(naive_grid(slide, mpp)[0])


def build_slides(work: Path, *, quick: bool, log: Callable[[str], None] = print
                 ) -> dict[str, list[dict[str, Any]]]:
    """Build (or find in ``work``) the large slide and the cohort -> scenario name -> slides
    (``{"path", "mpp", "patches"}``), with the shared slides added."""
    sizes = SIZES["quick" if quick else "full"]
    key = hashlib.sha256(json.dumps([BUILDER_VERSION, sizes, COVERAGE]).encode()).hexdigest()[:10]
    folder = work / f"slides-{'quick' if quick else 'full'}-{key}"
    index = folder / "slides.json"
    if index.is_file():
        built = json.loads(index.read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        log(f"building the benchmark slides in {folder} (once; --work keeps them) ...")
        started = time.perf_counter()
        pool = tissue_pool()
        log(f"  {len(pool)} real tissue cells of {CELL} px (Kather 2016 + the shared slides)")
        built = {"large": [], "cohort": []}
        jobs = [("large", "large.tif", sizes["large"])]
        jobs += [("cohort", f"cohort-{i:02d}.tif", size) for i, size in enumerate(sizes["cohort"])]
        for seed, (group, name, (width, height)) in enumerate(jobs):
            path = write_pyramid(folder / name, compose_slide(width, height, pool, seed=seed))
            patches = count_patches(path)
            built[group].append({"path": str(path), "mpp": None, "patches": patches})
            log(f"  {name}: {width} x {height} px, {patches} tissue patches, "
                f"{path.stat().st_size / 2**20:.1f} MiB ({time.perf_counter() - started:.0f} s)")
        index.write_text(json.dumps(built, indent=1))
    if not quick and built["large"][0]["patches"] < LARGE_MIN_PATCHES:
        raise SystemExit(f"the large slide has {built['large'][0]['patches']} tissue patches, "
                         f"fewer than {LARGE_MIN_PATCHES}: enlarge SIZES['full']['large']")
    built["cmu"] = [{"path": str(CMU), "mpp": None, "patches": count_patches(CMU)}]
    built["tcga"] = [{"path": str(TCGA), "mpp": TCGA_MPP,
                      "patches": count_patches(TCGA, TCGA_MPP)}]
    return built


# --------------------------------------------------------------------------- arms (in-process)

def write_weights(folder: Path) -> Path:
    """The random ResNet18 every arm uses (seed 0), saved once as safetensors."""
    import torch
    from safetensors.torch import save_file

    import histohub

    path = folder / "resnet18-random-seed0.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        model = histohub.load_pretrained("resnet18-ssl", pretrained=False, progress=False)
        partial = path.with_name(path.name + ".partial")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(partial))
        partial.replace(path)
    return path


def build_model(weights: Path) -> Any:
    import histohub

    return histohub.load_pretrained(weights, progress=False).eval()


def _tune_allocator() -> None:
    import histohub

    tune = getattr(histohub, "tune_allocator", None)
    if tune is not None:
        tune()


def _forward(model: Any, *, compiled: bool) -> Callable[[Any], Any]:
    """uint8 ``(B, S, S, 3)`` -> features ``(B, D)``: normalised with the model's
    preprocessing, channels_last, ``inference_mode`` (compiled: tail padded to ``BATCH``)."""
    import torch

    pre = model.histohub_info.preprocessing
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255
    model = model.to(memory_format=torch.channels_last)
    run = torch.compile(model, dynamic=False) if compiled else model

    def forward(pixels: Any) -> Any:
        n = len(pixels)
        if compiled and n < BATCH:
            pixels = torch.cat([pixels, pixels.new_zeros((BATCH - n, *pixels.shape[1:]))])
        batch = ((pixels.permute(0, 3, 1, 2).float() - mean) / std).contiguous(
            memory_format=torch.channels_last)
        with torch.inference_mode():
            return run(batch)[:n]
    return forward


def _read_patch(slide: Any, x: int, y: int, size0: int) -> np.ndarray:
    from PIL import Image

    region = slide.read_region((int(x), int(y)), 0, (size0, size0))
    if size0 != PATCH:
        region = np.asarray(Image.fromarray(region).resize((PATCH, PATCH),
                                                           Image.Resampling.BILINEAR))
    return region


def arm_histohub(slides: list[dict[str, Any]], out: Path, weights: Path) -> dict[str, Any]:
    """histohub's library defaults, one model in this process: ``extract_slide`` for one
    slide; for several, one ``SlideExtractor`` and ``extract_many`` (what the library offers
    for a cohort, and what ``histohub extract`` runs)."""
    import torch

    import histohub

    model = build_model(weights)
    first: list[float] = []

    @torch.compiler.disable
    def on_forward(module: Any, inputs: Any, output: Any) -> None:
        if not first:
            first.append(time.perf_counter())

    model.register_forward_hook(on_forward)
    rss = memory_mib("VmRSS")
    mpps = {slide["mpp"] for slide in slides}
    start = time.perf_counter()
    if len(slides) == 1:
        options = {"mpp": slides[0]["mpp"]} if slides[0]["mpp"] is not None else {}
        patches = histohub.extract_slide(model, slides[0]["path"], out / "000.h5",
                                         **options).n_patches
    elif len(mpps) == 1:
        jobs = [(slide["path"], out / f"{i:03d}.h5") for i, slide in enumerate(slides)]
        with histohub.SlideExtractor(model) as extractor:
            results = list(extractor.extract_many(jobs, tiling=histohub.Tiling(mpp=mpps.pop())))
        patches = sum(result.n_patches for result in results)
    else:
        raise ValueError("one mpp for all the slides of a cohort run")
    seconds = time.perf_counter() - start
    return {"patches": patches, "seconds": seconds,
            "first_s": first[0] - start if first else None, "rss_start_mib": rss}


def _cli_main() -> Callable[[list[str]], int]:
    """The function behind the ``histohub`` command (its console-script entry point)."""
    from importlib.metadata import entry_points

    (entry,) = entry_points(group="console_scripts", name="histohub")
    return entry.load()


def arm_cli(slides: list[dict[str, Any]], out: Path, weights: Path) -> dict[str, Any]:
    """``histohub extract`` over ``slides`` with its defaults, in this process."""
    import h5py

    mpps = {slide["mpp"] for slide in slides}
    if len(mpps) != 1:
        raise ValueError("one --mpp for all the slides of a CLI run")
    mpp = mpps.pop()
    argv = ["extract", *(slide["path"] for slide in slides), "--model", str(weights),
            "--out", str(out), *(["--mpp", str(mpp)] if mpp is not None else [])]
    main = _cli_main()
    build_model(weights)  # imports done before the clock starts, as in the other arms
    rss = memory_mib("VmRSS")
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"histohub {' '.join(argv)} exited with {code}")
    patches = 0
    for path in sorted(out.glob("*.h5")):
        with h5py.File(path, "r") as h5:
            patches += len(h5["features"])
    return {"patches": patches, "seconds": seconds, "first_s": None, "rss_start_mib": rss}


def _patches_in_memory(slides: list[dict[str, Any]]) -> Any:
    import torch

    import histohub

    pixels = []
    for slide in slides:
        with histohub.open_slide(slide["path"]) as handle:
            coords, size0 = naive_grid(handle, slide["mpp"])
            pixels += [_read_patch(handle, x, y, size0) for x, y in coords]
    return torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros(
        (0, PATCH, PATCH, 3), dtype=torch.uint8)


def arm_model_alone(slides: list[dict[str, Any]], weights: Path, *, compiled: bool
                    ) -> dict[str, Any]:
    """The model alone on every patch of ``slides``, already in memory."""
    _tune_allocator()
    forward = _forward(build_model(weights), compiled=compiled)
    rss = memory_mib("VmRSS")
    patches = _patches_in_memory(slides)
    started = time.perf_counter()
    forward(patches[:BATCH])
    warm = time.perf_counter() - started
    if compiled:
        forward(patches[:BATCH])  # the second call may still specialise
    first = None
    start = time.perf_counter()
    for i in range(0, len(patches), BATCH):
        forward(patches[i:i + BATCH])
        first = first if first is not None else time.perf_counter() - start
    result = {"patches": len(patches), "seconds": time.perf_counter() - start, "first_s": first,
              "rss_start_mib": rss}
    if compiled:
        result["compile_s"] = warm
    return result


def arm_naive(slides: list[dict[str, Any]], weights: Path) -> dict[str, Any]:
    """A CLAM-style loop: mask, grid, ``read_region`` per patch, model, all in this thread."""
    import torch

    import histohub

    _tune_allocator()
    model = build_model(weights)
    features, first, patches = [], None, 0
    rss = memory_mib("VmRSS")
    start = time.perf_counter()
    forward = _forward(model, compiled=False)  # from a loaded model, as the histohub arm
    for slide in slides:
        with histohub.open_slide(slide["path"]) as handle:
            coords, size0 = naive_grid(handle, slide["mpp"])
            for i in range(0, len(coords), BATCH):
                batch = [_read_patch(handle, x, y, size0) for x, y in coords[i:i + BATCH]]
                features.append(forward(torch.from_numpy(np.stack(batch))))
                first = first if first is not None else time.perf_counter() - start
        patches += len(coords)
    return {"patches": patches, "seconds": time.perf_counter() - start, "first_s": first,
            "rss_start_mib": rss}


def reader_options() -> list[str]:
    """The options of ``extract_slide`` that set how many readers run (its signature now)."""
    import histohub

    parameters = inspect.signature(histohub.extract_slide).parameters
    return [name for name in READER_OPTIONS if name in parameters]


def _noop_model() -> Any:
    from torch import nn

    class NoOp(nn.Module):
        """The model replaced by nothing. Shape: (B, 3, H, W) -> zeros (B, 512)."""

        def forward(self, x: Any) -> Any:
            return x.new_zeros((x.shape[0], 512))

    return NoOp()


def arm_reader(slides: list[dict[str, Any]], out: Path, *, option: str | None, readers: int
               ) -> dict[str, Any]:
    """``extract_slide`` with a no-op model: the reader pipeline alone."""
    import histohub

    parameters = inspect.signature(histohub.extract_slide).parameters
    options: dict[str, Any] = {"target_mpp": MPP}
    if option is not None:
        options[option] = readers
    if "compile" in parameters:
        options["compile"] = False  # nothing to compile: the model does no work
    rss = memory_mib("VmRSS")
    cpu = os.times()
    patches = 0
    start = time.perf_counter()
    for i, slide in enumerate(slides):
        extra = {"mpp": slide["mpp"]} if slide["mpp"] is not None else {}
        result = histohub.extract_slide(_noop_model(), slide["path"], out / f"{i:03d}.h5",
                                        progress=False, **options, **extra)
        patches += result.n_patches
    seconds = time.perf_counter() - start
    end = os.times()
    cpu_s = sum(getattr(end, k) - getattr(cpu, k)
                for k in ("user", "system", "children_user", "children_system"))
    return {"patches": patches, "seconds": seconds, "first_s": None, "cpu_s": cpu_s,
            "rss_start_mib": rss}


def _decode_share(path: str, mpp: float | None, share: int, shares: int) -> None:
    import histohub

    with histohub.open_slide(path) as handle:
        coords, size0 = naive_grid(handle, mpp)
        for x, y in coords[share::shares]:
            _read_patch(handle, x, y, size0)


def arm_decode(slides: list[dict[str, Any]], *, processes: int) -> dict[str, Any]:
    """The machine's ceiling for readers: ``processes`` processes each decoding every
    ``processes``-th patch (``read_region`` + resize, nothing else: no GIL, no queue, no
    model), so 2 vs 1 is what two readers could reach here at best."""
    import multiprocessing

    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    rss = memory_mib("VmRSS")
    cpu = os.times()
    patches = sum(slide["patches"] for slide in slides)
    start = time.perf_counter()
    for slide in slides:
        workers = [context.Process(target=_decode_share,
                                   args=(slide["path"], slide["mpp"], k, processes))
                   for k in range(processes)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
            if worker.exitcode != 0:
                raise RuntimeError(f"a decoding process exited with {worker.exitcode}")
    seconds = time.perf_counter() - start
    end = os.times()
    cpu_s = sum(getattr(end, k) - getattr(cpu, k)
                for k in ("user", "system", "children_user", "children_system"))
    return {"patches": patches, "seconds": seconds, "first_s": None, "cpu_s": cpu_s,
            "rss_start_mib": rss}


def run_arm(arm: str, slides: list[dict[str, Any]], out: Path, weights: Path
            ) -> dict[str, Any]:
    """One arm in this process -> ``{"patches", "seconds", "first_s", "peak_rss_mib", ...}``."""
    out.mkdir(parents=True, exist_ok=True)
    if arm == "histohub":
        result = arm_histohub(slides, out, weights)
    elif arm == "cli":
        result = arm_cli(slides, out, weights)
    elif arm in ("eager", "compiled"):
        result = arm_model_alone(slides, weights, compiled=arm == "compiled")
    elif arm == "naive":
        result = arm_naive(slides, weights)
    elif arm.startswith("reader:decode:"):
        result = arm_decode(slides, processes=int(arm.split(":")[2]))
    elif arm.startswith("reader:"):
        _, option, readers = arm.split(":")
        result = arm_reader(slides, out, option=None if option == "default" else option,
                            readers=int(readers))
    else:
        raise ValueError(f"unknown arm {arm!r}")
    return {**result, "peak_rss_mib": memory_mib("VmHWM")}


# --------------------------------------------------------------------------- orchestration

def spawn_arm(arm: str, slides: list[dict[str, Any]], out: Path, weights: Path
              ) -> dict[str, Any]:
    """``run_arm`` in a fresh Python process (its own peak RSS, no state carried over)."""
    job = json.dumps({"arm": arm, "slides": slides, "out": str(out), "weights": str(weights)})
    done = subprocess.run([sys.executable, __file__, "--worker", job], capture_output=True,
                          text=True)
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"arm {arm} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(arms: Sequence[str], slides: list[dict[str, Any]], *, rounds: int, work: Path,
            name: str, weights: Path) -> dict[str, list[dict[str, Any]]]:
    """Every arm once per round, in order (A, B, C, A, B, C, ...) -> arm -> runs."""
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for r in range(rounds):
        for arm in arms:
            out = work / "out" / f"{name}-{arm.replace(':', '-')}-{r}"
            runs[arm].append(spawn_arm(arm, slides, out, weights))
            last = runs[arm][-1]
            print(f"  round {r + 1}/{rounds} {arm:10s} {last['patches'] / last['seconds']:7.1f} "
                  f"patches/s ({last['patches']} in {last['seconds']:.1f} s)", flush=True)
    return runs


def _speeds(runs: list[dict[str, Any]]) -> list[float]:
    return [run["patches"] / run["seconds"] for run in runs]


def _ratio(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """Median over rounds of a's speed / b's speed in the same round."""
    return statistics.median(x / y for x, y in zip(_speeds(a), _speeds(b)))


def _rss(runs: list[dict[str, Any]]) -> str:
    """Median peak RSS, and (+) its rise over the RSS before the job (imports, model)."""
    peak = statistics.median(run["peak_rss_mib"] for run in runs)
    rise = statistics.median(run["peak_rss_mib"] - run["rss_start_mib"] for run in runs)
    return f"{peak:.0f} (+{rise:.0f})"


def best_model_alone(runs: dict[str, list[dict[str, Any]]]) -> str | None:
    alone = [arm for arm in ("eager", "compiled") if arm in runs]
    return max(alone, key=lambda arm: statistics.median(_speeds(runs[arm])), default=None)


def model_table(name: str, runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The printed table of one scenario: patches/s, ratios, peak RSS, first feature."""
    best = best_model_alone(runs)
    lines = [f"{'arm':46s} {'patches':>7s} {'patches/s (min-max)':>21s} {'x best':>6s} "
             f"{'x naive':>7s} {'peak RSS MiB':>13s} {'1st feat.':>9s}  note"]
    for arm, arm_runs in runs.items():
        speeds = _speeds(arm_runs)
        patches = "/".join(str(n) for n in sorted({run["patches"] for run in arm_runs}))
        spread = f"{statistics.median(speeds):.1f} ({min(speeds):.1f}-{max(speeds):.1f})"
        x_best = f"{_ratio(arm_runs, runs[best]):.2f}" if best else "-"
        x_naive = f"{_ratio(arm_runs, runs['naive']):.2f}" if "naive" in runs else "-"
        firsts = [run["first_s"] for run in arm_runs if run["first_s"] is not None]
        first = f"{statistics.median(firsts):.2f} s" if firsts else "-"
        rss = _rss(arm_runs)
        note = ""
        if "compile_s" in arm_runs[0]:
            note = f"compile {statistics.median(run['compile_s'] for run in arm_runs):.1f} s"
        lines.append(f"{ARM_LABELS.get(arm, arm):46s} {patches:>7s} {spread:>21s} {x_best:>6s} "
                     f"{x_naive:>7s} {rss:>13s} {first:>9s}  {note}".rstrip())
    return lines


def reader_arms(options: list[str]) -> list[str]:
    ceiling = ["reader:decode:1", "reader:decode:2"]
    if not options:
        return ["reader:default:1", *ceiling]
    return [f"reader:{option}:{n}" for option in options for n in (1, 2)] + ceiling


def reader_table(runs: dict[str, list[dict[str, Any]]]) -> tuple[list[str], dict[str, float]]:
    lines = [f"{'readers':24s} {'patches/s (min-max)':>24s} {'per reader':>10s} "
             f"{'per CPU-s':>9s} {'peak RSS MiB':>13s}"]
    ratios: dict[str, float] = {}
    for arm, arm_runs in runs.items():
        _, option, readers = arm.split(":")
        speeds = _speeds(arm_runs)
        median = statistics.median(speeds)
        spread = f"{median:.1f} ({min(speeds):.1f}-{max(speeds):.1f})"
        per_cpu = statistics.median(run["patches"] / run["cpu_s"] for run in arm_runs)
        rss = _rss(arm_runs)
        label = {"default": "default reader", "decode": f"decode only, {readers} proc."}.get(
            option, f"{option}={readers}")
        lines.append(f"{label:24s} {spread:>24s} {median / int(readers):10.1f} {per_cpu:9.1f} "
                     f"{rss:>13s}")
        if readers == "2":
            ratios[option] = _ratio(arm_runs, runs[f"reader:{option}:1"])
    for option, ratio in ratios.items():
        lines.append(f"{option}: 2 readers vs 1: x{ratio:.2f} (median of per-round ratios)")
    return lines, ratios


SCENARIOS = {"large": ["large"], "cohort": ["cohort"], "shared": ["cmu", "tcga"],
             "reader": ["reader"]}
TITLES = {"large": "large slide", "cohort": "cohort", "cmu": "shared: CMU-1-Small-Region",
          "tcga": "shared: TCGA-CR-7395 cut-down (JPEG 2000, mpp 0.5 given)"}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--only", nargs="+", choices=tuple(SCENARIOS),
                        default=list(SCENARIOS), help="parts to run (default: all)")
    parser.add_argument("--work", type=Path,
                        help="folder for the built slides, kept and reused (default: a "
                             "temporary folder, removed at the end)")
    parser.add_argument("--quick", action="store_true", help="tiny slides, for a smoke run")
    parser.add_argument("--arms", nargs="+", choices=MODEL_ARMS, default=list(MODEL_ARMS),
                        help="arms of the large, cohort and shared parts (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(run_arm(job["arm"], job["slides"], Path(job["out"]),
                                 Path(job["weights"]))))
        return
    rounds = args.rounds or (1 if args.quick else 3)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        benchmark(args, args.work, rounds)
    else:
        with tempfile.TemporaryDirectory(prefix="histohub-bench-slides-") as tmp:
            benchmark(args, Path(tmp), rounds)


def benchmark(args: argparse.Namespace, work: Path, rounds: int) -> None:
    import torch

    import histohub

    print(f"histohub {histohub.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}; {rounds} rounds; the machine may be "
          "shared: compare ratios within a round, not absolutes", flush=True)
    slides = build_slides(work, quick=args.quick)
    weights = write_weights(work)
    arms = [arm for arm in MODEL_ARMS if arm in args.arms]
    targets: list[str] = []
    results: dict[str, Any] = {"probes": [probe("before")]}
    saved = work / time.strftime("results-%Y%m%d-%H%M%S.json")

    def save() -> None:  # after each part, so a killed run keeps what it measured
        if args.work is not None:
            saved.write_text(json.dumps({"targets": targets, **results}, indent=1))

    for part in args.only:
        for scenario in SCENARIOS[part]:
            if scenario == "reader":
                lines, results["reader"] = reader_part(slides["large"], rounds=rounds,
                                                       work=work, weights=weights)
                targets += lines
                results["probes"].append(probe("after reader"))
                save()
                continue
            group = slides[scenario]
            print(f"\n== {TITLES[scenario]}: {len(group)} slide(s), "
                  f"{sum(s['patches'] for s in group)} tissue patches", flush=True)
            runs = measure(arms, group, rounds=rounds, work=work, name=scenario,
                           weights=weights)
            print("\n".join(model_table(scenario, runs)), flush=True)
            targets += check_targets(scenario, runs)
            results[scenario] = runs
            results["probes"].append(probe(f"after {scenario}"))
            save()
    if targets:
        print("\ntargets (issue 11):\n" + "\n".join(targets))
    if args.work is not None:
        print(f"every run: {saved}")


def reader_part(slides: list[dict[str, Any]], *, rounds: int, work: Path, weights: Path
                ) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """The reader arms, interleaved -> the target lines and every run."""
    options = reader_options()
    print(f"\n== reader pipeline alone (no-op model) on the large slide, "
          f"{slides[0]['patches']} tissue patches; extract_slide reader options: "
          f"{', '.join(options) or 'none (only the default reader measured)'}", flush=True)
    runs = measure(reader_arms(options), slides, rounds=rounds, work=work, name="reader",
                   weights=weights)
    lines, ratios = reader_table(runs)
    ceiling = ratios.pop("decode", None)
    if ceiling is not None:
        lines.append(f"the machine's ceiling (processes decoding, nothing else): 2 vs 1 "
                     f"x{ceiling:.2f}; " + ", ".join(
                         f"{option} reaches {(ratio - 1) / (ceiling - 1):.0%} of its gain"
                         for option, ratio in ratios.items() if ceiling > 1.05))
    print("\n".join(lines), flush=True)
    if not ratios:
        return ["reader 2 vs 1: not measurable, extract_slide has no reader-count option"], runs
    return [f"reader {option} 2 vs 1 >= 1.7: x{ratio:.2f} "
            f"{'MET' if ratio >= 1.7 else 'NOT MET'}"
            + (f" (ceiling here x{ceiling:.2f})" if ceiling is not None else "")
            for option, ratio in ratios.items()], runs


def check_targets(scenario: str, runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per histohub arm: the issue's target for this scenario, met or not."""
    best = best_model_alone(runs)
    lines = []
    for arm in (a for a in HISTOHUB_ARMS if a in runs):
        if scenario in ("large", "cohort") and best:
            ratio = _ratio(runs[arm], runs[best])
            lines.append(f"{scenario}: {arm} >= 0.90x best model alone ({best}): x{ratio:.2f} "
                         f"{'MET' if ratio >= 0.90 else 'NOT MET'}")
        if scenario == "cmu" and "naive" in runs:
            ratio = _ratio(runs[arm], runs["naive"])
            lines.append(f"cmu (30 patches): {arm} >= naive loop: x{ratio:.2f} "
                         f"{'MET' if ratio >= 1.0 else 'NOT MET'}")
    return lines


if __name__ == "__main__":
    main()
