"""Benchmark: a cohort's memory stays flat however many slides it has.

    .venv/bin/python benchmarks/bench_cohort_memory.py [--slides 80] [--work /tmp/bench]

Runs one ``SlideExtractor.extract_many`` (the bundled ``resnet18-ssl-mini``, 8 patches a
slide, so the time goes to opening and tiling) over ``--slides`` links to bench_slides'
large slide (built in ``--work``, or found there), and prints this process's resident
memory after slides 5, 20, 40, ... and the last, and the growth per slide from the 20th
on. Each slide's grid (its mask: 2,143 x 1,786 bytes here, up to 4,096 x 4,096) must be
freed once the slide is written: the growth should be near 0 MiB a slide. Before
``Schedule.finished`` resident memory grew 8.0 MiB a slide over 80 slides (the peak 7.4
from slide 40 to 80). Not a test: memory depends on the allocator.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _probes import memory_mib
from bench_slides_data import build_slides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=80)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench")
    args = parser.parse_args()
    if args.slides < 21:
        parser.error("--slides: at least 21 (the growth is measured from the 20th slide on)")
    from histohub.slides._extract import SlideExtractor, SlideJob, Tiling

    large = Path(build_slides(args.work, quick=False)["large"][0]["path"])
    with tempfile.TemporaryDirectory(dir=args.work) as folder:
        jobs = []
        for i in range(args.slides):
            link = Path(folder) / f"slide-{i:04d}.tif"
            os.symlink(large, link)
            jobs.append(SlideJob(link, link.with_suffix(".h5")))
        marks = {5, 20, *range(40, args.slides, 40), args.slides}
        seen: dict[int, float] = {}
        peaks: dict[int, float] = {}
        started = time.perf_counter()
        with SlideExtractor("resnet18-ssl-mini", progress=False) as extractor:
            for n, result in enumerate(extractor.extract_many(jobs, tiling=Tiling(max_patches=8)),
                                       start=1):
                if result.error is not None:
                    raise SystemExit(f"{result.slide_path}: {result.error}")
                if n in marks:
                    seen[n], peaks[n] = memory_mib("VmRSS"), memory_mib()
                    print(f"after slide {n:>4}: resident {seen[n]:,.0f} MiB, "
                          f"peak {peaks[n]:,.0f} MiB", flush=True)
    growth = [(marks[args.slides] - marks[20]) / (args.slides - 20) for marks in (seen, peaks)]
    print(f"{args.slides} slides in {time.perf_counter() - started:.0f} s; from slide 20 on, "
          f"resident memory grew {growth[0]:.2f} MiB a slide, the peak {growth[1]:.2f} "
          "(target: near 0; resident memory moves with the allocator, the peak only up)")


if __name__ == "__main__":
    main()
