"""One slide with a model whose weights are here: loading them while the slide is tiled,
against loading them first.

Not a test: it prints ratios measured in one run, A and B interleaved in fresh processes
(the machines this runs on have slow spells, which interleaving spreads over A and B
alike), with a matrix-multiply probe before and after.

Each process imports histohub and torch, then times ``SlideExtractor(MODEL)`` +
``extract(slide)`` (a new output file) from the start:
  overlap: the default: a bundled or cached model is known from the manifest and its
           weights load while the first slide is tiled (``model_runner.local_model_spec``);
  first:   the same with ``local_model_spec`` returning None, so the weights load before
           the slide is touched (histohub before this change, and any model still to
           download).

Usage: ``python benchmarks/bench_first_slide.py [--rounds 7] [--slide PATH] [--model NAME]``
(default: the OpenSlide test slide CMU-1-Small-Region from ../shared/data/slides, the
bundled resnet18-ssl-mini).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _probes import probe

DEFAULT_SLIDE = (Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"
                 / "cmu_small_region.svs")

_CHILD = """
import json, sys, time
import torch
import histohub.slides._extract as slide_features
from histohub.slides._extract import SlideExtractor
arm, slide, model, out = sys.argv[1:5]
if arm == "first":
    slide_features.local_model_spec = lambda *a, **k: None
start = time.perf_counter()
with SlideExtractor(model, progress=False) as extractor:
    result = extractor.extract(slide, out)
print(json.dumps({"seconds": time.perf_counter() - start, "patches": result.n_patches}))
"""


def run_arm(arm: str, slide: Path, model: str, work: Path, index: int) -> dict:
    out = work / f"{arm}-{index}.h5"
    done = subprocess.run([sys.executable, "-c", _CHILD, arm, str(slide), model, str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--model", default="resnet18-ssl-mini")
    args = parser.parse_args(argv)
    if not args.slide.is_file():
        print(f"error: {args.slide} not found (give --slide)", file=sys.stderr)
        return 2
    arms = ("overlap", "first")
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    probe("before")
    with tempfile.TemporaryDirectory() as work:
        run_arm("first", args.slide, args.model, Path(work), -1)   # warm the file cache
        for index in range(args.rounds):
            for arm in arms if index % 2 == 0 else arms[::-1]:
                record = run_arm(arm, args.slide, args.model, Path(work), index)
                times[arm].append(record["seconds"])
    probe("after")
    first = statistics.median(times["first"])
    print(f"{args.slide.name}, {record['patches']} patches, model {args.model}, "
          f"{args.rounds} rounds (medians, s from SlideExtractor() to the finished file):")
    for arm in arms:
        median = statistics.median(times[arm])
        print(f"  {arm:<8} {median:.3f} s   ratio to 'first' {median / first:.2f}   "
              f"(all: {', '.join(f'{t:.3f}' for t in times[arm])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
