#!/usr/bin/env python
"""Compare the benchmark metrics two manifest entries record, against their spread.

    python training/compare_metrics.py resnet18-ssl-mini runs/x/export/manifest.json rerun

The first entry is read from histohub's shipped manifest (or ``--shipped-manifest``), the
second from the given manifest file (e.g. a retrained model's export). For every metric
and label fraction it prints both means ± sd (n) and the difference, and says whether the
difference is within the recorded spread: ``|difference| <= max(sd, sd')``, the larger of
the two standard deviations over cross-validation folds x repeats. Exit code 0 when every
difference is within it, 1 when a metric moved by more (or has no spread recorded: n < 2,
or is missing on one side), 2 for bad input. Used by ``reproduce_bundled.sh``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import histohub
from histohub_training.cli_errors import run_reporting_errors


@dataclass(frozen=True)
class Verdict:
    """One metric at one label fraction: the two recorded values and what they say."""

    key: str
    fraction: str
    a: dict | None
    b: dict | None

    @property
    def spread(self) -> float | None:
        """The larger recorded sd, or None when a side is missing or has n < 2."""
        if self.a is None or self.b is None or min(_n(self.a), _n(self.b)) < 2:
            return None
        return max(self.a["std"], self.b["std"])

    @property
    def difference(self) -> float | None:
        return None if self.a is None or self.b is None else self.b["mean"] - self.a["mean"]

    @property
    def within(self) -> bool:
        return self.spread is not None and abs(self.difference) <= self.spread

    def words(self) -> str:
        if self.a is None or self.b is None:
            return "MISSING on one side"
        if self.spread is None:
            return "NO SPREAD recorded (n < 2): cannot tell"
        return "within noise" if self.within else f"MOVED by more than sd {self.spread:.3f}"


def _n(stats: dict) -> int:
    return int(stats.get("n", 0))


def recorded_metrics(manifest: Path, name: str) -> dict:
    """The ``metrics`` of entry ``name`` of the manifest at ``manifest``."""
    models = histohub.hub.read_manifest_json(manifest)["models"]
    if name not in models:
        raise ValueError(f"{manifest} has no model {name!r} (it has {sorted(models)})")
    return models[name].get("metrics", {})


def _by_fraction(item: dict) -> dict[str, dict]:
    """``{fraction: {mean, std, n}}`` of a benchmark metric (older entries: the headline)."""
    if "by_fraction" in item:
        return {f: {"n": item.get("n", 0), **s} for f, s in item["by_fraction"].items()}
    return {f"{item.get('label_fraction', 1):g}": item}


def verdicts(shipped: dict, other: dict) -> list[Verdict]:
    """Every benchmark metric (an item with a ``mean``) and fraction of either side."""
    found = []
    for key in sorted(set(shipped) | set(other)):
        a, b = shipped.get(key), other.get(key)
        if not any(isinstance(x, dict) and "mean" in x for x in (a, b)):
            continue
        fa = _by_fraction(a) if isinstance(a, dict) else {}
        fb = _by_fraction(b) if isinstance(b, dict) else {}
        for fraction in sorted(set(fa) | set(fb), key=float):
            found.append(Verdict(key, fraction, fa.get(fraction), fb.get(fraction)))
    return found


def _cell(stats: dict | None) -> str:
    return "-" if stats is None else f"{stats['mean']:.3f} ± {stats['std']:.3f} ({_n(stats)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shipped", help="a model of histohub's own manifest")
    parser.add_argument("manifest", type=Path, help="the other entry's manifest file")
    parser.add_argument("other", help="the other entry's name")
    parser.add_argument("--shipped-manifest", type=Path, default=histohub.hub.MANIFEST_PATH,
                        help="where the first entry is (default: histohub's own manifest)")
    return run_reporting_errors(run, parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Print the comparison; returns 0 when every metric is within its spread, else 1."""
    shipped = recorded_metrics(args.shipped_manifest, args.shipped)
    other = recorded_metrics(args.manifest, args.other)
    found = verdicts(shipped, other)
    if not found:
        raise ValueError(f"neither {args.shipped!r} nor {args.other!r} records a benchmark "
                         "metric; run training/run_benchmark.py --record-manifest first")
    print(f"{'metric':<26} {'labels':>6} {args.shipped[:24]:>24} {args.other[:24]:>24} "
          f"{'difference':>10}  verdict (mean ± sd (n))")
    for v in found:
        diff = "-" if v.difference is None else f"{v.difference:+.3f}"
        print(f"{v.key:<26} {float(v.fraction) * 100:>5g}% {_cell(v.a):>24} {_cell(v.b):>24} "
              f"{diff:>10}  {v.words()}")
    for key in sorted(k for k in set(shipped) | set(other)
                      if not isinstance(shipped.get(k, other.get(k)), dict)):
        print(f"{key:<26} {'':>6} {shipped.get(key, '-')!s:>24} {other.get(key, '-')!s:>24}")
    moved = [f"{v.key} at {float(v.fraction) * 100:g}%" for v in found if not v.within]
    print(f"{len(found) - len(moved)} of {len(found)} within the recorded spread"
          + (f"; not within: {', '.join(moved)}" if moved else ""))
    return 1 if moved else 0


if __name__ == "__main__":
    sys.exit(main())
