#!/usr/bin/env python
"""Downstream benchmarks of the paper: linear probe, fine-tuning, regression, segmentation,
clustering. See ``training/docs/benchmarks.md``.

    python training/run_benchmark.py --model random --model path/to/encoder.safetensors \\
        --task linear --data kather2016 --out outputs/bench
"""

from __future__ import annotations

import sys

from histohub_training.downstream.cli import main

if __name__ == "__main__":
    sys.exit(main())
