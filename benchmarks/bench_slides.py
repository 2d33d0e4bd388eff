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
A, B, C, ...), medians of the rounds. Every arm imports what it runs before its clock
starts (torch, histohub's slide pipeline, OpenSlide: paid once per process):

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
- naive:     a CLAM-style loop in the main process, every pixel through OpenSlide
             (histohub's own JPEG tile decoding off): tissue mask of a thumbnail
             (``histohub.tissue_mask``), the grid, ``read_region`` per patch, the eager
             channels_last model on batches of 32; timed, like the histohub arm, from a
             loaded model (so its channels_last conversion counts, as histohub's does).
             The time it takes to load the model from the file (a second load, the file
             read once before) is kept beside it: the CLI reads its model file within its
             time, so on the 30-patch slide the CLI is also compared with the loop plus
             that load.

All arms run with glibc told to keep freed memory (``histohub.hub.tune_allocator``, which
``extract_slide`` applies itself). Printed per arm: patches/s, the ratio to the best
model-alone arm and to the naive loop (per round, then the median), peak RSS (``VmHWM`` of
the arm's process, children not included; in brackets its rise over the RSS once torch and
the model are loaded; the model-alone arms hold every patch in memory), and the time from
the start of the job to the first feature (end-to-end arms: from before the first slide is
opened; histohub's is when the model's first forward pass returns, seen by a forward hook,
not measured for the CLI; model-alone arms: from the timed loop's start).

reader: the reader pipeline alone. ``extract_slide`` on the large slide with the model
replaced by a no-op module returning zeros ``(B, 512)`` (so the batches are still
normalised on the CPU and written), and ``histohub.slide_patches`` (the uint8 batches as a
GPU run takes them: normalised on the device; nothing done with them), with 1 and 2
readers for each reader option ``extract_slide`` offers (looked up in its signature when
the benchmark runs: ``read_threads``, ``num_workers``), in patches/s, patches/s per reader
and patches per CPU-second (the process and its reaped children), and the 2-vs-1 ratio
(for ``slide_patches`` also from its first batch on, the slide tiled); the default
reader again with every pixel read through OpenSlide (``HISTOHUB_JPEG_TILES=0``: what
histohub's own JPEG tile decoding gains); and the machine's ceiling: 1 and 2 processes
reading contiguous shares of histohub's grid with its ``PatchReader`` and doing nothing
else (the grid cut before the clock). Then, interleaved among themselves, one
``histohub.cohort_patches`` over three large slides (the large slide and two copies of its
file, made once in ``--work``), and one over the 22-slide cohort, with 1 and 2 readers of
each option: end to end, each slide tiled in the background while the one before is read.

A matrix-multiply probe (fp32 1024^3, GFLOP/s) before and after each part tells whether
the machine was in a slow spell (about 170 GFLOP/s at 2 threads when quiet, 72-84 in one).
Targets (issue 11), checked for both histohub arms: >= 0.90x the best model-alone arm on the
large slide and on the cohort; on the 30-patch slide at least the naive loop; 2 readers
>= 1.7x one.

Uses only histohub's public API, so it runs across refactors of the library.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from _probes import probe
from bench_slides_arms import reader_options, run_arm, write_weights
from bench_slides_data import build_slides

MODEL_ARMS = ("histohub", "cli", "eager", "compiled", "naive")
HISTOHUB_ARMS = ("histohub", "cli")
ARM_LABELS = {
    "histohub": "histohub library (defaults)",
    "cli": "histohub extract (CLI defaults)",
    "eager": "model alone, eager, channels_last, b32",
    "compiled": "model alone, torch.compile, channels_last, b32",
    "naive": "naive loop: mask, read_region, model, b32",
}


# --------------------------------------------------------------------------- orchestration

def spawn_arm(arm: str, slides: list[dict[str, Any]], out: Path, weights: Path
              ) -> dict[str, Any]:
    """``run_arm`` in a fresh Python process (its own peak RSS, no state carried over: not
    even a partial output that a killed benchmark left, which the arm would resume)."""
    job = json.dumps({"arm": arm, "slides": slides, "out": str(out), "weights": str(weights)})
    shutil.rmtree(out, ignore_errors=True)
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


def reader_arms(options: list[str], patches: bool) -> list[str]:
    """``reader:OPTION:N`` (extract_slide, no-op model), ``patches:OPTION:N``
    (``histohub.slide_patches``, when there is one), then the baselines."""
    extra = ["reader:openslide:1", "reader:decode:1", "reader:decode:2"]
    if not options:
        return ["reader:default:1", *extra]
    kinds = ("reader", "patches") if patches else ("reader",)
    return [f"{kind}:{option}:{n}" for kind in kinds for option in options
            for n in (1, 2)] + extra


def reader_table(runs: dict[str, list[dict[str, Any]]]) -> tuple[list[str], dict[str, float]]:
    """The printed table, the 2-vs-1 lines -> lines, ``{"KIND:OPTION": ratio}``."""
    lines = [f"{'readers':50s} {'patches/s (min-max)':>24s} {'per reader':>10s} "
             f"{'per CPU-s':>9s} {'peak RSS MiB':>13s} {'from 1st batch':>14s}"]
    ratios: dict[str, float] = {}
    for arm, arm_runs in runs.items():
        kind, option, readers = arm.split(":")
        speeds = _speeds(arm_runs)
        median = statistics.median(speeds)
        spread = f"{median:.1f} ({min(speeds):.1f}-{max(speeds):.1f})"
        per_cpu = statistics.median(run["patches"] / run["cpu_s"] for run in arm_runs)
        rss = _rss(arm_runs)
        reading = (f"{statistics.median(_reading_speeds(arm_runs)):.1f}"
                   if _reading_speeds(arm_runs) else "-")
        label = {"default": "extract_slide, default reader",
                 "decode": f"decode only, {readers} proc.",
                 "openslide": "extract_slide, OpenSlide only"}.get(
            option, f"{READER_KINDS[kind]} {option}={readers}")
        lines.append(f"{label:50s} {spread:>24s} {median / int(readers):10.1f} {per_cpu:9.1f} "
                     f"{rss:>13s} {reading:>14s}")
        if readers == "2":
            one = runs[f"{kind}:{option}:1"]
            ratios[f"{kind}:{option}"] = _ratio(arm_runs, one)
            if _reading_speeds(arm_runs) and _reading_speeds(one):
                ratios[f"{kind}:{option}:reading"] = statistics.median(
                    a / b for a, b in zip(_reading_speeds(arm_runs), _reading_speeds(one)))
    for key, ratio in ratios.items():
        lines.append(f"{_reader_name(key)}: 2 vs 1: x{ratio:.2f} (median of per-round ratios)")
    default = next((arm for arm in runs if arm.startswith("reader:") and arm.endswith(":1")
                    and arm.split(":")[1] not in ("openslide", "decode")), None)
    if "reader:openslide:1" in runs and default is not None:
        lines.append(f"one default reader, JPEG tiles decoded by histohub vs every pixel "
                     f"through OpenSlide: x{_ratio(runs[default], runs['reader:openslide:1']):.2f}")
    return lines, ratios


def _reading_speeds(runs: list[dict[str, Any]]) -> list[float]:
    """Patches/s from the first batch on (the slide tiled, the readers started): what a
    cohort's reading runs at, the next slide tiled meanwhile. Empty where not recorded."""
    return [(run["patches"] - run["first_patches"]) / (run["seconds"] - run["first_s"])
            for run in runs if run.get("first_patches") and run["seconds"] > run["first_s"]]


def _reader_name(key: str) -> str:
    """``KIND:OPTION[:reading]`` -> what the ratio is of, in words."""
    kind, option, *reading = key.split(":")
    return f"{READER_KINDS[kind]} {option}" + (" from its first batch" if reading else "")


#: Files in the reader part's cohort: the large slide and copies of it.
COHORT_COPIES = 3


#: What each kind of reader arm runs.
READER_KINDS = {"reader": "extract_slide (no-op model)", "patches": "slide_patches",
                "large3": f"cohort_patches, {COHORT_COPIES} large slides",
                "small22": "cohort_patches, the 22-slide cohort",
                "decode": "decode only"}


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
                lines, results["reader"] = reader_part(slides["large"], slides["cohort"],
                                                       rounds=rounds,
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


def reader_part(slides: list[dict[str, Any]], cohort: list[dict[str, Any]], *, rounds: int,
                work: Path, weights: Path
                ) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """The reader arms, interleaved -> the target lines and every run."""
    import histohub

    options = reader_options()
    patches = hasattr(histohub, "slide_patches")
    print(f"\n== reader pipeline alone on the large slide, {slides[0]['patches']} tissue "
          f"patches: extract_slide with a no-op model"
          + (", and histohub.slide_patches (uint8 batches, as a GPU run takes them)"
             if patches else "")
          + f"; reader options: {', '.join(options) or 'none (only the default reader)'}",
          flush=True)
    runs = measure(reader_arms(options, patches), slides, rounds=rounds, work=work,
                   name="reader", weights=weights)
    if hasattr(histohub, "cohort_patches") and options:
        for kind, group in (("large3", copies(slides[0], work, COHORT_COPIES)),
                            ("small22", cohort)):
            print(f"\n== reader pipeline alone, {READER_KINDS[kind]} "
                  f"({sum(s['patches'] for s in group)} patches), each slide tiled while the "
                  "one before is read", flush=True)
            runs |= measure([f"{kind}:{option}:{n}" for option in options for n in (1, 2)],
                            group, rounds=rounds, work=work, name=f"reader-{kind}",
                            weights=weights)
    lines, ratios = reader_table(runs)
    summary, targets = reader_targets(ratios)
    print("\n".join(lines + summary), flush=True)
    return targets, runs


def copies(slide: dict[str, Any], work: Path, n: int) -> list[dict[str, Any]]:
    """``slide`` and ``n - 1`` copies of its file in ``work`` (made once, whole or not at
    all): a cohort's slides are distinct files, each with its own tiles to decode."""
    source = Path(slide["path"])
    folder = work / "reader-cohort"
    folder.mkdir(exist_ok=True)
    cohort = [slide]
    for i in range(1, n):
        path = folder / f"{source.stem}-{i}{source.suffix}"
        if not path.is_file() or path.stat().st_size != source.stat().st_size:
            partial = path.with_name(path.name + ".partial")
            shutil.copyfile(source, partial)
            partial.replace(path)
        cohort.append({**slide, "path": str(path)})
    return cohort


def reader_targets(ratios: dict[str, float]) -> tuple[list[str], list[str]]:
    """``reader_table``'s 2-vs-1 ratios -> (the ceiling line, the target lines)."""
    ratios = dict(ratios)
    ceiling = ratios.pop("reader:decode", None)
    names = {key: _reader_name(key) for key in ratios}
    summary = []
    if ceiling is not None:
        shares = [f"; {names[key]} reaches {(ratio - 1) / (ceiling - 1):.0%} of its gain"
                  for key, ratio in ratios.items() if ceiling > 1.05]
        summary.append(f"the machine's ceiling (processes decoding, nothing else): 2 vs 1 "
                       f"x{ceiling:.2f}" + "".join(shares))
    if not ratios:
        return summary, ["reader 2 vs 1: not measurable, extract_slide has no reader-count "
                         "option"]
    return summary, [f"reader: {names[key]} 2 vs 1 >= 1.7: x{ratio:.2f} "
                     f"{'MET' if ratio >= 1.7 else 'NOT MET'}"
                     + (f" (ceiling here x{ceiling:.2f})" if ceiling is not None else "")
                     for key, ratio in ratios.items()]


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
            if arm == "cli":  # the CLI reads its model file in its time; so does this
                ratio = _ratio(runs[arm], _with_load(runs["naive"]))
                lines.append(f"cmu (30 patches): cli >= naive loop timed from its model file "
                             f"too: x{ratio:.2f} {'MET' if ratio >= 1.0 else 'NOT MET'}")
    return lines


def _with_load(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The naive arm's runs with the time its model load took added to their seconds."""
    return [{**run, "seconds": run["seconds"] + run["load_s"]} for run in runs]


if __name__ == "__main__":
    main()
