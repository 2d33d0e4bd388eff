"""Images/s of zoo architectures on this machine's CPU, the model alone (random weights:
speed does not depend on them). Prints a Markdown table.

    python benchmarks/zoo_throughput.py --arch vit-s16 --arch resnet50 --batch 8 --repeats 2
"""

from __future__ import annotations

import argparse
import time

import torch

from histohub.hub._archs import FEATURE_DIMS, build_encoder
from histohub.hub._zoo_archs import ZOO_ARCHS, build_vit


def images_per_second(arch: str, *, size: int, batch: int, repeats: int) -> float:
    model = (build_vit(arch) if arch in ZOO_ARCHS else build_encoder(arch)).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(x)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", action="append", required=True,
                        choices=sorted(ZOO_ARCHS) + sorted(FEATURE_DIMS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"| Architecture | images/s (CPU, {torch.get_num_threads()} threads, batch "
          f"{args.batch}, {args.size} px) |\n|---|---|")
    for arch in args.arch:
        rate = images_per_second(arch, size=args.size, batch=args.batch, repeats=args.repeats)
        print(f"| {arch} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
