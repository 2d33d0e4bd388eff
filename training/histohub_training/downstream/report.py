"""Outputs of a benchmark: run JSON, paper-style Markdown tables, fraction plots, manifest.

Layout under ``--out``::

    runs/<task>_<dataset>_<UTC time>.json   one per run: models + sha256, data hash, split,
                                             seeds, protocol, versions, every run's metrics
    tables.md                                Table 1 / D.7-style tables (all runs in runs/)
    plots/<task>_fractions.png               metric vs label fraction, mean +- std (Figs. 3-4)
    features/<key>.safetensors               the feature cache (keyed by model, data, preprocessing)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from histohub.files import atomic_path, write_text_atomic

from .encoders import KIND_LABELS
from .protocols import scheme_of

KIND_ORDER = ("random", "imagenet", "self-supervised", "checkpoint")
METRIC_TITLES = {"macro_f1": "macro F1 [%]", "l1": "L1 [0-100]", "nmi": "NMI [%]"}
TASK_TITLES = {
    "linear": "Linear layer on frozen features (Table 2 / D.8)",
    "finetune": "Fine-tuning, all layers (Table 1 / D.7)",
    "regression": "Regression, L1 on a 0-100 score (Tables 1-2, Reg.)",
    "segmentation": "Segmentation, UNet with the pretrained encoder (Table 1 / D.7, Seg.)",
    "clustering": "k-means clustering of frozen features (section 5.3)",
}
PROBE_NOTES = {
    "converged": "the converged probe (logistic regression, scikit-learn's C = 1, by L-BFGS; "
                 "ridge regression with its L2 strength chosen on validation)",
    "paper": "the paper's probe (Adam, batch 128, weight decay 1e-5 / 1e-4, 100 epochs, "
             "best validation epoch)",
}


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def environment() -> dict:
    """Versions and machine facts that a rerun should match."""
    import numpy
    import sklearn
    import torch
    import torchvision

    import histohub

    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "torchvision": torchvision.__version__, "numpy": numpy.__version__,
                "scikit-learn": sklearn.__version__, "histohub": histohub.__version__}
    try:
        import segmentation_models_pytorch as smp
        versions["segmentation-models-pytorch"] = smp.__version__
    except ImportError:
        pass
    return {"versions": versions, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "git_commit": _git_commit()}


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def load_runs(out_dir: Path) -> list[dict]:
    """Every run JSON under ``out_dir/runs``, oldest first."""
    runs = []
    for path in sorted((Path(out_dir) / "runs").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        record["_file"] = path.name
        runs.append(record)
    return sorted(runs, key=lambda r: r.get("finished_utc", ""))


def latest(runs: list[dict]) -> dict[tuple[str, str], dict[str, tuple[dict, dict]]]:
    """``{(task, dataset): {model label: (run record, model result)}}``, latest run wins."""
    table: dict[tuple[str, str], dict[str, tuple[dict, dict]]] = defaultdict(dict)
    for run in runs:
        key = (run["task"], run["dataset"]["name"])
        for model in run["models"]:
            if model["label"] in run["results"]:
                table[key][model["label"]] = (run, model)
    return table


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------

def probe_of(run: dict) -> str | None:
    """The probe that trained a run's linear layer on frozen features (None: no such
    layer); runs recorded before probes were named used the paper's."""
    protocol = run.get("protocol", {})
    if "probe" in protocol:
        return protocol["probe"]
    frozen = run["task"] in ("linear", "regression") and not protocol.get("finetune")
    return "paper" if frozen else None


def headline(result: dict) -> tuple[str, dict] | None:
    """``(fraction key, summary)`` at 100% labels (or the largest fraction run)."""
    summary = result.get("summary") or {}
    if not summary:
        return None
    fraction = max(summary, key=float)
    return fraction, summary[fraction]


def _format(metric: str, stats: dict) -> str:
    scale = 1.0 if metric == "l1" else 100.0
    mean, std = stats["mean"] * scale, stats["std"] * scale
    return f"{mean:.1f} ± {std:.1f}" if stats.get("n", 1) > 1 else f"{mean:.1f}"


def markdown_tables(runs: list[dict]) -> str:
    """One paper-style table per task (rows: Random / ImageNet / Self-supervised per
    architecture; columns: datasets and their average), then metric by label fraction."""
    grid = latest(runs)
    lines = ["# Benchmark results", "",
             "Test metrics (of the model chosen on validation where the protocol chooses: "
             "best epoch or L2 strength), mean ± standard deviation over the splits each "
             "table names (n runs per cell: folds x repeats; written by "
             "`training/run_benchmark.py`; see `runs/*.json` for every number, seed and "
             "hash).", ""]
    for task in [t for t in TASK_TITLES if any(k[0] == t for k in grid)]:
        lines += _task_table(task, grid, runs) + [""] + _fraction_table(task, grid) + [""]
    return "\n".join(lines).rstrip() + "\n"


