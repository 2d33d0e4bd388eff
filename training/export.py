#!/usr/bin/env python
"""Export a pretraining checkpoint for histohub: backbone safetensors, manifest entry, model card.

    python training/export.py runs/cpu/checkpoint.pt --name my-resnet18-ssl \\
        --out exported/ --license "CC BY 4.0"
    HISTOHUB_MANIFEST=exported/manifest.json python -c \\
        "import histohub; print(histohub.load_pretrained('my-resnet18-ssl'))"

The projection head is dropped (it is not part of the encoder, paper section 3.1); the
backbone keys are torchvision's, checked strictly against the architecture. Every input
(the name, the folders, the manifest, the checkpoint) is checked and the entry is validated
with histohub's own manifest parser before anything is written; every file is written to a
temporary name and renamed. Nothing already there is replaced without ``--force``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from histohub.files import write_bytes_atomic, write_text_atomic
from histohub_training.cli_errors import run_reporting_errors
from histohub.hub import (FEATURE_DIMS, MANIFEST_PATH, KeyMap, build_encoder, map_state_dict,
                          parse_entry, read_checkpoint, read_manifest, read_manifest_json,
                          write_manifest_entry)
from histohub.errors import CheckpointError
from histohub_training.simclr.checkpoint import FORMAT_VERSION
from histohub_training.simclr.config import config_from_dict

PAPER_CITATION = ("Ciga O, Xu T, Martel AL. Self supervised contrastive learning for digital "
                  "histopathology. Machine Learning with Applications 7:100198 (2022). "
                  "doi:10.1016/j.mlwa.2021.100198")
#: Where ``--into-package`` puts histohub's own bundled weights.
PACKAGE_WEIGHTS = MANIFEST_PATH.parent / "weights"
BACKBONE_KEY_MAP = KeyMap(strip_prefixes=("backbone.",), drop=(r"^projection_head\.",))
#: --name: histohub's rule for model names (lower-case letters, digits, '-' and '.', first a
#: letter or digit), and no "..": the name becomes ``<out>/<name>.safetensors``.
_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]*")
MAX_NAME_LENGTH = 64


def _slide_datasets(data: dict) -> list[dict]:
    return [d for d in data["datasets"] if isinstance(d, dict) and d.get("kind") == "slides"
            or isinstance(d, str) and d.startswith("slides:")]


def _slide_scales(data: dict) -> list[float]:
    """Every resolution slide patches were stored at (um/px), sorted."""
    return sorted({d.get("mpp", data["slide_mpp"]) if isinstance(d, dict) else data["slide_mpp"]
                   for d in _slide_datasets(data)} or {data["slide_mpp"]})


def _slide_mpp(data: dict) -> float:
    """The resolution the model states for its slide patches: the one the slide datasets
    were stored at, or, where they were stored at several, ``data.slide_mpp`` when it is
    one of them (the config names the scale it was made for)."""
    values = _slide_scales(data)
    if len(values) == 1:
        return values[0]
    if data["slide_mpp"] in values:
        return data["slide_mpp"]
    raise ValueError(f"slide datasets stored at several resolutions {values}: set "
                     "data.slide_mpp to the one the model is meant to be used at")


def _other_scales(data: dict, stated: float, stored: int, size: int) -> str:
    """The mpp note's words for slide scales besides ``stated`` ("" when there are none)."""
    others = [v for v in _slide_scales(data) if v != stated]
    if not others:
        return ""
    shown = ", ".join(f"{v} ({round(v * stored / size, 3)})" for v in others)
    return (f"; also patches stored at {shown} um/px (as shown to it), so that it has seen "
            "tissue at neighbouring scales too")


def _per_slide(data: dict) -> int:
    return max((d.get("patches_per_slide", data["patches_per_slide"]) if isinstance(d, dict)
                else data["patches_per_slide"] for d in _slide_datasets(data)),
               default=data["patches_per_slide"])


