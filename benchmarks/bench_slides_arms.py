"""The arms of ``bench_slides.py``, each run in its own process (``run_arm``): histohub
(library and command line), the model alone (eager, compiled), a naive loop, the reader
pipeline (a no-op model; ``slide_patches``, ``cohort_patches``), and the machine's decoding
ceiling."""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from _probes import memory_mib, openslide_only
from bench_slides_data import MPP, PATCH, naive_grid

#: Batch of the model-alone and naive arms (histohub uses its own default).
BATCH = 32
#: extract_slide options that set how many readers run, in the order they are measured.
READER_OPTIONS = ("read_threads", "num_workers")


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


def import_pipeline() -> None:
    """Import what an end-to-end arm runs (histohub's slide pipeline, OpenSlide) before its
    clock starts: an import is paid once per process (about 0.1 s for histohub's pipeline,
    10% of a 30-patch slide), like torch's, which no arm times either."""
    import openslide  # noqa: F401

    import histohub.slides

    for name in ("extract_slide", "SlideExtractor", "open_slide", "tissue_mask"):
        getattr(histohub.slides, name)  # histohub imports these on first use


def _tune_allocator() -> None:
    import histohub.hub

    histohub.hub.tune_allocator()


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

    import_pipeline()
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
        with histohub.slides.SlideExtractor(model) as extractor:
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
    import_pipeline()
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
    """A CLAM-style loop: mask, grid, ``read_region`` per patch, model, all in this thread;
    timed from a loaded model, with the time a second load of the same file takes beside it
    (``load_s``: what the loop would add to be timed from its model file, as the CLI is).
    Every pixel comes through OpenSlide, as in CLAM (``openslide_only``: histohub's
    ``Slide``, used for its block-by-block thumbnail, decodes no JPEG tiles itself)."""
    with openslide_only():
        return _naive_loop(slides, weights)


def _naive_loop(slides: list[dict[str, Any]], weights: Path) -> dict[str, Any]:
    import torch

    import histohub

    _tune_allocator()
    import_pipeline()
    build_model(weights)  # imports done and the file read once, as before the CLI arm's clock
    loading = time.perf_counter()
    model = build_model(weights)
    load_s = time.perf_counter() - loading
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
            "rss_start_mib": rss, "load_s": load_s}


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
    cpu = cpu_seconds()
    patches = 0
    start = time.perf_counter()
    for i, slide in enumerate(slides):
        extra = {"mpp": slide["mpp"]} if slide["mpp"] is not None else {}
        result = histohub.extract_slide(_noop_model(), slide["path"], out / f"{i:03d}.h5",
                                        progress=False, **options, **extra)
        patches += result.n_patches
    return _timed_run(patches, start, cpu, rss)


def arm_patches(slides: list[dict[str, Any]], *, option: str, readers: int, cohort: bool = False
                ) -> dict[str, Any]:
    """``histohub.slide_patches`` slide by slide, or with ``cohort`` one
    ``histohub.cohort_patches`` over them all (each slide tiled while the one before is
    read): the reader pipeline as a GPU run has it (uint8 batches, normalised on the
    device), nothing done with the batches."""
    import histohub

    _tune_allocator()
    import_pipeline()
    histohub.cohort_patches  # noqa: B018 - imported on first use: before the clock
    rss = memory_mib("VmRSS")
    cpu = cpu_seconds()
    patches, first = 0, None
    start = time.perf_counter()
    if cohort:
        mpp = {slide["mpp"] for slide in slides}
        if len(mpp) != 1:
            raise ValueError(f"a cohort arm's slides share one mpp; these have {mpp}")
        streams = [histohub.cohort_patches([s["path"] for s in slides], target_mpp=MPP,
                                           mpp=mpp.pop(), **{option: readers})]
    else:
        streams = (histohub.slide_patches(slide["path"], target_mpp=MPP, mpp=slide["mpp"],
                                          **{option: readers}) for slide in slides)
    for stream in streams:
        for batch in stream:
            patches += len(batch.pixels)
            first = first or (time.perf_counter() - start, patches)
    first_s, first_patches = first or (None, 0)
    return {**_timed_run(patches, start, cpu, rss), "first_s": first_s,
            "first_patches": first_patches}


def _decode_share(grid: Any, share: int, shares: int) -> None:
    from histohub.slides._reader import PatchReader

    reader = PatchReader(grid)
    for index in range(share * len(grid) // shares, (share + 1) * len(grid) // shares):
        reader.read(index)
    reader.close()


def arm_decode(slides: list[dict[str, Any]], *, processes: int) -> dict[str, Any]:
    """The machine's ceiling for readers: ``processes`` processes each reading one
    contiguous share of histohub's grid with histohub's ``PatchReader`` (the reader
    threads' decoding, nothing else: no GIL, no queue, no model; contiguous, so no tile is
    decoded by two of them, as with threads sharing one tile cache), so 2 vs 1 is what two
    readers could reach here at best. The grids are cut before the clock."""
    import multiprocessing

    import histohub
    from histohub.slides._tiling import tile_grid

    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    grids = []
    for slide in slides:
        with histohub.open_slide(slide["path"]) as handle:
            grids.append(tile_grid(handle, target_mpp=MPP, mpp_override=slide["mpp"]))
    rss = memory_mib("VmRSS")
    cpu = cpu_seconds()
    start = time.perf_counter()
    for grid in grids:
        workers = [context.Process(target=_decode_share, args=(grid, k, processes))
                   for k in range(processes)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
            if worker.exitcode != 0:
                raise RuntimeError(f"a decoding process exited with {worker.exitcode}")
    return _timed_run(sum(len(grid) for grid in grids), start, cpu, rss)


def cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children, to the microsecond
    (``os.times`` counts 10 ms clock ticks: a short arm whose work is in worker processes
    would read 0)."""
    import resource

    return sum(usage.ru_utime + usage.ru_stime for usage in (
        resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def _timed_run(patches: int, start: float, cpu: float, rss: float) -> dict[str, Any]:
    """A reader arm's record: wall seconds since ``start`` and CPU seconds since ``cpu``
    (:func:`cpu_seconds`)."""
    seconds = time.perf_counter() - start
    return {"patches": patches, "seconds": seconds, "first_s": None,
            "cpu_s": cpu_seconds() - cpu, "rss_start_mib": rss}


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
    elif arm == "reader:openslide:1":  # the default reader, every pixel through OpenSlide
        with openslide_only():
            result = arm_reader(slides, out, option=None, readers=1)
    elif arm.startswith(("patches:", "large3:", "small22:")):
        kind, option, readers = arm.split(":")
        result = arm_patches(slides, option=option, readers=int(readers),
                             cohort=kind != "patches")
    elif arm.startswith("reader:"):
        _, option, readers = arm.split(":")
        result = arm_reader(slides, out, option=None if option == "default" else option,
                            readers=int(readers))
    else:
        raise ValueError(f"unknown arm {arm!r}")
    return {**result, "peak_rss_mib": memory_mib("VmHWM")}
