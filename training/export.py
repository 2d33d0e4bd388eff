#!/usr/bin/env python
"""Export a pretraining checkpoint for histohub: backbone safetensors, manifest entry, model card.

    python training/export.py runs/cpu/checkpoint.pt --name my-resnet18-ssl \\
        --out exported/ --license "CC BY 4.0"
    HISTOHUB_MANIFEST=exported/manifest.json python -c \\
        "import histohub; print(histohub.load_pretrained('my-resnet18-ssl'))"

The projection head is dropped (it is not part of the encoder, paper section 3.1); the
backbone keys are torchvision's, checked strictly against the architecture. The entry is
validated with histohub's own manifest parser before anything is written, and every file
is written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from histohub._checkpoint import map_state_dict  # noqa: E402
from histohub._download import sha256_file  # noqa: E402
from histohub._manifest import MANIFEST_PATH, SCHEMA_VERSION, KeyMap, parse_entry  # noqa: E402
from histohub._manifest import read_manifest  # noqa: E402
from histohub.models import FEATURE_DIMS, build_encoder  # noqa: E402
from simclr.checkpoint import load_checkpoint  # noqa: E402

PAPER_CITATION = ("Ciga O, Xu T, Martel AL. Self supervised contrastive learning for digital "
                  "histopathology. Machine Learning with Applications 7:100198 (2022). "
                  "doi:10.1016/j.mlwa.2021.100198")
BACKBONE_KEY_MAP = KeyMap(strip_prefixes=("backbone.",), drop=(r"^projection_head\.",))


def backbone_state(checkpoint: dict, arch: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors from a training checkpoint, keys as torchvision names them."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_encoder(arch).state_dict().items()}
    state = map_state_dict(checkpoint["model"], BACKBONE_KEY_MAP, expected)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
                      ) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _last_loss(run_folder: Path, step: int) -> float | None:
    log_path = run_folder / "log.csv"
    if not log_path.is_file():
        return None
    with open(log_path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
    return float(rows[-1]["loss"]) if rows else None


def build_entry(checkpoint: dict, *, weights_path: Path, sha256: str, size: int,
                parameters: int, url: str | None, license: str, description: str | None,
                final_loss: float | None) -> dict[str, Any]:
    """A manifest entry (histohub's schema) describing the exported backbone."""
    config = checkpoint["config"]
    arch = config["model"]["arch"]
    summary = checkpoint.get("pool_summary", [])
    images = sum(s["selected"] for s in summary)
    slides = [s for s in summary if s["kind"] == "slides"]
    optim = config["optim"]
    augment = config["augment"]
    data = config["data"]
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
    }
    training_data = (f"{images} images from {len(summary)} dataset(s): "
                     + "; ".join(f"{s['name']} ({s['kind']}, {s['selected']} of "
                                 f"{s['available']})" for s in summary)
                     + f". Draw: {data['percent']}% of each dataset, min "
                       f"{data['min_per_dataset']}, max {data['max_per_dataset']} per dataset"
                     + (f"; at most {data['patches_per_slide']} patches per slide at "
                        f"{data['slide_mpp']} um/px" if slides else "") + ".")
    mpp = data["slide_mpp"] if slides else None
    entry = {
        "description": description or (f"{arch} pretrained with SimCLR by histohub's training/ "
                                        f"({checkpoint['epoch']} epochs on {images} images). "
                                        f"{FEATURE_DIMS[arch]}-d pre-activation features."),
        "arch": arch,
        "feature_dim": FEATURE_DIMS[arch],
        "weights": [{
            "filename": weights_path.name, "format": "safetensors", "sha256": sha256,
            "size": size, "sources": [{"url": url or weights_path.resolve().as_uri()}],
            "key_map": {"state_dict_key": None, "strip_prefixes": [], "drop": []},
        }],
        "preprocessing": {
            "input_size": config["image_size"], "mean": list(data["mean"]),
            "std": list(data["std"]), "interpolation": "bilinear", "mpp": mpp,
            "mpp_note": ("Slide patches were cut at this resolution." if slides else
                         "Trained on image files whose resolution was not recorded."),
        },
        "license": license,
        "citation": PAPER_CITATION,
        "recipe": recipe,
        "training_data": training_data,
        "metrics": {} if final_loss is None else {"final_pretraining_loss": final_loss},
    }
    return entry