def check_name(name: str) -> str:
    """``name``, if it is a safe model and file name; else ValueError saying what is."""
    if not _NAME.fullmatch(name) or ".." in name or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"--name {name[:80]!r}: use lower-case letters, digits, '-' and '.', "
                         f"starting with a letter or digit, no '..', at most "
                         f"{MAX_NAME_LENGTH} characters (e.g. my-resnet18-ssl)")
    return name


def check_folder(path: Path, option: str) -> None:
    """Refuse a folder that could not be created or written: ``path`` or the nearest
    existing folder above it is a file, or is not writable."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: no permission to write in {existing}")


def read_training_checkpoint(path: Path) -> dict:
    """A ``run_pretrain.py`` checkpoint, read as data (histohub's loader: nothing runs).

    Raises FileNotFoundError for a missing path or a folder, CheckpointError for a file
    that is not such a checkpoint, ValueError for a config histohub cannot export.
    """
    checkpoint = read_checkpoint(path, format="torch")
    missing = {"format_version", "model", "config", "epoch", "global_step"} - set(checkpoint)
    if missing or checkpoint["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a training checkpoint of run_pretrain.py (format_version "
            f"{checkpoint.get('format_version')!r}, missing {sorted(missing)}); give the "
            "checkpoint.pt of a run folder")
    arch = config_from_dict(checkpoint["config"]).model.arch  # validates the whole config
    if arch not in FEATURE_DIMS:
        raise ValueError(f"{path}: model.arch={arch!r} is not one histohub serves "
                         f"({', '.join(FEATURE_DIMS)})")
    return checkpoint


def backbone_state(checkpoint: dict, arch: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors from a training checkpoint, keys as torchvision names them."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_encoder(arch).state_dict().items()}
    state = map_state_dict(checkpoint["model"], BACKBONE_KEY_MAP, expected)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _last_loss(run_folder: Path, step: int) -> float | None:
    log_path = run_folder / "log.csv"
    if not log_path.is_file():
        return None
    with open(log_path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
    return float(rows[-1]["loss"]) if rows else None


def build_entry(checkpoint: dict, *, weights_path: Path, sha256: str, size: int,
                parameters: int, url: str | None, license: str, description: str | None,
                final_loss: float | None, data_note: str | None = None,
                package: str | None = None) -> dict[str, Any]:
    """A manifest entry (histohub's schema) describing the exported backbone."""
    config = checkpoint["config"]
    arch = config["model"]["arch"]
    summary = checkpoint.get("pool_summary", [])
    images = sum(s["selected"] for s in summary)
    slides = [s for s in summary if s["kind"] == "slides"]
    optim = config["optim"]
    augment = config["augment"]
    data = config["data"]
    slide_mpp = _slide_mpp(data)
    lr = optim["lr"]
    recipe = {
        "method": f"SimCLR (NT-Xent, temperature {optim['temperature']}), histohub training/",
        "optimizer": (f"{optim['name'].upper()}, lr {lr if lr is not None else 'paper rule'}, "
                      f"weight decay {optim['weight_decay']}, warm-up {optim['warmup_epochs']} "
                      "epochs + cosine decay"),
        "batch_size": config["batch_size"],
        "epochs": checkpoint["epoch"],
        "epochs_planned": config["epochs"],
        "image_size": config["image_size"],
        "projection_head": (f"MLP {FEATURE_DIMS[arch]}-"
                            f"{config['model']['projection_hidden_dim'] or FEATURE_DIMS[arch]}-"
                            f"{config['model']['projection_dim']} (dropped at export)"),
        "augmentations": {k: v for k, v in augment.items() if k != "on"},
        "backbone_parameters": parameters,
        "processes": checkpoint.get("world_size", 1),
        "seed": config["seed"],
        # what a bit-identical rerun must match (simclr/determinism.py); None: not recorded
        "threads": checkpoint.get("environment", {}).get("threads", config.get("threads")),
        "environment": checkpoint.get("environment"),
    }
    training_data = (f"{images} images from {len(summary)} dataset(s): "
                     + "; ".join(f"{s['name']} ({s['kind']}, {s['selected']} of "
                                 f"{s['available']})" for s in summary)
                     + f". Draw: {data['percent']}% of each dataset, min "
                       f"{data['min_per_dataset']}, max {data['max_per_dataset']} per dataset"
                     + "".join(f" ({d.get('name') or Path(d['path']).name}: max "
                               f"{d['max_images']})" for d in data["datasets"]
                               if isinstance(d, dict) and d.get("max_images") is not None)
                     + (f"; at most {_per_slide(data)} patches per slide at "
                        + ", ".join(map(str, _slide_scales(data))) + " um/px"
                        if slides else "") + "."
                     + (f" {data_note}" if data_note else ""))
    # Slide patches were stored at slide_mpp in cache_size px and views resized to
    # image_size: a whole stored patch reaches the model at slide_mpp * cache / image_size.
    stored = data.get("cache_size") or config["image_size"]
    mpp = round(slide_mpp * stored / config["image_size"], 3) if slides else None
    entry = {
        "description": description or (f"{arch} pretrained with SimCLR by histohub's training/ "
                                        f"({checkpoint['epoch']} epochs on {images} images). "
                                        f"{FEATURE_DIMS[arch]}-d pre-activation features."),
        "arch": arch,
        "feature_dim": FEATURE_DIMS[arch],
        "weights": [{
            "filename": weights_path.name, "format": "safetensors", "sha256": sha256,
            "size": size,
            "sources": [{"package": package} if package else
                        {"url": url or weights_path.resolve().as_uri()}],
            "key_map": {"state_dict_key": None, "strip_prefixes": [], "drop": []},
        }],
        "preprocessing": {
            "input_size": config["image_size"], "mean": list(data["mean"]),
            "std": list(data["std"]), "interpolation": "bilinear", "mpp": mpp,
            "mpp_note": (f"The scale the model saw: slide patches stored at "
                         f"{slide_mpp} um/px in {stored} px, shown to it at "
                         f"{config['image_size']} px"
                         + _other_scales(data, slide_mpp, stored, config["image_size"])
                         + "." if slides else
                         "Trained on image files whose resolution was not recorded."),
        },
        "license": license,
        "citation": PAPER_CITATION,
        "recipe": recipe,
        "training_data": training_data,
        "metrics": {} if final_loss is None else {"final_pretraining_loss": final_loss},
    }
    return entry


def check_manifest(path: Path, name: str, *, force: bool, shipped_ok: bool = False) -> None:
    """Refuse, before anything is written, to add ``name`` to the manifest at ``path`` (a
    new one if absent) when it is a name histohub ships (unless ``shipped_ok``: writing
    histohub's own manifest), a name the manifest lists already (unless ``force``), or the
    manifest is invalid or a folder. The entry is written by histohub's one manifest writer,
    :func:`histohub.hub.write_manifest_entry`.
    """
    if not shipped_ok and name in read_manifest(MANIFEST_PATH):
        raise ValueError(f"{name!r} is a model histohub ships; choose another --name")
    if path.is_dir():
        raise ValueError(f"--manifest {path} is a folder; give the JSON file to add to")
    if not path.exists():
        check_folder(path.parent, "--manifest")
        return
    read_manifest(path)  # refuse to extend a manifest that is already invalid
    if name in read_manifest_json(path)["models"] and not force:
        raise ValueError(f"{path} already lists {name!r}; pass --force to replace it")


def _manifest_setup(manifest: Path) -> str:
    if manifest.resolve() == MANIFEST_PATH.resolve():
        return "Bundled with histohub: no download, no setting, works offline.\n\n"
    return f"```bash\nexport HISTOHUB_MANIFEST={manifest.resolve()}\n```\n"


def metrics_section(metrics: dict) -> str:
    """The card's metrics: each benchmark metric as mean ± sd (n) per label fraction."""
    lines = [f"Final pretraining loss {metrics['final_pretraining_loss']:.3f}."
             if "final_pretraining_loss" in metrics else ""]
    rows = [(key, fraction, stats, item.get("split", ""))
            for key, item in sorted(metrics.items()) if isinstance(item, dict) and "mean" in item
            for fraction, stats in sorted(item.get("by_fraction", {}).items(),
                                          key=lambda kv: float(kv[0]))]
    if not rows:
        return (lines[0] + "\n\n" if lines[0] else "") + (
            "No downstream evaluation recorded; see training/docs/benchmarks.md.")
    lines += ["", "| benchmark | labels | mean ± sd (x 100) | n | splits |",
              "|---|---|---|---|---|"]
    lines += [f"| {key} | {float(fraction) * 100:g}% | {stats['mean'] * 100:.1f} ± "
              f"{stats['std'] * 100:.1f} | {stats.get('n', '?')} | {split} |"
              for key, fraction, stats, split in rows]
    return "\n".join(lines).strip()


def model_card(name: str, entry: dict, manifest: Path) -> str:
    """A Markdown model card for the exported weights."""
    weights = entry["weights"][0]
    pre = entry["preprocessing"]
    recipe = "\n".join(f"| {k} | {json.dumps(v) if isinstance(v, dict) else v} |"
                       for k, v in entry["recipe"].items())
    return f"""# {name}

{entry['description']}

## Use

{_manifest_setup(manifest)}```python
import histohub
model = histohub.load_pretrained("{name}")          # eval mode, {entry['feature_dim']}-d features
transform = histohub.get_transform("{name}")        # {pre['input_size']} px, mean {pre['mean']}, std {pre['std']}
```

## Weights

| | |
|---|---|
| architecture | {entry['arch']} (torchvision), projection head dropped |
| file | `{weights['filename']}` (safetensors) |
| sha256 | `{weights['sha256']}` |
| size | {weights['size']:,} bytes |
| parameters | {entry['recipe']['backbone_parameters']:,} |
| licence | {entry['license']} |

## Training recipe

| setting | value |
|---|---|
{recipe}

## Training data

{entry['training_data']}

Preprocessing: {pre['input_size']} px, mean {pre['mean']}, std {pre['std']}, mpp {pre['mpp']}.
{pre['mpp_note']}

## Metrics

{metrics_section(entry['metrics'])}

## Citation

Method: {entry['citation']}
"""


def export(checkpoint_path: str | os.PathLike, *, name: str, out: str | os.PathLike | None = None,
           manifest: str | os.PathLike | None = None, url: str | None = None,
           license: str = "unspecified", description: str | None = None,
           force: bool = False, half: bool = False, into_package: bool = False,
           data_note: str | None = None) -> dict[str, Any]:
    """Export ``checkpoint_path``; returns the manifest entry written. See the module doc.

    ``half``: store the weights as float16 (half the size; features agree with float32 to
    about 1e-3 relative). ``into_package``: the maintainers' door for histohub's own bundled
    model: the weights go to ``histohub/weights/`` and the entry, with a ``package``
    source, into histohub's shipped manifest (``out`` and ``manifest`` are then fixed).
    Every input is checked before the first byte is written: ValueError (or
    FileNotFoundError, a histohub error) says which one is wrong.
    """
    check_name(name)
    checkpoint_path = Path(checkpoint_path)
    if into_package:
        if out or manifest or url:
            raise ValueError("--into-package decides --out, --manifest and the source itself")
        out, manifest = PACKAGE_WEIGHTS, MANIFEST_PATH
    out = Path(out) if out else checkpoint_path.parent / "export"
    check_folder(out, "--out")
    manifest_path = Path(manifest) if manifest else out / "manifest.json"
    check_manifest(manifest_path, name, force=force, shipped_ok=into_package)
    weights_path, card_path = out / f"{name}.safetensors", out / f"{name}.md"
    for path in (weights_path, card_path):
        if path.exists() and not force:
            raise ValueError(f"{path} exists already; pass --force to replace it")
    checkpoint = read_training_checkpoint(checkpoint_path)
    arch = checkpoint["config"]["model"]["arch"]
    state = backbone_state(checkpoint, arch)
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    # one metadata key, and not the name: the same weights exported under another name (a
    # rerun's "-rerun") are the same bytes, so their sha256 says whether a retraining
    # reproduced them (safetensors writes several keys in a per-process hash order)
    weights = _serialize(state, weights_metadata(arch, checkpoint["epoch"]))
    parameters = sum(v.numel() for k, v in state.items()
                     if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    entry = build_entry(checkpoint, weights_path=weights_path,
                        sha256=hashlib.sha256(weights).hexdigest(), size=len(weights),
                        parameters=parameters, url=url, license=license,
                        description=description, data_note=data_note,
                        package=(weights_path.relative_to(MANIFEST_PATH.parent).as_posix()
                                 if into_package else None),
                        final_loss=_last_loss(checkpoint_path.parent, checkpoint["global_step"]))
    entry["weights"][0]["fingerprint"] = {
        "tensor": "conv1.weight", "l2_norm": round(float(state["conv1.weight"].float().norm()), 4),
        "rtol": 0.001, "verified": True,
        "note": "Measured by training/export.py on the exported weights."}
    parse_entry(name, entry)  # histohub's own validation, still before anything is written
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(weights_path, weights)
    write_manifest_entry(manifest_path, name, entry, replace=force)
    write_text_atomic(card_path, model_card(name, entry, manifest_path))
    return entry


def weights_metadata(arch: str, epochs: int) -> dict[str, str]:
    """The safetensors metadata: one key (several are written in a per-process hash order,
    which would change the file's sha256 from one export to the next), no model name."""
    return {"histohub": json.dumps({"arch": arch, "epochs": epochs}, sort_keys=True)}


def _serialize(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of ``state``, in memory (to hash it before writing it)."""
    from safetensors.torch import save

    return save(state, metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a training checkpoint for histohub.")
    parser.add_argument("checkpoint", help="checkpoint.pt of a run_pretrain.py run")
    parser.add_argument("--name", required=True,
                        help=f"model name: lower-case letters, digits, - and ., at most "
                             f"{MAX_NAME_LENGTH} characters")
    parser.add_argument("--out", help="output folder (default: <run folder>/export)")
    parser.add_argument("--manifest", help="manifest JSON to add the entry to "
                                           "(default: <out>/manifest.json)")
    parser.add_argument("--url", help="where the weights will be served from (default: a "
                                      "file:// URL to the exported file)")
    parser.add_argument("--license", default="unspecified",
                        help="licence of the weights (mind the training data's licences)")
    parser.add_argument("--description", help="one-line description for the manifest")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing entry and its files")
    parser.add_argument("--half", action="store_true", help="store the weights as float16")
    parser.add_argument("--into-package", action="store_true",
                        help="maintainers: bundle the model inside histohub (histohub/weights/ "
                             "and histohub's own manifest, with a 'package' source)")
    parser.add_argument("--data-note", help="licences and citations of the training data, "
                                            "appended to the entry's training_data")
    return run_reporting_errors(run, parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Export as ``args`` say and print how to use the result; returns the exit code."""
    entry = export(args.checkpoint, name=args.name, out=args.out, manifest=args.manifest,
                   url=args.url, license=args.license, description=args.description,
                   force=args.force, half=args.half, into_package=args.into_package,
                   data_note=args.data_note)
    weights = entry["weights"][0]
    manifest = args.manifest or str(Path(args.out or Path(args.checkpoint).parent / "export")
                                    / "manifest.json")
    print(f"{args.name}: {weights['filename']} sha256 {weights['sha256']} "
          f"({weights['size']:,} bytes, {entry['recipe']['backbone_parameters']:,} parameters)")
    setting = "" if args.into_package else f"HISTOHUB_MANIFEST={manifest} "
    print(f"use it: {setting}python -c \"import histohub; histohub.load_pretrained('{args.name}')\"")
    if args.license == "unspecified":
        print("note: pass --license to record the weights' licence", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
