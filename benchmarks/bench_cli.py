"""Start-up time of the ``histohub`` command and of ``import histohub``, in fresh processes.

Not a test: it prints the median (and the fastest) of ``--repeats`` fresh processes for

- ``histohub --help`` and ``histohub list``: target well under 0.5 s (they only read the
  manifest, so they must not import torch);
- ``python -c "import histohub"`` against ``python -c "import torch, torchvision"``: what
  a user pays for ``import histohub`` (torch and torchvision are imported when a name that
  needs them is first used);
- ``python -c "pass"``: the interpreter's own start-up, the floor of every row.

The commands are interleaved, one of each per round, so a slow spell of the machine hits
them alike. Run it on an otherwise idle machine.

Usage: ``python benchmarks/bench_cli.py [--repeats 9]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

TARGET_SECONDS = 0.5


def commands() -> dict[str, list[str]]:
    """Name -> argv. The installed ``histohub`` script when on PATH, else ``-m histohub``."""
    script = shutil.which("histohub")
    cli = [script] if script else [sys.executable, "-m", "histohub"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "histohub --help": [*cli, "--help"],
        "histohub list": [*cli, "list"],
        "python -c 'import histohub'": [sys.executable, "-c", "import histohub"],
        "python -c 'import torch, torchvision'": [sys.executable, "-c",
                                                  "import torch, torchvision"],
    }


def run_once(argv: list[str]) -> float | None:
    """Wall-clock seconds of one fresh process; None (and its error printed) if it fails."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "HISTOHUB_OFFLINE": "1"})
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no message)"]
        print(f"  {' '.join(argv[-2:])}: exit code {done.returncode}: {lines[-1]}")
        return None
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="fresh processes per command")
    args = parser.parse_args(argv)
    cases = commands()
    # warm up (files in the page cache); a command that fails is left out
    cases = {name: command for name, command in cases.items() if run_once(command) is not None}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, command in cases.items():
            if (seconds := run_once(command)) is not None:
                times[name].append(seconds)
    print(f"median (fastest) of {args.repeats} fresh processes, interleaved:")
    for name, values in times.items():
        median = statistics.median(values)
        verdict = ""
        if name.startswith("histohub "):
            verdict = "  ok" if median < TARGET_SECONDS else f"  over {TARGET_SECONDS} s"
        print(f"  {name:<40} {median * 1000:7.0f} ms ({min(values) * 1000:.0f}){verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
