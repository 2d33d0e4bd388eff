"""Time the full linear-probe sweep (5 fractions x 5 repeats): cold cache vs warm cache.

    python training/benchmarks/bench_sweep.py --data kather2016 --model random --rounds 2

Each round runs ``run_benchmark.py`` twice in fresh processes, interleaved (cold, warm,
cold, warm, ...): cold with an empty feature cache (features computed once per model),
warm reading them back. A matrix-multiply probe before and after says whether the
machine was in a slow spell. Prints wall times, the per-model split between feature
extraction and training (from the run JSON), and the cold / warm ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _matmul import matmul_gflops

ROOT = Path(__file__).resolve().parents[2]


def one_run(models: list[str], data: str, out: Path, extra: list[str]) -> tuple[float, dict]:
    argv = [sys.executable, str(ROOT / "training" / "run_benchmark.py"), "--task", "linear",
            "--data", data, "--out", str(out), "--quiet", *extra]
    for model in models:
        argv += ["--model", model]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    latest = max((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return wall, json.loads(latest.read_text())["timings"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="kather2016")
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more run_benchmark.py options (after --)")
    args = parser.parse_args(argv)
    models = args.model or ["random"]
    print(f"matmul before: {matmul_gflops(2048, repeats=5):.0f} GFLOP/s")
    walls: dict[str, list[float]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as temp:
        for round_ in range(args.rounds):
            out = Path(temp) / f"round{round_}"
            for kind in ("cold", "warm"):
                wall, timings = one_run(models, args.data, out, args.extra)
                walls[kind].append(wall)
                parts = ", ".join(f"{m}: features {t['features_s']:.1f} s, "
                                  f"25 probes {t['train_s']:.1f} s" for m, t in timings.items())
                print(f"round {round_} {kind}: {wall:.1f} s wall ({parts})")
            shutil.rmtree(out)
    print(f"matmul after: {matmul_gflops(2048, repeats=5):.0f} GFLOP/s")
    cold, warm = statistics.median(walls["cold"]), statistics.median(walls["warm"])
    print(f"median cold {cold:.1f} s, warm {warm:.1f} s, cold / warm = {cold / warm:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
