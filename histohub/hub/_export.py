"""Export an encoder in timm's Hugging Face Hub layout, and push it to the Hub.

The exported directory holds what ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)``
(or ``"local-dir:DIR"``) reads:

- ``config.json``: ``architecture``, ``num_classes: 0`` (no classifier: the model returns
  the pooled features) and a ``pretrained_cfg`` carrying the manifest's preprocessing
  (mean, std, interpolation, ``crop_pct`` 1.0 for tiles already cut to size), so
  ``timm.data.resolve_model_data_config`` gives the right normalisation;
- ``model.safetensors``: the encoder's tensors under timm's names (for ResNets, the same
  as torchvision's; the ``fc`` classifier is absent);
- ``README.md``: a model card (description, licence, citation, preprocessing, usage).

>>> export_hf("resnet18-ssl", "exported/resnet18-ssl")
>>> push("resnet18-ssl", "my-org/resnet18-ssl")
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from histohub.hub._descriptor import ModelDescriptor
from histohub.hub._redact import redact, redact_all
from histohub._version import __version__
from histohub.errors import require

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"

#: ResNet's output stride: the last feature map is input_size / 32 pixels wide.
_RESNET_STRIDE = 32


def export_hf(model: str | os.PathLike, out_dir: str | os.PathLike, *, arch: str | None = None,
              repo_id: str | None = None, overwrite: bool = False, progress: bool = True
              ) -> Path:
    """Write ``model`` (a manifest name or a local checkpoint) in timm's Hub layout.

    ``arch``: for a checkpoint path, the architecture (inferred when None).
    ``repo_id``: the Hub repository named in the model card's usage example.
    ``overwrite``: replace an existing, non-empty ``out_dir`` (refused otherwise).
    The directory appears complete or not at all: it is written under a temporary name
    next to ``out_dir`` and renamed. Returns ``out_dir``.
    """
    from histohub.hub._pretrained import load_pretrained

    out_dir = Path(out_dir).expanduser().absolute()
    _check_target(out_dir, overwrite=overwrite)
    encoder = load_pretrained(model, arch=arch, progress=progress)
    described: ModelDescriptor = encoder.histohub_info
    state = {key: tensor.detach().contiguous()
             for key, tensor in encoder.state_dict().items()}
    config = timm_config(described)

    def write(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        # redacted whole (the card quotes the manifest's text): what push uploads
        (folder / CONFIG_NAME).write_text(json.dumps(redact_all(config), indent=2) + "\n",
                                          encoding="utf-8")
        (folder / CARD_NAME).write_text(redact(model_card(described, repo_id=repo_id)),
                                        encoding="utf-8")

    _write_directory(out_dir, write, overwrite=overwrite)
    return out_dir


def push(model: str | os.PathLike, repo_id: str, *, private: bool = False,
         token: str | None = None, arch: str | None = None,
         commit_message: str | None = None, progress: bool = True):
    """Upload ``model`` to the Hugging Face Hub repository ``repo_id`` in timm's layout.

    ``model``: a manifest name or checkpoint (exported first, to a temporary directory),
    or a directory written by ``export_hf`` (uploaded as it is, e.g. after review).
    The repository is created if needed (``private`` applies then). ``token`` defaults to
    huggingface_hub's own (``HF_TOKEN`` or ``huggingface-cli login``).
    Returns huggingface_hub's ``CommitInfo``.
    """
    hf = require("huggingface_hub", extra="hub", purpose="pushing to the Hugging Face Hub")
    api = hf.HfApi(token=token)
    folder = Path(os.fspath(model)).expanduser()
    with tempfile.TemporaryDirectory(prefix="histohub-push-") as scratch:
        if folder.is_dir():
            missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder} is not an export_hf directory: "
                                        f"{', '.join(missing)} missing")
        else:
            folder = export_hf(model, Path(scratch) / "export", arch=arch, repo_id=repo_id,
                               progress=progress)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=folder,
            commit_message=commit_message or f"Upload {folder.name} (histohub export-hf)")


def timm_config(described: ModelDescriptor) -> dict[str, Any]:
    """The ``config.json`` timm reads (``load_model_config_from_hf`` / ``-from_path``).

    ``pretrained_cfg`` keeps to fields of timm's ``PretrainedCfg``; histohub's own
    metadata (microns per pixel, source checksum) sits under a separate ``histohub`` key,
    which timm ignores.
    """
    pre = described.preprocessing
    entry = described.entry
    pretrained_cfg: dict[str, Any] = {
        "tag": described.name,
        "custom_load": False,
        "input_size": [3, pre.input_size, pre.input_size],
        "fixed_input_size": False,
        "interpolation": pre.interpolation,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "num_classes": 0,
        "pool_size": [pre.input_size // _RESNET_STRIDE] * 2,
        "first_conv": "conv1",
        "classifier": "fc",
    }
    if entry is not None:
        pretrained_cfg.update(license=_hf_license(entry.license),
                              description=entry.description, paper_name=entry.citation)
        doi = re.search(r"doi:\s*(\S+?)\.?$", entry.citation)
        if doi:
            pretrained_cfg["paper_ids"] = f"doi:{doi.group(1)}"
        urls = [s.public_url for w in entry.weights for s in w.sources if s.url]
        if urls:
            pretrained_cfg["origin_url"] = urls[0]
    return {
        "architecture": described.arch,
        "num_classes": 0,
        "num_features": described.feature_dim,
        "global_pool": "avg",
        "pretrained_cfg": pretrained_cfg,
        "histohub": {
            "name": described.name,
            "mpp": pre.mpp,
            "mpp_note": pre.mpp_note,
            "source_file": _source_file(described),
            "source_sha256": described.sha256,
            "histohub_version": __version__,
        },
    }


def model_card(described: ModelDescriptor, *, repo_id: str | None = None) -> str:
    """The Hub model card: YAML metadata, then description, details, usage, citation."""
    entry = described.entry
    pre = described.preprocessing
    license = _hf_license(entry.license) if entry else "other"
    hub_id = repo_id or f"ORG/{described.name}"
    mpp = (f"{pre.mpp:g} um/px" if pre.mpp else "not recorded") + (
        f" ({pre.mpp_note})" if pre.mpp_note else "")
    details = [
        f"- **Architecture:** {described.arch} (timm / torchvision ResNet, no classifier)",
        f"- **Output:** `(B, {described.feature_dim})` pooled features "
        "(the paper's pre-activation layer output, section 3.1)",
        f"- **Input:** `(B, 3, {pre.input_size}, {pre.input_size})` RGB, resized "
        f"({pre.interpolation}), scaled to [0, 1], normalised with mean {list(pre.mean)} "
        f"and std {list(pre.std)}",
        f"- **Resolution:** {mpp}",
    ]
    if entry is not None:
        recipe = "; ".join(f"{k}: {v}" for k, v in entry.recipe.items())
        details += [f"- **Training:** {recipe}" if recipe else "",
                    f"- **Training data:** {entry.training_data}",
                    f"- **Licence:** {entry.license}"]
    else:
        details.append("- **Licence:** not recorded (exported from a local checkpoint)")
    if described.weights_path:
        details.append(f"- **Converted from:** `{_source_file(described)}` "
                       f"(sha256 `{described.sha256}`) by histohub")
    lines = [
        "---",
        "tags:", "- image-feature-extraction", "- timm", "- histopathology", "- histohub",
        "library_name: timm",
        f"license: {license}",
        "pipeline_tag: image-feature-extraction",
        "---",
        f"# {described.name}",
        "",
        entry.description if entry else f"Encoder exported from {described.name}.",
        "",
        "## Model details",
        *[line for line in details if line],
        "",
        "## Usage",
        "",
        "With timm (the data config carries the normalisation above):",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("hf-hub:{hub_id}", pretrained=True).eval()',
        "config = timm.data.resolve_model_data_config(model)",
        "transform = timm.data.create_transform(**config, is_training=False)",
        f"features = model(transform(image).unsqueeze(0))  # (1, {described.feature_dim})",
        "```",
        "",
    ]
    if entry is not None:
        lines += [
            "With histohub (verified download, same weights and preprocessing):",
            "",
            "```python",
            "import histohub",
            f'model = histohub.load_pretrained("{entry.name}")',
            f'transform = histohub.get_transform("{entry.name}")',
            "```",
            "",
            "## Citation",
            "",
            "```",
            entry.citation,
            "```",
            "",
        ]
    return "\n".join(lines)


def _source_file(described: ModelDescriptor) -> str | None:
    """Only the weights file's name: a path would publish the exporting user's folders."""
    return Path(described.weights_path).name if described.weights_path else None


def _hf_license(license: str) -> str:
    """The Hub's licence identifiers are lower-case SPDX ids (``MIT`` -> ``mit``)."""
    return license.strip().lower()


def _check_target(out_dir: Path, *, overwrite: bool) -> None:
    if out_dir.is_file():
        raise FileExistsError(f"{out_dir} is a file; give a directory to export into")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another directory "
                              "or pass overwrite=True (--overwrite) to replace it")


def _write_directory(out_dir: Path, write: Callable[[Path], None], *,
                     overwrite: bool) -> None:
    """Run ``write(folder)`` on a temporary sibling of ``out_dir``, then rename it into place.

    An existing ``out_dir`` is moved aside first and removed only once the new one is in
    place, so a failure at any point leaves the old directory (or nothing) behind.
    """
    _check_target(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial",
                                    dir=out_dir.parent))
    try:
        write(staging)
        staging.chmod(0o755)  # mkdtemp's 0700 and safetensors' 0600 would hide the export
        for path in staging.iterdir():
            path.chmod(0o644)
        aside = None
        if out_dir.is_dir() and any(out_dir.iterdir()):
            aside = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            out_dir.rename(aside)
        try:
            staging.rename(out_dir)  # also replaces an empty directory
        except OSError:
            if aside is not None:
                aside.rename(out_dir)
            raise
        if aside is not None:
            shutil.rmtree(aside)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