def write_manifest(path: Path, name: str, entry: dict, *, force: bool) -> None:
    """Add (or with ``force`` replace) ``name`` in the manifest at ``path``, atomically."""
    packaged = read_manifest(MANIFEST_PATH)
    if name in packaged:
        raise ValueError(f"{name!r} is a model histohub ships; choose another --name")
    data = {"schema_version": SCHEMA_VERSION, "models": {}}
    if path.is_file():
        read_manifest(path)  # refuse to extend a manifest that is already invalid
        data = json.loads(path.read_text(encoding="utf-8"))
        if name in data["models"] and not force:
            raise ValueError(f"{path} already lists {name!r}; pass --force to replace it")
    data["models"][name] = entry
    _write_text(path, json.dumps(data, indent=2) + "\n")
    read_manifest(path)


def model_card(name: str, entry: dict, manifest: Path) -> str:
    """A Markdown model card for the exported weights."""
    weights = entry["weights"][0]
    pre = entry["preprocessing"]
    recipe = "\n".join(f"| {k} | {json.dumps(v) if isinstance(v, dict) else v} |"
                       for k, v in entry["recipe"].items())
    return f"""# {name}

{entry['description']}

## Use

```bash
export HISTOHUB_MANIFEST={manifest.resolve()}
```
```python
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

{json.dumps(entry['metrics']) if entry['metrics'] else 'No downstream evaluation recorded; see training/docs/benchmarks.md.'}

## Citation

Method: {entry['citation']}
"""


def export(checkpoint_path: str | os.PathLike, *, name: str, out: str | os.PathLike | None = None,
           manifest: str | os.PathLike | None = None, url: str | None = None,
           license: str = "unspecified", description: str | None = None,
           force: bool = False) -> dict[str, Any]:
    """Export ``checkpoint_path``; returns the manifest entry written. See the module doc."""
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    arch = checkpoint["config"]["model"]["arch"]
    out = Path(out) if out else checkpoint_path.parent / "export"
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = Path(manifest) if manifest else out / "manifest.json"
    state = backbone_state(checkpoint, arch)
    parameters = sum(v.numel() for k, v in state.items()
                     if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    weights_path = out / f"{name}.safetensors"
    write_safetensors(state, weights_path, {"arch": arch, "name": name,
                                            "epochs": str(checkpoint["epoch"])})
    final_loss = _last_loss(checkpoint_path.parent, checkpoint["global_step"])
    entry = build_entry(checkpoint, weights_path=weights_path,
                        sha256=sha256_file(weights_path), size=weights_path.stat().st_size,
                        parameters=parameters, url=url, license=license,
                        description=description, final_loss=final_loss)
    parse_entry(name, entry)  # histohub's validation, before the manifest is touched
    write_manifest(manifest_path, name, entry, force=force)
    _write_text(out / f"{name}.md", model_card(name, entry, manifest_path))
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a training checkpoint for histohub.")
    parser.add_argument("checkpoint", help="checkpoint.pt of a run_pretrain.py run")
    parser.add_argument("--name", required=True, help="model name (lower-case, digits, - and .)")
    parser.add_argument("--out", help="output folder (default: <run folder>/export)")
    parser.add_argument("--manifest", help="manifest JSON to add the entry to "
                                           "(default: <out>/manifest.json)")
    parser.add_argument("--url", help="where the weights will be served from (default: a "
                                      "file:// URL to the exported file)")
    parser.add_argument("--license", default="unspecified",
                        help="licence of the weights (mind the training data's licences)")
    parser.add_argument("--description", help="one-line description for the manifest")
    parser.add_argument("--force", action="store_true", help="replace an existing entry")
    args = parser.parse_args(argv)
    entry = export(args.checkpoint, name=args.name, out=args.out, manifest=args.manifest,
                   url=args.url, license=args.license, description=args.description,
                   force=args.force)
    weights = entry["weights"][0]
    manifest = args.manifest or str(Path(args.out or Path(args.checkpoint).parent / "export")
                                    / "manifest.json")
    print(f"{args.name}: {weights['filename']} sha256 {weights['sha256']} "
          f"({weights['size']:,} bytes, {entry['recipe']['backbone_parameters']:,} parameters)")
    print(f"use it: HISTOHUB_MANIFEST={manifest} python -c "
          f"\"import histohub; histohub.load_pretrained('{args.name}')\"")
    if args.license == "unspecified":
        print("note: pass --license to record the weights' licence", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