def _rows(task: str, grid) -> tuple[list[str], list[tuple[str, str, str]], str]:
    datasets = sorted(d for t, d in grid if t == task)
    models: dict[str, dict] = {}
    metric = "macro_f1"
    for dataset in datasets:
        for label, (run, model) in grid[(task, dataset)].items():
            models.setdefault(label, model)
            metric = run["results"][label]["metric"]
    rows = sorted(((m["arch"], m["kind"], label) for label, m in models.items()),
                  key=lambda r: (int(r[0].removeprefix("resnet")), KIND_ORDER.index(r[1]), r[2]))
    return datasets, rows, metric


def _task_table(task: str, grid, runs: list[dict]) -> list[str]:
    datasets, rows, metric = _rows(task, grid)
    fractions = {headline(grid[(task, d)][label][0]["results"][label])[0]
                 for d in datasets for label in grid[(task, d)]}
    label_note = ", ".join(f"{float(f) * 100:g}%" for f in sorted(fractions, key=float))
    caption = (f"Test {METRIC_TITLES.get(metric, metric)} with {label_note} of the training "
               "labels." if task != "clustering" else
               f"{METRIC_TITLES.get(metric, metric)} of k-means (k = number of classes) on "
               "every image's features, against the labels; ± over k-means seeds.")
    lines = [f"## {TASK_TITLES[task]}", "",
             caption + _probe_note(task, grid, datasets) + _spread_note(task, grid, datasets),
             "",
             "| R | Pretraining | " + " | ".join(datasets) + " | Average |",
             "|---|---|" + "---|" * (len(datasets) + 1)]
    skipped = {s["spec"]: s["reason"] for run in runs if run["task"] == task
               for s in run.get("skipped", [])}
    run_labels = {label for _, _, label in rows}
    for spec in skipped:   # a model that could not be had still gets its row
        kind, _, arch = spec.partition(":")
        if kind in KIND_ORDER and arch and f"{kind}-{arch}" not in run_labels:
            rows.append((arch, kind, f"{kind}-{arch}"))
    rows.sort(key=lambda r: (int(r[0].removeprefix("resnet")), KIND_ORDER.index(r[1]), r[2]))
    previous_arch = None
    for arch, kind, label in rows:
        if label not in run_labels:
            r = arch.removeprefix("resnet") if arch != previous_arch else ""
            previous_arch = arch
            lines.append(f"| {r} | {KIND_LABELS[kind]} | " + " | ".join(
                ["n/a"] * len(datasets)) + " | n/a |")
            continue
        cells, means = [], []
        for dataset in datasets:
            entry = grid[(task, dataset)].get(label)
            if entry is None:
                cells.append("–")
                continue
            _, stats = headline(entry[0]["results"][label])
            cells.append(_format(metric, stats[metric]))
            means.append(stats[metric]["mean"])
        average = (_format(metric, {"mean": sum(means) / len(means), "std": 0, "n": 1})
                   if len(means) == len(datasets) else "–")
        name = f"{KIND_LABELS[kind]} ({label})"
        if kind in ("random", "imagenet") and label == f"{kind}-{arch}":
            name = KIND_LABELS[kind]
        r = arch.removeprefix("resnet") if arch != previous_arch else ""
        previous_arch = arch
        lines.append(f"| {r} | {name} | " + " | ".join(cells) + f" | {average} |")
    for dataset in datasets:
        references = [e[0]["results"][lab].get("reference", {}).get(
            "l1_predicting_training_mean") for lab, e in grid[(task, dataset)].items()]
        if any(r is not None for r in references):
            value = next(r for r in references if r is not None)
            lines.append(f"\n{dataset}: predicting the training mean for every test image "
                         f"gives L1 {value:.1f}.")
    for spec, reason in skipped.items():
        lines.append(f"\nn/a: `{spec}` was not run: {reason}")
    return lines


def _spread_note(task: str, grid, datasets: list[str]) -> str:
    """The caption's sentence saying what each ± is over, and n."""
    if task == "clustering":
        return ""
    schemes = sorted({f"{scheme_of(run.get('protocol', {}))}, n = {_runs_per_cell(run, label)}"
                      for dataset in datasets
                      for label, (run, _) in grid[(task, dataset)].items()})
    return (" Mean ± sd over " + "; ".join(schemes) + " (the Average column: the mean of "
            "the datasets' means).")


def _runs_per_cell(run: dict, label: str) -> int:
    result = run["results"][label]
    return max(s[result["metric"]]["n"] for s in result["summary"].values())


