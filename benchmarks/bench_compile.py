"""What ``torch.compile`` costs and saves for ResNet18 on this CPU: the basis of
``histohub.hub._runner.COMPILE_MIN_PATCHES`` (the job size at which ``compile="auto"``
compiles).

Not a test. In one process (glibc allocator tuned, channels_last, batch ``--batch``): a
matrix-multiply probe, the first call of the compiled model (compile time; with an empty
inductor cache unless ``--warm``), a second ``torch.compile`` of the same model (what a
per-slide recompile would cost), then eager and compiled interleaved for ``--rounds``,
and the probe again. Prints JSON: images/s, their ratio and the break-even job size
``compile_s / (1/eager - 1/compiled)``.

Usage: ``python benchmarks/bench_compile.py [--rounds 4] [--batch 64] [--warm]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from _probes import matmul_gflops


def probe_gflops() -> float:
    """fp32 2048^3 matrix multiply rate: tells a slow spell of the machine."""
    return matmul_gflops(2048, repeats=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warm", action="store_true",
                        help="keep inductor's on-disk cache (default: an empty one)")
    args = parser.parse_args()
    if not args.warm:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    import torch

    from histohub._features import tune_allocator
    from histohub.hub._archs import build_encoder

    tune_allocator()
    torch.manual_seed(0)
    model = build_encoder("resnet18").eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    out = {"probe_gflops_before": round(probe_gflops(), 1)}

    def first_call(compiled) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        return time.perf_counter() - start

    compiled = torch.compile(model, dynamic=False)
    out["compile_s"] = round(first_call(compiled), 2)
    out["compile_again_same_model_s"] = round(first_call(torch.compile(model, dynamic=False)), 2)

    def rate(module) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            for _ in range(3):
                module(x)
        return 3 * args.batch / (time.perf_counter() - start)

    rate(model)
    eager, fast = [], []
    for _ in range(args.rounds):
        eager.append(rate(model))
        fast.append(rate(compiled))
    e, c = statistics.median(eager), statistics.median(fast)
    out.update(eager_img_s=[round(v, 1) for v in eager], compiled_img_s=[round(v, 1) for v in fast],
               ratio=round(c / e, 3), break_even_patches=round(out["compile_s"] / (1 / e - 1 / c)),
               probe_gflops_after=round(probe_gflops(), 1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
