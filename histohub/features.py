"""Batched inference: images or patches in, ``(N, D)`` features out.

- ``extract_features(model, inputs)``: a tensor batch, PIL images, a folder of images or a
  torch ``Dataset`` -> features in input order (with file names for a folder).
- ``ModelRunner``: the model placed on its device once (eval, channels_last, optional
  autocast and ``torch.compile``), then run on batch after batch: normalised float batches,
  or uint8 pixels moved to the device (pinned memory, ``non_blocking``) and normalised
  there. The slide pipeline (``histohub.slide_features``) keeps one for a whole cohort.
- ``prefetch``: iterate in a background thread, a few items ahead.
- ``tune_allocator``: glibc keeps freed memory (15-27% of CPU time otherwise).

The model always runs in eval mode under ``torch.inference_mode``, channels_last (the
largest single speed-up on CPU; see PERFORMANCE.md). ``compile="auto"`` compiles once per
runner, on a CPU, when the job holds at least ``COMPILE_MIN_PATCHES`` patches: enough to
repay the compilation. Not on a GPU: there the model is not the bottleneck (ResNet18 on an
H200: about 25,000 images/s eager, against 350-550 patches/s read and decoded by 16 CPU
cores), so compiling (13 s) would only delay the first feature.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .constants import IMAGE_EXTENSIONS
from .errors import HistohubError, check_option

if TYPE_CHECKING:
    from ._manifest import Preprocessing

log = logging.getLogger(__name__)

#: Batches read ahead of the model (memory: this many batches of uint8 patches).
PREFETCH_BATCHES = 2
#: With ``compile="auto"`` on a CPU, compile when a job holds at least this many patches.
#: Measured on 2 cores (ResNet18, 224 px, batch 64, ``benchmarks/bench_compile.py``):
#: compiling costs 25 s with an empty inductor cache (4 s once warm) and runs the model
#: 1.06-1.08x faster (PERFORMANCE.md saw up to 1.37x in a slow spell), so it pays for itself
#: after 1,900 (warm cache) to 8,500 patches (cold); above that, a job always gains.
COMPILE_MIN_PATCHES = 10000
COMPILE_CHOICES = (False, True, "auto")
_AMP = (False, True, "bf16", "bfloat16", "fp16", "float16")


# --------------------------------------------------------------------------- options

def _option_rules() -> dict[str, dict[str, Any]]:
    from .tissue import MASK_METHODS
    from .wsi import MPP_RANGE

    mpp = {"low": MPP_RANGE[0], "high": MPP_RANGE[1], "optional": True}
    return {
        "batch_size": {"integer": True, "low": 1},
        "num_workers": {"integer": True, "low": 0},
        "read_threads": {"integer": True, "low": 1, "high": 8},
        "max_patches": {"integer": True, "low": 1, "optional": True},
        "mpp": mpp, "target_mpp": mpp,
        "min_foreground": {"low": 0, "high": 1},
        "mask": {"choices": MASK_METHODS},
        "amp": {"choices": _AMP},
        "compile": {"choices": COMPILE_CHOICES},
    }


#: Command-line flags whose name is not the option's with dashes.
_FLAGS = {"num_workers": "--workers"}


def check_options(*, cli: bool = False, **options: Any) -> None:
    """Check the options of ``extract_slide`` / ``extract_features`` before anything runs:
    ``OptionError`` (a ValueError) naming the first bad one and its allowed range, on one
    line. ``cli``: name them as the command line does (``--batch-size 0``).

    >>> check_options(batch_size=0)
    Traceback (most recent call last):
    histohub.errors.OptionError: batch_size=0: must be an integer >= 1
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


# --------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about a model besides its weights."""

    name: str
    arch: str
    sha256: str
    feature_dim: int | None
    preprocessing: Preprocessing


def resolve_model(model_or_name: nn.Module | str | os.PathLike, *, device: torch.device,
                  progress: bool) -> tuple[nn.Module, ModelSpec]:
    """A module (used as is) or a manifest name / checkpoint path (``load_pretrained``)."""
    from .pretrained import _default_preprocessing, load_pretrained

    if isinstance(model_or_name, nn.Module):
        model = model_or_name
    else:
        model = load_pretrained(model_or_name, device=device, progress=progress)
    info = getattr(model, "histohub_info", None)
    if info is None:
        spec = ModelSpec(type(model).__name__, "", "", None, _default_preprocessing())
    else:
        spec = ModelSpec(info.name, info.arch, info.sha256 or "", info.feature_dim,
                         info.preprocessing or _default_preprocessing())
    return model, spec


