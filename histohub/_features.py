"""Batched inference: images or patches in, ``(N, D)`` features out.

- ``extract_features(model, inputs)``: a tensor batch, PIL images, a folder of images or a
  torch ``Dataset`` -> features in input order (with file names for a folder). The model
  runs in a ``histohub.hub._runner.ModelRunner`` (eval, channels_last, optional autocast
  and ``torch.compile``).
- ``check_options``: the options of ``extract_features`` / ``extract_slide``, checked before
  anything runs (shared with the command line).
- ``prefetch``: iterate in a background thread, a few items ahead; ``interleave``: items
  of several iterators taken in turn.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from histohub.files import IMAGE_EXTENSIONS
from histohub.errors import check_option
from histohub.hub._runner import MODEL_OPTIONS, ModelRunner, resolve_model, tune_allocator

if TYPE_CHECKING:
    from histohub.hub._schema import Preprocessing

log = logging.getLogger(__name__)

#: Batches read ahead of the model (memory: this many batches of uint8 patches).
PREFETCH_BATCHES = 2


# --------------------------------------------------------------------------- options

def _option_rules() -> dict[str, dict[str, Any]]:
    from histohub._limits import MAX_COUNT, max_workers
    from histohub.hub._schema import INTERPOLATIONS
    from histohub.slides._tissue import MASK_METHODS
    from histohub.slides._reader import MPP_RANGE

    mpp = {"low": MPP_RANGE[0], "high": MPP_RANGE[1], "optional": True}
    return {
        **MODEL_OPTIONS,
        "num_workers": {"integer": True, "low": 0, "high": max_workers()},
        "read_threads": {"integer": True, "low": 1, "high": min(8, max_workers())},
        "max_patches": {"integer": True, "low": 1, "high": MAX_COUNT, "optional": True},
        "mpp": mpp, "target_mpp": mpp,
        "min_foreground": {"low": 0, "high": 1},
        "mask": {"choices": MASK_METHODS},
        "patch_size": {"integer": True, "low": 1},
        "interpolation": {"choices": INTERPOLATIONS},
    }


#: Command-line flags whose name is not the option's with dashes.
_FLAGS = {"num_workers": "--workers"}


def check_options(*, cli: bool = False, **options: Any) -> None:
    """Check the options of ``extract_slide`` / ``extract_features`` before anything runs:
    ``OptionError`` (a ValueError) naming the first bad one and its allowed range, on one
    line. ``cli``: name them as the command line does (``--batch-size 0``).

    >>> check_options(patch_size=0)
    Traceback (most recent call last):
    histohub.errors.OptionError: patch_size=0: must be an integer >= 1
    """
    rules = _option_rules()
    for name, value in options.items():
        flag = _FLAGS.get(name, "--" + name.replace("_", "-")) if cli else None
        check_option(name, value, flag=flag, **rules[name])


# --------------------------------------------------------------------------- results

@dataclass
class FeatureResult:
    """Features of a set of images, in input order.

    ``features``: float32 ``(N, D)`` on the CPU. ``names``: file names (relative to the
    folder) or ``None`` for in-memory inputs. ``failed``: names (or indices) of inputs that
    could not be read; they have no row. ``nonfinite``: row indices whose features hold NaN
    or inf (kept so rows stay aligned with the inputs; a warning was logged).
    """

    features: torch.Tensor
    names: list[str] | None = None
    failed: list[str] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.features)


# --------------------------------------------------------------------------- prefetching

def prefetch(iterable: Iterable, depth: int = PREFETCH_BATCHES) -> Iterator:
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead.

    Exceptions raised while producing are re-raised in the consumer. Stopping early (break,
    exception) stops the producer.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        items.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(("end", done))
        except BaseException as error:  # handed to the consumer, raised there
            items.put(("error", error))

    thread = threading.Thread(target=produce, name="histohub-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def interleave(iterators: Sequence[Iterator]) -> Iterator:
    """Items of ``iterators`` taken in turn (the first's first, the second's first, ...),
    until one runs out: how batches dealt round-robin to reader threads come back in order.
    """
    iterators = list(iterators)
    try:
        while True:
            for iterator in iterators:
                yield next(iterator)
    except StopIteration:
        return
    finally:
        for iterator in iterators:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()


# --------------------------------------------------------------------------- images in memory

class _ImageFolder(torch.utils.data.Dataset):
    """Image files -> ``(normalised (3, S, S) tensor, ok)``; an unreadable file gives ok=False."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.paths[index]) as image:
                return self.transform(image.convert("RGB")), True
        except (OSError, UnidentifiedImageError, ValueError) as error:
            log.warning("cannot read %s (%s); skipped", self.paths[index], error)
            return None, False


class _Converted(torch.utils.data.Dataset):
    """Any dataset / sequence whose items are PIL images, uint8 or float tensors, or tuples
    starting with one -> ``(normalised (3, S, S) tensor, True)``."""

    def __init__(self, items: Any, transform: Callable, size: int) -> None:
        self.items, self.transform, self.size = items, transform, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        if isinstance(item, (tuple, list)):
            item = item[0]
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            return item, True  # already preprocessed
        return self.transform(item), True


