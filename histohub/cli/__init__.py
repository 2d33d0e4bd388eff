"""The ``histohub`` command: one sub-command module per job, imported only when used.

Each module in ``COMMANDS`` defines ``register(subparsers)``, which adds its parsers and
sets ``func`` (taking the parsed ``argparse.Namespace``, returning an exit code).
Modules import torch, torchvision and the slide libraries only inside the command that
needs them, so ``histohub --help`` and ``histohub list`` answer without loading torch
(``benchmarks/bench_cli.py`` measures it).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from histohub._version import __version__
from histohub.errors import HistohubError
from histohub.hub._redact import RedactingFilter, redact

COMMANDS = ["histohub.cli._models", "histohub.cli._hub", "histohub.cli._extract",
            "histohub.cli._cluster", "histohub.cli._demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histohub",
        description="Self-supervised histopathology encoders: weights, features, clusters.")
    parser.add_argument("--version", action="version", version=f"histohub {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:  # no credentials in any log line
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    try:
        return int(args.func(args) or 0)
    except HistohubError as error:
        print(f"histohub {args.command}: error: {redact(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"histohub {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
