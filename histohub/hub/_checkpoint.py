"""Load checkpoints as data, never as code, and map their keys onto an encoder strictly.

Supported: safetensors, plain ``torch.save`` state dicts (zip or legacy format), and the
upstream PyTorch Lightning checkpoints, which also hold optimizer state and
hyper-parameter objects. Pickles are read with ``torch.load(weights_only=True)``: the
harmless classes Lightning writes are allowed through stand-ins defined here, so
``pytorch_lightning`` need not be installed, and a pickle that names any other callable
is refused before anything runs.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from histohub.hub._schema import KeyMap
from histohub.errors import CheckpointError, KeyMappingError, UnsafeCheckpointError, existing_file


class LightningCallback:
    """Stand-in for a Lightning callback class. Lightning 1.0-1.4 keyed
    ``checkpoint["callbacks"]`` by the class itself (pickled by reference, never called)."""


def _callback_stand_in(path: str) -> tuple[type, str]:
    name = path.rsplit(".", 1)[1]
    return type(name, (LightningCallback,), {"__module__": __name__}), path


# Lightning's AttributeDict is read as a plain dict: torch's weights_only unpickler fills
# (SETITEMS) only exact dict, OrderedDict and Counter instances, never a subclass.
_LIGHTNING_GLOBALS = [
    (dict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (dict, "lightning_fabric.utilities.data.AttributeDict"),
    (dict, "lightning.fabric.utilities.data.AttributeDict"),
    argparse.Namespace,
    *(_callback_stand_in(f"pytorch_lightning.callbacks.{path}") for path in (
        "model_checkpoint.ModelCheckpoint", "early_stopping.EarlyStopping",
        "lr_monitor.LearningRateMonitor", "gpu_stats_monitor.GPUStatsMonitor")),
]

#: The key map for local checkpoints of unknown origin: upstream, Lightning, DDP and
#: training/ layouts all reduce to torchvision names; classifier/projection heads dropped.
DEFAULT_KEY_MAP = KeyMap(
    state_dict_key="state_dict",
    strip_prefixes=("model.resnet.", "module.backbone.", "backbone.", "module.", "model.",
                    "resnet.", "encoder."),
    drop=(r"^fc\.", r"^projection_head\.", r"^head\."),
)

#: The dtypes an encoder's weights may have: they are cast to the model's on loading.
FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: ... and BatchNorm's ``num_batches_tracked`` counters (int64 as torch writes them).
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def sniff_format(path: Path) -> str:
    """``"safetensors"`` or ``"torch"`` (zip or legacy pickle), from the file's first bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as error:  # no permission, an I/O error
        raise CheckpointError(f"{path} cannot be read ({error.strerror or error})") from None
    # safetensors first: its 8-byte header length may itself start with 0x80 or "PK".
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    raise CheckpointError(f"{path} is neither a safetensors file nor a PyTorch checkpoint "
                          f"(first bytes {head!r}); is the download truncated or an HTML page?")


def read_checkpoint(path: str | os.PathLike, *, format: str | None = None) -> dict:
    """Read a checkpoint into a dict of tensors (possibly nested), executing nothing.

    ``format``: ``"safetensors"``, ``"torch"`` or ``"lightning"``; sniffed when None.
    """
    path = existing_file(path, what="checkpoint",
                         folder_hint="give the .safetensors, .pt or .ckpt file inside it")
    format = format or sniff_format(path)
    if format == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path} is not a valid safetensors file ({error}); "
                                  "delete it and download or convert it again") from None
    return _torch_load(path)


