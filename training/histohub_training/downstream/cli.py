"""``training/run_benchmark.py``: one command per (task, dataset) that writes the tables.

    python training/run_benchmark.py --model random --model CKPT_OR_NAME \\
        --task linear --data kather2016 --out outputs/bench
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from histohub.files import write_text_atomic
from histohub_training.cli_errors import run_reporting_errors
from histohub.hub import record_metrics

from . import datasets as ds
from .encoders import resolve_encoders
from .linear import PROBES
from .protocols import TASKS, Protocol, prepare, protocol_json, run_protocol
from .report import (environment, load_runs, manifest_metrics, markdown_tables, plot_fractions,
                     write_json)
from .splits import CV_FOLDS, CV_REPEATS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_benchmark.py",
        description="Downstream benchmarks of Ciga et al. (section 4.2): linear probe, "
                    "fine-tuning, regression, segmentation, clustering. Writes a JSON per "
                    "run, paper-style tables and label-fraction plots under --out.")
    parser.add_argument("--model", action="append", required=True, metavar="NAME_OR_PATH",
                        help="a manifest name, a local checkpoint, 'random' or 'imagenet' "
                             "(optionally ':ARCH'); repeat to compare")
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--data", required=True,
                        help=f"a preset ({', '.join(sorted(ds.PRESETS))}), a folder "
                             "(one folder per class; image/ + label/ for masks) or a CSV "
                             "(path,label / path,score / path,mask [,group])")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder holding the presets (default $HISTOHUB_BENCH_DATA or "
                             "../shared/data)")
    parser.add_argument("--name", default=None, help="dataset name in tables (default: "
                        "preset, folder or CSV name)")
    parser.add_argument("--group-pattern", default=None,
                        help="regex on each image's relative path; group 1 (or the match) "
                             "is its group: a group never straddles splits")
    parser.add_argument("--group-column", default=None, help="CSV column holding groups")
    parser.add_argument("--no-groups", action="store_true",
                        help="ignore the preset's grouping (plain stratified split)")
    parser.add_argument("--label-from", choices=("top", "parent"), default=None,
                        help="class = first folder under the root (top) or the folder "
                             "holding the file (parent)")
    parser.add_argument("--fractions", default="5,10,20,50,100",
                        help="label fractions in percent (default: the paper's 5,10,20,50,100)")
    parser.add_argument("--folds", type=int, default=CV_FOLDS,
                        help=f"(grouped) cross-validation folds (default {CV_FOLDS}; at least "
                             "3: test, validation and training folds); 1: a 50/25/25 split "
                             "per repeat")
    parser.add_argument("--repeats", type=int, default=CV_REPEATS,
                        help=f"reshuffles of the folds (default {CV_REPEATS}); every number "
                             "is a mean ± sd over folds x repeats runs per label fraction")
    parser.add_argument("--probe", choices=PROBES, default="converged",
                        help="how linear / frozen regression train their linear layer: "
                             "'converged' (default): logistic regression (scikit-learn's "
                             "C = 1) by L-BFGS to convergence, ridge regression with its L2 "
                             "chosen on validation; 'paper': Adam, batch 128, 100 epochs, "
                             "weight decay 1e-5/1e-4, the best validation epoch")
    parser.add_argument("--epochs", type=int, default=100,
                        help="default 100 (paper); not used by the converged probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 128 (paper); 16 for segmentation; not used by the "
                             "converged probe")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Adam learning rate; not used by the converged probe")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="default: 1e-5 for ResNet18, 1e-4 otherwise (paper); not used "
                             "by the converged probe")
    parser.add_argument("--input-size", type=int, default=None,
                        help="resize every image to this many px (default: each model's; "
                             "random and imagenet take the other models')")
    parser.add_argument("--finetune", action="store_true",
                        help="regression: train all layers instead of a linear layer")
    parser.add_argument("--augment", action="store_true",
                        help="fine-tuning / segmentation: random flips and 90-degree turns")
    parser.add_argument("--max-images", type=int, default=None,
                        help="use a stratified subset of this many images (quick runs)")
    parser.add_argument("--arch", default="resnet18",
                        help="architecture of random/imagenet when no other model fixes it")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark"))
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="feature cache (default OUT/features)")
    parser.add_argument("--record-manifest", type=Path, default=None, metavar="MANIFEST",
                        help="write the numbers into 'metrics' of a model's entry in this "
                             "manifest JSON")
    parser.add_argument("--record-name", default=None,
                        help="the manifest entry to record into (default: the model's name; "
                             "needed when the model is a checkpoint)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def parse_fractions(text: str) -> tuple[float, ...]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--fractions takes percentages like 5,10,20,50,100, got {text!r}") \
            from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise ValueError(f"--fractions are percentages in (0, 100], got {text!r}")
    return tuple(v / 100 for v in values)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_reporting_errors(run, args, argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    started = datetime.now(timezone.utc)
    wall = time.perf_counter()
    protocol = Protocol(
        task=args.task, fractions=parse_fractions(args.fractions) if args.task != "clustering"
        else (1.0,), repeats=args.repeats, folds=args.folds, epochs=args.epochs, seed=args.seed,
        probe=args.probe, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, input_size=args.input_size, finetune=args.finetune,
        augment=args.augment, device=args.device, progress=not args.quiet,
        cache_dir=str(args.cache_dir or args.out / "features"))
    dataset = ds.load_dataset(args.data, root=args.data_root, name=args.name,
                              group_pattern=args.group_pattern, group_column=args.group_column,
                              label_from=args.label_from)
    if args.no_groups:
        dataset = replace(dataset, groups=None)
    dataset = prepare(dataset, args.task)
    if args.max_images:
        dataset = _subsample(dataset, args.max_images, args.task, args.seed)
    encoders, skipped = resolve_encoders(args.model, default_arch=args.arch, seed=args.seed,
                                         progress=not args.quiet)
    for item in skipped:
        print(f"note: {item.spec} skipped: {item.reason}", file=sys.stderr)
    if not encoders:
        raise ValueError("No model could be loaded; nothing to benchmark")
    outcome = run_protocol(encoders, dataset, protocol)
    finished = datetime.now(timezone.utc)
    record = {
        "schema": "histohub-benchmark/1", "task": args.task, "argv": argv,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": finished.isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - wall, 3),
        "dataset": _describe_dataset(dataset, args), "data_hash": outcome["data_hash"],
        "models": [{**e.describe(), "input_size_used": protocol.size(e)} for e in encoders],
        "skipped": [{"spec": s.spec, "reason": s.reason} for s in skipped],
        "protocol": protocol_json(protocol), "split": outcome["split"],
        "results": outcome["results"], "timings": outcome["timings"],
        "environment": environment(),
    }
    stamp = finished.strftime("%Y%m%dT%H%M%S%fZ")
    path = args.out / "runs" / f"{args.task}_{dataset.name}_{stamp}.json"
    record["file"] = path.name
    write_json(path, record)
    runs = load_runs(args.out)
    write_text_atomic(args.out / "tables.md", markdown_tables(runs))
    plots = plot_fractions(runs, args.out)
    if args.record_manifest:
        _record(args, record, encoders)
    print(f"run: {path}\ntables: {args.out / 'tables.md'}" +
          "".join(f"\nplot: {p}" for p in plots))
    print(_summary_lines(record))
    return 0


def _subsample(dataset: ds.ImageDataset, count: int, task: str, seed: int) -> ds.ImageDataset:
    """A stratified subset of ``count`` images (whole groups are not kept together)."""
    import numpy as np

    from .protocols import strata_of
    from .splits import label_fractions

    if count >= len(dataset):
        return dataset
    strata = strata_of(dataset, task)
    positions = label_fractions(strata, fractions=(count / len(dataset),), repeats=1,
                                seed=seed)[(count / len(dataset), 0)]
    return dataset.subset(np.sort(positions))


def _describe_dataset(dataset: ds.ImageDataset, args: argparse.Namespace) -> dict:
    from collections import Counter

    described = {"name": dataset.name, "spec": args.data, "root": str(dataset.root),
                 "n_images": len(dataset), "max_images": args.max_images,
                 "classes": list(dataset.classes),
                 "grouped": dataset.groups is not None}
    if dataset.labels is not None:
        counts = Counter(dataset.labels.tolist())
        described["class_counts"] = {dataset.classes[c]: n for c, n in sorted(counts.items())}
    if dataset.groups is not None:
        described["n_groups"] = len(set(dataset.groups.tolist()))
        described["group_pattern"] = args.group_pattern or (
            ds.PRESETS[ds.preset_name(args.data)].group_pattern
            if ds.preset_name(args.data) else None)
    if dataset.scores is not None:
        described["scores"] = {"min": float(dataset.scores.min()),
                               "max": float(dataset.scores.max()),
                               "mean": float(dataset.scores.mean())}
    return described


def _record(args: argparse.Namespace, record: dict, encoders) -> None:
    labels = [e.label for e in encoders]
    if args.record_name in labels:
        label = args.record_name
    else:
        trained = [e.label for e in encoders if e.kind in ("self-supervised", "checkpoint")]
        if len(trained) != 1:
            raise ValueError(f"--record-manifest: say which model with --record-name (one of "
                             f"{labels})")
        label = trained[0]
    name = args.record_name or label
    record_metrics(args.record_manifest, name, manifest_metrics(record, label))
    print(f"recorded {record['task']}/{record['dataset']['name']} of {label} in "
          f"{args.record_manifest} [{name}]")


def _summary_lines(record: dict) -> str:
    lines = []
    for label, result in record["results"].items():
        metric = result["metric"]
        parts = [f"{float(f) * 100:g}%: {s[metric]['mean']:.4f} ± {s[metric]['std']:.4f} "
                 f"(n={s[metric]['n']})"
                 for f, s in sorted(result["summary"].items(), key=lambda kv: float(kv[0]))]
        lines.append(f"{label} [{metric}] " + ", ".join(parts))
    return "\n".join(lines)