def _probe_note(task: str, grid, datasets: list[str]) -> str:
    """The caption's sentence naming the probe of the table's cells (and any exception)."""
    cells = {(label, dataset): probe_of(run) for dataset in datasets
             for label, (run, _) in grid[(task, dataset)].items()}
    probes = [p for p in cells.values() if p is not None]
    if not probes:
        return ""
    usual = max(sorted(set(probes)), key=probes.count)
    others = [f"{label} on {dataset} by the {probe} probe"
              for (label, dataset), probe in sorted(cells.items())
              if probe is not None and probe != usual]
    return (f" Linear layer trained by {PROBE_NOTES.get(usual, usual)}" +
            (f"; except {', '.join(others)}" if others else "") + ".")


def _fraction_table(task: str, grid) -> list[str]:
    datasets, rows, metric = _rows(task, grid)
    lines = []
    for dataset in datasets:
        fractions = sorted({f for label in grid[(task, dataset)]
                            for f in grid[(task, dataset)][label][0]["results"][label]["summary"]},
                           key=float)
        if len(fractions) < 2:
            continue
        lines += [f"### {dataset}: {METRIC_TITLES.get(metric, metric)} by label fraction", "",
                  "| Model | " + " | ".join(f"{float(f) * 100:g}%" for f in fractions) + " |",
                  "|---|" + "---|" * len(fractions)]
        for _, _, label in rows:
            entry = grid[(task, dataset)].get(label)
            if entry is None:
                continue
            summary = entry[0]["results"][label]["summary"]
            lines.append(f"| {label} | " + " | ".join(
                _format(metric, summary[f][metric]) if f in summary else "–"
                for f in fractions) + " |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------

def plot_fractions(runs: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per task: metric vs label fraction, a panel per dataset, a line per model,
    error bars = standard deviation over repeats (the paper's Figs. 3-4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = latest(runs)
    written = []
    for task in TASK_TITLES:
        datasets, rows, metric = _rows(task, grid) if any(k[0] == task for k in grid) \
            else ([], [], "")
        datasets = [d for d in datasets if any(
            len(e[0]["results"][lab]["summary"]) > 1 for lab, e in grid[(task, d)].items())]
        if not datasets:
            continue
        figure, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6),
                                    squeeze=False)
        scale = 1.0 if metric == "l1" else 100.0
        for axis, dataset in zip(axes[0], datasets):
            for _, _, label in rows:
                entry = grid[(task, dataset)].get(label)
                if entry is None:
                    continue
                summary = entry[0]["results"][label]["summary"]
                keys = sorted(summary, key=float)
                x = [float(k) * 100 for k in keys]
                y = [summary[k][metric]["mean"] * scale for k in keys]
                err = [summary[k][metric]["std"] * scale for k in keys]
                axis.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
            axis.set_xscale("log")
            axis.set_xticks([5, 10, 20, 50, 100], ["5", "10", "20", "50", "100"])
            axis.set_xlabel("labelled training data [%]")
            axis.set_ylabel(METRIC_TITLES.get(metric, metric))
            axis.set_title(dataset)
            axis.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        figure.suptitle(TASK_TITLES[task], fontsize=10)
        figure.tight_layout()
        path = Path(out_dir) / "plots" / f"{task}_fractions.png"
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=120, format="png")
        plt.close(figure)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------

def manifest_metrics(run: dict, label: str) -> dict:
    """``{"<task>/<dataset>": {...}}``: one model's numbers as a manifest ``metrics`` item."""
    result = run["results"][label]
    fraction, stats = headline(result)
    metric = result["metric"]
    item = {
        "metric": metric, "higher_is_better": result["higher_is_better"],
        "mean": stats[metric]["mean"], "std": stats[metric]["std"], "n": stats[metric]["n"],
        "folds": run["protocol"].get("folds"), "repeats": run["protocol"].get("repeats"),
        "label_fraction": float(fraction),
        "by_fraction": {f: {"mean": s[metric]["mean"], "std": s[metric]["std"],
                            "n": s[metric]["n"]}
                        for f, s in result["summary"].items()},
        "split": f"{run['split']['kind']}, {scheme_of(run['protocol'])}",
        "spread": "std: sample standard deviation (ddof 1) of the n = folds x repeats "
                  "runs' test metrics",
        "epochs": run["protocol"]["epochs"], "data_sha256": run["data_hash"],
        "model_sha256": next(m["sha256"] for m in run["models"] if m["label"] == label),
        "run": run.get("_file") or run.get("file"), "date_utc": run["finished_utc"],
        "command": "training/run_benchmark.py " + " ".join(run["argv"]),
    }
    if probe_of(run):
        item["probe"] = probe_of(run)
    return {f"{run['task']}/{run['dataset']['name']}": item}