def _torch_load(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(_LIGHTNING_GLOBALS):
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                # Legacy (pre-zip) checkpoints cannot be memory-mapped; read them normally.
                data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        # torch words it "Unsupported global: GLOBAL os.system" or, for modules it blocks
        # outright (os, subprocess, ...), "unsupported GLOBAL posix.system whose module ...".
        found = re.search(r"GLOBAL ([\w.]+)", message)
        if found or "Unsupported operand" in message:
            what = found.group(1) if found else "a callable"
            raise UnsafeCheckpointError(
                f"Refused to load {path}: its pickle calls {what}, which is not plain data. "
                "Nothing from it was executed. Only load checkpoints from sources you trust; "
                "if this one is genuine, convert it to safetensors in a sandbox.") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({message}); "
                              "it may be truncated: delete it and fetch it again") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, struct.error) as error:
        # IndexError, struct.error: a pickle cut short (weights_only's unpickler reads bytes
        # that are not there).
        raise CheckpointError(f"{path} is not a readable checkpoint ({error}); "
                              "it may be truncated: delete it and fetch it again") from None
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    return dict(data)


def map_state_dict(checkpoint: Mapping, key_map: KeyMap, expected: Mapping[str, torch.Size]
                   ) -> dict[str, torch.Tensor]:
    """Apply ``key_map`` and check the result fills ``expected`` exactly (names and shapes).

    Raises KeyMappingError naming missing, unexpected and mis-shaped keys: a partial load
    (the upstream loader's silent failure) cannot happen; CheckpointError naming a tensor
    whose dtype an encoder cannot hold (bool, integer, complex: see :func:`_check_dtypes`).
    The one tolerance: BatchNorm's ``num_batches_tracked`` counters, absent from very old
    checkpoints and unused at inference, are filled with zeros.
    """
    state = checkpoint
    nested = key_map.state_dict_key
    if nested and isinstance(checkpoint.get(nested), Mapping):
        state = checkpoint[nested]
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in key_map.strip_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if any(re.search(pattern, key) for pattern in key_map.drop):
            continue
        if key in mapped:
            raise KeyMappingError(f"Two checkpoint keys map onto {key!r}; fix the key map")
        mapped[key] = value
    if key_map.layout is not None:
        from histohub.hub._key_maps import apply_layout

        mapped = apply_layout(key_map.layout, mapped)
    not_tensors = sorted(k for k, v in mapped.items() if not isinstance(v, torch.Tensor))
    for key in [k for k in expected if k.endswith("num_batches_tracked") and k not in mapped]:
        mapped[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    mis_shaped = sorted(f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(expected[k])}"
                        for k in set(mapped) & set(expected)
                        if isinstance(mapped[k], torch.Tensor) and mapped[k].shape != expected[k])
    if missing or unexpected or mis_shaped or not_tensors:
        raise KeyMappingError(_mapping_report(missing, unexpected, mis_shaped, not_tensors,
                                              len(expected)))
    _check_dtypes(mapped)
    return mapped


def _check_dtypes(state: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors an encoder cannot hold: :data:`FLOATING_DTYPES` only, and integers
    also for BatchNorm's ``num_batches_tracked`` counters. Bool and integer weights would
    otherwise fail inside ``load_state_dict``, and complex ones only at the first forward."""
    for key, value in state.items():
        allowed = FLOATING_DTYPES
        if key.endswith("num_batches_tracked"):
            allowed += INTEGER_DTYPES
        if value.dtype not in allowed:
            raise CheckpointError(
                f"Checkpoint tensor {key!r} has dtype {value.dtype}; it must be one of "
                f"{', '.join(str(d).removeprefix('torch.') for d in allowed)}. Nothing was "
                "loaded: is this the right file?")


def _mapping_report(missing, unexpected, mis_shaped, not_tensors, total) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    lines = ["The checkpoint does not match the architecture; nothing was loaded."]
    if missing:
        lines.append(f"  missing ({len(missing)} of {total}): {some(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {some(unexpected)}")
    if mis_shaped:
        lines.append(f"  wrong shape ({len(mis_shaped)}): {some(mis_shaped)}")
    if not_tensors:
        lines.append(f"  not tensors ({len(not_tensors)}): {some(not_tensors)}")
    lines.append("Check arch= (resnet18/34/50/101) and the key map (prefixes to strip, "
                 "keys to drop).")
    return "\n".join(lines)
