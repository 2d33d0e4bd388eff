"""Patches/s of zoo architectures on this machine's CPU: the model alone, and histohub's
extraction of a whole slide with the same model (random weights: speed does not depend on
them). The two arms of each architecture run one after the other, in rounds, with a
matrix-multiply probe before and after; prints a Markdown table of medians.

    python benchmarks/zoo_throughput.py --arch vit-s16 --arch resnet50 --rounds 2
    python benchmarks/zoo_throughput.py --arch vit-s16 --slide my.svs   # another slide

The model-alone arm runs batches of ``--batch`` random 224 px images; the extraction arm
runs ``histohub.extract_slide`` (reader thread, normalisation, HDF5 file) on a synthetic
slide (``histohub demo-slide``) at 0.5 um/px and 224 px, with the same batch size and no
``torch.compile``, counting patches from the call to the finished file.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _probes import probe

import histohub
import histohub.hub
from histohub.hub._archs import FEATURE_DIMS, build_encoder
from histohub.hub._zoo_archs import ZOO_ARCHS, build_vit


def build(arch: str) -> torch.nn.Module:
    """``arch`` with random weights, in eval mode."""
    return (build_vit(arch) if arch in ZOO_ARCHS else build_encoder(arch)).eval()


def model_alone(model: torch.nn.Module, *, size: int, batch: int, repeats: int) -> float:
    """Images/s of ``model`` on random ``(batch, 3, size, size)`` batches already in memory
    (after a warm-up), channels_last as histohub runs it."""
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return batch * repeats / (time.perf_counter() - start)


def extraction(model: torch.nn.Module, slide: Path, work: Path, *, batch: int) -> float:
    """Patches/s of ``histohub.extract_slide`` over ``slide``, from the call to the file."""
    out = work / "features.h5"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    result = histohub.extract_slide(model, slide, out, target_mpp=0.5, batch_size=batch,
                                    compile=False, progress=False)
    return result.n_patches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", required=True,
                        choices=sorted(ZOO_ARCHS) + sorted(FEATURE_DIMS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="model-alone batches a round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--slide", type=Path, help="default: a demo slide written here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        slide = args.slide
        if slide is None:
            from histohub.slides._synthetic import write_demo_slide

            slide = write_demo_slide(work / "demo.tiff")
        histohub.hub.tune_allocator()  # what extraction does on a CPU: both arms run with it
        probe("before")
        rows = []
        for arch in args.arch:
            model = build(arch)
            alone, slide_rates = [], []
            for _ in range(args.rounds):
                alone.append(model_alone(model, size=224, batch=args.batch,
                                         repeats=args.repeats))
                slide_rates.append(extraction(model, slide, work, batch=args.batch))
            rows.append((arch, statistics.median(alone), statistics.median(slide_rates)))
            print(f"{arch}: alone {alone}, extraction {slide_rates}", flush=True)
        probe("after")
    print(f"\nCPU, {torch.get_num_threads()} threads, batch {args.batch}, 224 px, medians of "
          f"{args.rounds} rounds:\n\n| architecture | model alone, images/s | histohub "
          f"extraction, patches/s | ratio |\n|---|---|---|---|")
    for arch, alone, slide_rate in rows:
        print(f"| {arch} | {alone:.1f} | {slide_rate:.1f} | {slide_rate / alone:.2f}x |")


if __name__ == "__main__":
    main()