class ModelRunner:
    """Runs a model batch after batch: eval, ``inference_mode``, channels_last, optional
    autocast (``amp``) and ``torch.compile``, compiled at most once.

    ``compile``: True compiles now, False never, ``"auto"`` once ``plan()`` is told of a
    job worth it (on a CPU, at least ``COMPILE_MIN_PATCHES`` patches). A compiled model
    runs the full batches (one static shape); a shorter batch (a slide's last) runs the same
    weights eagerly, so nothing is padded and nothing recompiles.

    Shape: ``run(batch)``: float ``(B, 3, S, S)`` -> float32 CPU ``(B, D)``;
    ``run_pixels(pixels)``: uint8 ``(B, S, S, 3)`` -> float32 CPU ``(B, D)``.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu",
                 amp: bool | str = False, compile: bool | str = False, batch_size: int = 64,
                 preprocessing: Preprocessing | None = None) -> None:
        check_options(batch_size=batch_size, amp=amp, compile=compile)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.preprocessing = preprocessing
        self.eager = model.eval().to(device=self.device, memory_format=torch.channels_last)
        self.autocast = _autocast(self.device, amp)
        self.compile_mode = compile
        self.compiled: nn.Module | None = None
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None
        if compile is True:
            self._compile()

    @property
    def pin_memory(self) -> bool:
        """Whether host batches should be pinned (page-locked) for the copy to the device."""
        return self.device.type == "cuda"

    def plan(self, patches: int) -> None:
        """Say how many patches the job still holds; ``compile="auto"`` decides here."""
        if self.compile_mode == "auto" and self.compiled is None and \
                self.device.type == "cpu" and patches >= COMPILE_MIN_PATCHES:
            log.info("compiling the model for %s patches on %s (torch.compile, once)",
                     patches, self.device)
            self._compile()

    def _compile(self) -> None:
        if self.compiled is None:
            self.compiled = torch.compile(self.eager, dynamic=False)

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised float ``(B, 3, S, S)`` (any device) -> float32 CPU ``(B, D)``."""
        batch = batch.to(self.device, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        n = batch.shape[0]
        model = self.compiled if self.compiled is not None and n == self.batch_size \
            else self.eager
        with torch.inference_mode(), self.autocast():
            try:
                out = model(batch)
            except Exception as error:
                if model is self.eager or not _is_compile_error(error):
                    raise
                out = self._compile_failed(error, batch)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise HistohubError(f"the model must return a (B, D) tensor of features, got "
                                f"{getattr(out, 'shape', type(out))}; wrap it so it returns "
                                "pooled features")
        return out.float().cpu()

    __call__ = run

    def run_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, S, S, 3)`` on the host (pinned on a GPU) -> float32 CPU ``(B, D)``:
        moved as uint8 (a quarter of float's bytes), normalised on the device."""
        from .transforms import normalize_batch

        # (B, S, S, 3) -> (B, 3, S, S) is a channels_last view: no copy
        batch = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return self.run(normalize_batch(batch, self.preprocessing))

    def _compile_failed(self, error: Exception, batch: torch.Tensor) -> torch.Tensor:
        """A compiler that cannot run here (no C compiler, an unsupported op): eager from now
        on under ``"auto"``; a clear error when compiling was asked for."""
        self.compiled = None
        if self.compile_mode is True:
            raise HistohubError(f"torch.compile failed ({_first_line(error)}); run without "
                                "--compile (compile=False)") from error
        self.compile_mode = False
        log.warning("torch.compile failed (%s); running the model eagerly", _first_line(error))
        return self.eager(batch)


def _is_compile_error(error: Exception) -> bool:
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _autocast(device: torch.device, amp: bool | str) -> Callable[[], Any]:
    if not amp:
        return nullcontext
    dtype = {True: torch.bfloat16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}.get(amp)
    if dtype is None:
        raise ValueError(f"amp={amp!r}: use False, True (bfloat16), 'bf16' or 'fp16'")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a module's weights: every state-dict entry's name, dtype, shape and values.

    Values are hashed in the standard memory layout on the CPU, so moving the model or
    making it channels_last does not change it; any change to a weight, a buffer or a dtype
    does. About 1.7 GB/s (ResNet18: 30 ms), paid once per model: the digest is reused
    while every tensor is the same object, in the same memory, unchanged in place (its
    version counter has not moved).
    """
    tensors = model.state_dict(keep_vars=True)
    cached = _FINGERPRINTS.get(model)
    if cached is not None and _unchanged(cached[0], tensors):
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())
    try:
        _FINGERPRINTS[model] = ({name: (weakref.ref(t), t.data_ptr(), t._version)
                                 for name, t in tensors.items()}, digest.hexdigest())
    except RuntimeError:  # inference tensors have no version counter: not cached
        pass
    return digest.hexdigest()


def _unchanged(seen: dict[str, tuple], tensors: dict[str, torch.Tensor]) -> bool:
    if seen.keys() != tensors.keys():
        return False
    for name, tensor in tensors.items():
        ref, pointer, version = seen[name]
        if ref() is not tensor or tensor.data_ptr() != pointer or tensor._version != version:
            return False
    return True


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tune_allocator() -> bool:
    """Tell glibc malloc to keep freed memory instead of returning it to the kernel.

    Every forward pass frees and re-allocates large activation buffers; by default glibc
    serves them with fresh ``mmap`` calls and page faults (15-27% of CPU time measured in
    PERFORMANCE.md). ``M_MMAP_MAX = 0`` and a huge ``M_TRIM_THRESHOLD`` keep them in the
    heap: RSS stays at the peak of one batch (flat, whatever the slide size). Opt out with
    ``HISTOHUB_MALLOPT=0``. Returns True when applied (glibc only; once per process).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is not None:
        return _ALLOCATOR_TUNED
    _ALLOCATOR_TUNED = False
    if os.environ.get("HISTOHUB_MALLOPT", "1") in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = mallopt(m_trim_threshold, 1 << 30) == 1 and mallopt(m_mmap_max, 0) == 1
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED


_ALLOCATOR_TUNED: bool | None = None


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
    ``COMPILE_MIN_PATCHES`` images; the first call takes 10-30 s).
    """
    from tqdm.auto import tqdm

    from .transforms import get_transform, normalize_batch

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
