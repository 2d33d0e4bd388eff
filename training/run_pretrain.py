#!/usr/bin/env python
"""SimCLR pretraining with the paper's recipe (Ciga, Xu & Martel 2022; see training/README.md).

    python training/run_pretrain.py --config cpu_resnet18 --out runs/cpu \\
        'data.datasets=["/data/tiles", "slides:/data/wsis"]'
    torchrun --nproc_per_node=4 training/run_pretrain.py --config paper_resnet18 --out runs/p ...
    python training/run_pretrain.py --resume --out runs/cpu

Overrides are ``key=value`` with dotted keys (``optim.name=lamb``, ``augment.jitter=heavy``,
``epochs=10``); values are JSON where they parse.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from histohub_training.cli_errors import run_reporting_errors
from histohub_training.simclr.config import load_config
from histohub_training.simclr.train import resume_config, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="SimCLR pretraining (paper sections 3, 5.4, Appendix C).",
        epilog="Configs: paper_resnet18 (the paper's recipe), cpu_resnet18 (real runs on a CPU), "
               "smoke (seconds, for tests). Example override: 'data.datasets=[\"/data/tiles\"]'.")
    parser.add_argument("--config", help="config name under training/configs/ or a JSON path")
    parser.add_argument("--out", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_reporting_errors(run, args)


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say; returns the exit code."""
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out (the run folder to continue)")
        config = resume_config(args.out, args.overrides)
    else:
        if not args.config:
            raise ValueError("give --config NAME (paper_resnet18, cpu_resnet18, smoke) or a "
                             "JSON path")
        config = load_config(args.config, args.overrides)
    out = args.out or str(Path("runs") / config.name)
    losses = train(config, out, resume=args.resume, progress=not args.no_progress)
    if losses and int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger("simclr").info("done: %d steps, last loss %.4f; checkpoint in %s",
                                         len(losses), losses[-1], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