def _collate(batch: list) -> tuple[torch.Tensor | None, list[bool]]:
    ok = [flag for _, flag in batch]
    tensors = [t for t, flag in batch if flag]
    return (torch.stack(tensors) if tensors else None), ok


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` at any depth, sorted by relative path."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
             and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def extract_features(model_or_name: nn.Module | str | os.PathLike, inputs: Any, *,
                     batch_size: int = 64, device: str | torch.device = "cpu",
                     num_workers: int = 0, amp: bool | str = False,
                     compile: bool | str = "auto", progress: bool = True) -> FeatureResult:
    """Features of images, in input order: ``FeatureResult.features`` is float32 ``(N, D)``.

    ``inputs``: a tensor ``(B, 3, H, W)`` (uint8 is resized and normalised with the model's
    preprocessing; float is taken as already preprocessed), a list of PIL images, a folder
    of image files (``constants.IMAGE_EXTENSIONS`` at any depth, sorted by relative path;
    names returned), or a torch ``Dataset`` (items: PIL image, tensor, or a tuple starting with
    one). ``model_or_name``: an ``nn.Module`` or a name / checkpoint path for
    ``load_pretrained``. ``num_workers``: DataLoader worker processes (0 reads in a thread
    overlapping the model). ``amp``: autocast (True = bfloat16, or 'fp16'); ``compile``:
    ``torch.compile`` (True, False, or "auto": on a CPU, for at least
    ``model_runner.COMPILE_MIN_PATCHES`` images; the first call takes 10-30 s).
    """
    from tqdm.auto import tqdm

    from histohub.hub._transforms import get_transform, normalize_batch

    check_options(batch_size=batch_size, num_workers=num_workers, amp=amp, compile=compile)
    device = torch.device(device)
    if device.type == "cpu":
        tune_allocator()
    model, spec = resolve_model(model_or_name, device=device, progress=progress)
    runner = ModelRunner(model, device=device, amp=amp, compile=compile, batch_size=batch_size,
                         preprocessing=spec.preprocessing)
    pre = spec.preprocessing
    names: list[str] | None = None

    if isinstance(inputs, torch.Tensor):
        if inputs.ndim != 4 or inputs.shape[1] != 3:
            raise ValueError(f"a tensor input must be (B, 3, H, W), got {tuple(inputs.shape)}")
        batches = (_tensor_batch(inputs[i:i + batch_size], pre, normalize_batch)
                   for i in range(0, len(inputs), batch_size))
        total = len(inputs)
    else:
        if isinstance(inputs, (str, os.PathLike)):
            folder = Path(inputs)
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is not a folder of images")
            paths = list_images(folder)
            if not paths:
                raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} files under {folder}")
            names = [p.relative_to(folder).as_posix() for p in paths]
            dataset = _ImageFolder(paths, get_transform(pre))
        elif isinstance(inputs, (torch.utils.data.Dataset, Sequence)):
            dataset = _Converted(inputs, get_transform(pre), pre.input_size)
        else:
            raise TypeError(f"cannot extract features from {type(inputs).__name__}: pass a "
                            "tensor, a list of PIL images, a folder, or a torch Dataset")
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
            collate_fn=_collate, pin_memory=runner.pin_memory)
        batches = loader if num_workers > 0 else prefetch(loader)
        total = len(dataset)
    runner.plan(total)

    outputs: list[torch.Tensor] = []
    failed: list[str] = []
    position = 0
    with tqdm(total=total, unit="img", desc="features", disable=not progress) as bar:
        for batch, ok in (_with_ok(b) for b in batches):
            for j, flag in enumerate(ok):
                if not flag:
                    failed.append(names[position + j] if names else str(position + j))
            position += len(ok)
            if batch is not None:
                outputs.append(runner.run(batch))
            bar.update(len(ok))
    features = torch.cat(outputs) if outputs else torch.empty(0, spec.feature_dim or 0)
    nonfinite = (~torch.isfinite(features).all(dim=1)).nonzero().flatten().tolist()
    if nonfinite:
        log.warning("%d of %d feature rows hold NaN or inf (rows %s...): check the inputs "
                    "and the weights", len(nonfinite), len(features), nonfinite[:5])
    if names is not None and failed:
        skipped = set(failed)
        names = [n for n in names if n not in skipped]
    return FeatureResult(features, names, failed, nonfinite)


def _with_ok(item: Any) -> tuple[torch.Tensor | None, list[bool]]:
    if isinstance(item, torch.Tensor):
        return item, [True] * len(item)
    return item


def _tensor_batch(batch: torch.Tensor, pre: Preprocessing, normalize: Callable
                  ) -> torch.Tensor:
    if batch.is_floating_point():
        return batch
    if batch.dtype != torch.uint8:
        raise TypeError(f"tensor inputs must be uint8 (0-255) or float (preprocessed), "
                        f"got {batch.dtype}")
    if batch.shape[-2:] != (pre.input_size, pre.input_size):
        batch = torch.nn.functional.interpolate(
            batch.float(), size=(pre.input_size, pre.input_size), mode=pre.interpolation,
            antialias=True).round().clamp(0, 255).to(torch.uint8)
    return normalize(batch, pre)
