"""Warm-cache ``load_pretrained`` against its floor, and the cost of ``import histohub``.

Not a test: it prints ratios measured in one run, A and B interleaved (the machines this
runs on have slow spells, which interleaving spreads over A and B alike).

1. Warm-cache load. Random ResNet18 weights are written as (a) backbone-only safetensors
   and (b) a ``.ckpt`` in the upstream plain-PyTorch layout (``state_dict`` with
   ``model.resnet.`` keys and the SimCLR projection head ``fc.1``/``fc.3``). A temporary
   manifest (``HISTOHUB_MANIFEST``) pins both by sha256 and size, and a temporary
   ``HISTOHUB_HOME`` is filled once. Then, interleaved, each round times
     floor: ``torchvision.models.resnet18()`` + ``safetensors.torch.load_file`` +
            ``load_state_dict`` (fc = Identity, eval mode),
     ``histohub.load_pretrained(<safetensors entry>)``,
     ``histohub.load_pretrained(<ckpt entry>)``,
   in a rotating order. Target: median ratio to the floor <= 1.10.
2. ``import histohub`` beyond ``import torch, torchvision``: each fresh interpreter imports
   torch and torchvision, then histohub, timing the second step. Target: median < 50 ms.

Usage: ``python benchmarks/bench_load.py [--rounds 15] [--imports 7]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _write_weights(folder: Path) -> dict[str, Path]:
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    backbone = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
                if not k.startswith("fc.")}
    paths = {"safetensors": folder / "bench_resnet18.safetensors",
             "ckpt": folder / "bench_native_resnet18.ckpt"}
    save_file({k: v.contiguous() for k, v in backbone.items()}, paths["safetensors"])
    state = {f"model.resnet.{k}": v for k, v in backbone.items()}
    state.update({"model.resnet.fc.1.weight": torch.randn(512, 512),
                  "model.resnet.fc.1.bias": torch.randn(512),
                  "model.resnet.fc.3.weight": torch.randn(128, 512),
                  "model.resnet.fc.3.bias": torch.randn(128)})
    torch.save({"state_dict": state}, paths["ckpt"])
    return paths


def _manifest(paths: dict[str, Path], folder: Path) -> Path:
    def entry(path: Path, format: str, key_map: dict) -> dict:
        data = path.read_bytes()
        return {
            "description": "benchmark weights (random)", "arch": "resnet18", "feature_dim": 512,
            "weights": [{"filename": path.name, "format": format,
                         "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                         "sources": [{"url": path.as_uri()}], "key_map": key_map}],
            "preprocessing": {"input_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3},
            "license": "MIT", "citation": "-", "recipe": {}, "training_data": "-",
            "metrics": {},
        }

    upstream = {"state_dict_key": "state_dict", "strip_prefixes": ["model.resnet."],
                "drop": ["^fc\\."]}
    manifest = {"schema_version": 1, "models": {
        "bench-safetensors": entry(paths["safetensors"], "safetensors", {}),
        "bench-ckpt": entry(paths["ckpt"], "torch", upstream),
    }}
    path = folder / "bench_manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _floor(path: Path) -> torch.nn.Module:
    import torchvision
    from safetensors.torch import load_file

    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(load_file(path))
    return model.eval()


def _time(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def bench_load(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="histohub-bench-") as tmp:
        folder = Path(tmp)
        paths = _write_weights(folder)
        os.environ["HISTOHUB_HOME"] = str(folder / "home")
        os.environ["HISTOHUB_MANIFEST"] = str(_manifest(paths, folder))
        os.environ.pop("HISTOHUB_OFFLINE", None)
        os.environ.pop("HISTOHUB_MIRROR", None)
        import histohub
        from histohub.hub import _fetch  # the cache-hit path itself, timed below

        cases = {
            "floor": lambda: _floor(paths["safetensors"]),
            "load_pretrained safetensors": lambda: histohub.load_pretrained(
                "bench-safetensors", progress=False),
            "load_pretrained .ckpt (torch)": lambda: histohub.load_pretrained(
                "bench-ckpt", progress=False),
        }
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():  # same weights, same features: the comparison is fair
            reference = cases["floor"]()(x)
            for name in list(cases)[1:]:
                torch.testing.assert_close(cases[name]()(x), reference, rtol=0, atol=0)
        for function in cases.values():  # warm up: cache filled, page cache hot
            function()

        times: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for round_ in range(rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                times[name].append(_time(cases[name]))

        floor = statistics.median(times["floor"])
        print(f"Warm-cache load, {rounds} interleaved rounds, medians "
              f"(torch threads {torch.get_num_threads()}):")
        print(f"  {'floor: resnet18() + load_file + load_state_dict':<50}{floor * 1e3:8.1f} ms")
        for name in names[1:]:
            median = statistics.median(times[name])
            per_round = statistics.median(t / f for t, f in zip(times[name], times["floor"]))
            verdict = "ok" if median / floor <= 1.10 else "ABOVE TARGET"
            print(f"  {name:<50}{median * 1e3:8.1f} ms   ratio {median / floor:.2f} "
                  f"(per-round median {per_round:.2f}; target <= 1.10: {verdict})")

        entry = histohub.get_entry("bench-ckpt")
        hit = [_time(lambda: _fetch.fetch_weights(entry, progress=False))
               for _ in range(200)]
        digest = [_time(lambda: histohub.hub.sha256_file(paths["ckpt"])) for _ in range(5)]
        size_mb = paths["ckpt"].stat().st_size / 1e6
        print(f"  of which the verified cache hit (fetch_weights): "
              f"{statistics.median(hit) * 1e6:.0f} us; re-hashing the {size_mb:.0f} MB file "
              f"instead would cost {statistics.median(digest) * 1e3:.1f} ms")


_IMPORT_PROBE = """
import time
t0 = time.perf_counter()
import torch, torchvision
t1 = time.perf_counter()
import histohub
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def bench_import(repeats: int) -> None:
    base, extra = [], []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True,
                             text=True, check=True).stdout.split()
        base.append(float(out[0]))
        extra.append(float(out[1]))
    median = statistics.median(extra)
    verdict = "ok" if median < 0.050 else "ABOVE TARGET"
    print(f"import histohub after import torch, torchvision ({repeats} fresh processes, "
          f"medians): {median * 1e3:.1f} ms beyond {statistics.median(base) * 1e3:.0f} ms "
          f"(min {min(extra) * 1e3:.1f}, max {max(extra) * 1e3:.1f}; target < 50 ms: "
          f"{verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--imports", type=int, default=7)
    args = parser.parse_args()
    bench_load(args.rounds)
    bench_import(args.imports)


if __name__ == "__main__":
    main()
