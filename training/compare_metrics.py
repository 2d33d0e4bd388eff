#!/usr/bin/env python
"""Print the benchmark metrics two manifest entries record, side by side.

    python training/compare_metrics.py resnet18-ssl-mini runs/x/export/manifest.json rerun

The first entry is read from histohub's shipped manifest, the second from the given
manifest file (e.g. a retrained model's export). Used by ``reproduce_bundled.sh`` to show
how far a rerun lands from the numbers the manifest ships.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import histohub


def recorded_metrics(manifest: Path, name: str) -> dict:
    models = histohub.hub.read_manifest_json(manifest)["models"]
    if name not in models:
        raise SystemExit(f"error: {manifest} has no model {name!r} (it has {sorted(models)})")
    return models[name].get("metrics", {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shipped", help="a model of histohub's own manifest")
    parser.add_argument("manifest", type=Path, help="the other entry's manifest file")
    parser.add_argument("other", help="the other entry's name")
    args = parser.parse_args(argv)
    shipped = recorded_metrics(histohub.hub.MANIFEST_PATH, args.shipped)
    other = recorded_metrics(args.manifest, args.other)
    print(f"{'metric':<34} {args.shipped:>22} {args.other:>22} {'difference':>11}")
    for key in sorted(set(shipped) | set(other)):
        a, b = shipped.get(key), other.get(key)
        if not isinstance(a, dict) or not isinstance(b, dict) or "mean" not in a:
            print(f"{key:<34} {'-' if a is None else str(a):>22} {'-' if b is None else str(b):>22}")
            continue
        label = f"{key} ({a['metric']})"
        print(f"{label:<34} {a['mean']:>14.3f} +- {a['std']:.3f} {b['mean']:>14.3f} +- "
              f"{b['std']:.3f} {b['mean'] - a['mean']:>+11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
