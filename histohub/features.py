"""Batched feature extraction: patches in, ``(N, D)`` features out; whole slides to HDF5.

- ``extract_features(model, inputs)``: a tensor batch, PIL images, a folder of images or a
  torch ``Dataset`` -> features in input order (with file names for a folder).
- ``extract_slide(model, slide, out_h5)``: tile a slide at the model's microns per pixel
  (``histohub.wsi``), read patches while the model runs, and append the features to an
  HDF5 file (``histohub._h5``) batch by batch; resumable, corrupt tiles skipped.

Nothing is lost and nothing is trusted by accident: options are checked before anything
runs (``check_options``, shared with the command line); a file histohub did not write is
never replaced; an existing feature file counts as done only for the same request (the
same slide contents, model weights, preprocessing and tiling, and no fewer patches); a
partial file is resumed only with the same weights and grid; a full disk is one clear
error (``DiskFullError``) and the partial file is removed.

The model always runs in eval mode under ``torch.inference_mode``, channels_last (the
largest single speed-up on CPU; see PERFORMANCE.md). Patch reading overlaps the model in a
reader thread by default: OpenSlide's reads, JPEG decoding and PIL's resize release the
GIL, so on a 2-core machine a thread costs the model far less than worker processes do.
``num_workers > 0`` uses DataLoader worker processes instead (each opens its own slide
handle), which pays off with a GPU and more cores.
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
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .errors import HistohubError, OutputExistsError, SlideError, check_option

if TYPE_CHECKING:
    from ._manifest import Preprocessing
    from .wsi import TileGrid

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: Batches read ahead of the model (memory: this many batches of uint8 patches).
PREFETCH_BATCHES = 2
#: Bytes read at each end of a slide file for its fingerprint.
SLIDE_SAMPLE_BYTES = 1 << 20
#: Rows per HDF5 chunk at most (fewer for slides with fewer patches).
CHUNK_ROWS = 256
_AMP = (False, True, "bf16", "bfloat16", "fp16", "float16")


# --------------------------------------------------------------------------- options

def _option_rules() -> dict[str, dict[str, Any]]:
    from .wsi import MASK_METHODS, MPP_RANGE

    mpp = {"low": MPP_RANGE[0], "high": MPP_RANGE[1], "optional": True}
    return {
        "batch_size": {"integer": True, "low": 1},
        "num_workers": {"integer": True, "low": 0},
        "max_patches": {"integer": True, "low": 1, "optional": True},
        "mpp": mpp, "target_mpp": mpp,
        "min_foreground": {"low": 0, "high": 1},
        "mask": {"choices": MASK_METHODS},
        "amp": {"choices": _AMP},
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


@dataclass
class SlideResult:
    """What ``extract_slide`` did for one slide."""

    slide_path: Path
    output: Path
    n_patches: int
    n_failed: int = 0
    n_nonfinite: int = 0
    n_grid: int = 0
    seconds: float = 0.0
    skipped: bool = False   # already complete, not recomputed
    resumed_at: int = 0     # grid position a partial run was continued from
    patches_run: int = 0    # patches put through the model in this call
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class _ModelSpec:
    name: str
    arch: str
    sha256: str
    feature_dim: int | None
    preprocessing: Preprocessing


def _resolve_model(model_or_name: nn.Module | str | os.PathLike, *, device: torch.device,
                   progress: bool) -> tuple[nn.Module, _ModelSpec]:
    """A module (used as is) or a manifest name / checkpoint path (``load_pretrained``)."""
    from .pretrained import _default_preprocessing, load_pretrained

    if isinstance(model_or_name, nn.Module):
        model = model_or_name
    else:
        model = load_pretrained(model_or_name, device=device, progress=progress)
    info = getattr(model, "histohub_info", None)
    if info is None:
        spec = _ModelSpec(type(model).__name__, "", "", None, _default_preprocessing())
    else:
        spec = _ModelSpec(info.name, info.arch, info.sha256 or "", info.feature_dim,
                          info.preprocessing or _default_preprocessing())
    return model, spec


class _Runner:
    """Runs a model on normalised float batches: eval, inference_mode, channels_last,
    optional autocast and ``torch.compile``. Returns float32 CPU features ``(B, D)``."""

    def __init__(self, model: nn.Module, *, device: torch.device, amp: bool | str,
                 compile: bool, batch_size: int) -> None:
        model = model.eval().to(device=device, memory_format=torch.channels_last)
        self.device = device
        self.batch_size = batch_size
        self.compiled = bool(compile)
        self.model = torch.compile(model, dynamic=False) if compile else model
        self.autocast = _autocast(device, amp)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        if self.compiled and n < self.batch_size:  # one shape: no recompilation for the tail
            pad = batch.new_zeros((self.batch_size - n, *batch.shape[1:]))
            batch = torch.cat([batch, pad])
        batch = batch.to(self.device, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast():
            out = self.model(batch)
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise HistohubError(f"the model must return a (B, D) tensor of features, got "
                                f"{getattr(out, 'shape', type(out))}; wrap it so it returns "
                                "pooled features")
        return out[:n].float().cpu()


def _autocast(device: torch.device, amp: bool | str) -> Callable[[], Any]:
    if not amp:
        return nullcontext
    dtype = {True: torch.bfloat16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}.get(amp)
    if dtype is None:
        raise ValueError(f"amp={amp!r}: use False, True (bfloat16), 'bf16' or 'fp16'")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


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


# --------------------------------------------------------------------------- patches in memory

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
                     num_workers: int = 0, amp: bool | str = False, compile: bool = False,
                     progress: bool = True) -> FeatureResult:
    """Features of images, in input order: ``FeatureResult.features`` is float32 ``(N, D)``.

    ``inputs``: a tensor ``(B, 3, H, W)`` (uint8 is resized and normalised with the model's
    preprocessing; float is taken as already preprocessed), a list of PIL images, a folder
    of image files (png/jpg/jpeg/tif/tiff at any depth, sorted by relative path; names
    returned), or a torch ``Dataset`` (items: PIL image, tensor, or a tuple starting with
    one). ``model_or_name``: an ``nn.Module`` or a name / checkpoint path for
    ``load_pretrained``. ``num_workers``: DataLoader worker processes (0 reads in a thread
    overlapping the model). ``amp``: autocast (True = bfloat16, or 'fp16'); ``compile``:
    ``torch.compile`` (pays off on GPU; its first call takes 10-30 s).
    """
    from tqdm.auto import tqdm

    from .transforms import get_transform, normalize_batch

    check_options(batch_size=batch_size, num_workers=num_workers, amp=amp)
    device = torch.device(device)
    if device.type == "cpu":
        tune_allocator()
    model, spec = _resolve_model(model_or_name, device=device, progress=progress)
    runner = _Runner(model, device=device, amp=amp, compile=compile, batch_size=batch_size)
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
            collate_fn=_collate, pin_memory=device.type == "cuda")
        batches = loader if num_workers > 0 else prefetch(loader)
        total = len(dataset)

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
                outputs.append(runner(batch))
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


# --------------------------------------------------------------------------- slides

class SlidePatches(torch.utils.data.Dataset):
    """Patches of a ``TileGrid`` for DataLoader workers: item -> ``(uint8 (S, S, 3), ok)``.

    Each worker process opens its own slide handle on first use.
    """

    def __init__(self, grid: TileGrid, interpolation: str = "bilinear") -> None:
        self.grid, self.interpolation = grid, interpolation
        self._reader = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, index: int):
        from .wsi import PatchReader, TileReadError

        if self._reader is None or self._pid != os.getpid():
            self._reader, self._pid = PatchReader(self.grid, interpolation=self.interpolation), \
                os.getpid()
        try:
            return torch.from_numpy(self._reader.read(index)), True
        except TileReadError as error:
            log.warning("%s: %s; skipped", Path(self.grid.slide_path).name, error)
            size = self.grid.patch_size
            return torch.zeros((size, size, 3), dtype=torch.uint8), False


def _batch_ranges(start: int, stop: int, batch_size: int) -> list[range]:
    """Grid positions in batches aligned to multiples of ``batch_size`` (so a resumed run
    forms the same batches as an uninterrupted one)."""
    first = min(stop, (start // batch_size + 1) * batch_size)
    ranges = [range(start, first)] if first > start else []
    ranges += [range(i, min(i + batch_size, stop)) for i in range(first, stop, batch_size)]
    return ranges


def _thread_batches(grid: TileGrid, ranges: list[range], interpolation: str
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Read batches one after the other (run it in a thread: ``prefetch``):
    (uint8 (b, S, S, 3), grid indices read, grid indices that failed)."""
    from .wsi import PatchReader, TileReadError

    reader = PatchReader(grid, interpolation=interpolation)
    size = grid.patch_size
    try:
        for positions in ranges:
            pixels = np.empty((len(positions), size, size, 3), np.uint8)
            ok: list[int] = []
            failed: list[int] = []
            for index in positions:
                try:
                    pixels[len(ok)] = reader.read(index)
                    ok.append(index)
                except TileReadError as error:
                    log.warning("%s: %s; skipped", Path(grid.slide_path).name, error)
                    failed.append(index)
            yield pixels[:len(ok)], np.asarray(ok, np.int64), np.asarray(failed, np.int64)
    finally:
        reader.close()


def _worker_batches(grid: TileGrid, ranges: list[range], interpolation: str,
                    num_workers: int, pin_memory: bool
                    ) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
    """Read batches in DataLoader worker processes (each with its own slide handle)."""
    loader = torch.utils.data.DataLoader(
        SlidePatches(grid, interpolation), batch_sampler=ranges,
        num_workers=num_workers, pin_memory=pin_memory, collate_fn=_stack_patches,
        multiprocessing_context="spawn" if sys.platform == "darwin" else None)
    for positions, (pixels, ok) in zip(ranges, loader):
        positions = np.asarray(positions, np.int64)
        yield pixels, positions[ok], positions[~ok]


def _stack_patches(batch: list) -> tuple[torch.Tensor, np.ndarray]:
    ok = np.array([flag for _, flag in batch], bool)
    kept = [pixels for pixels, flag in batch if flag]
    if not kept:
        return torch.empty((0, *batch[0][0].shape), dtype=torch.uint8), ok
    return torch.stack(kept), ok


def grid_sha256(coords: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(coords, np.int64).tobytes()).hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a module's weights: every state-dict entry's name, dtype, shape and values.

    Values are hashed in the standard memory layout on the CPU, so moving the model or
    making it channels_last does not change it; any change to a weight, a buffer or a dtype
    does. About 1.7 GB/s (ResNet18: 30 ms).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def slide_fingerprint(path: str | os.PathLike) -> tuple[int, str]:
    """``(size in bytes, sha256 of the size and the first and last MiB)`` of a slide file:
    tells two slides apart (the header holds the tile offsets, the end the last tiles)
    without reading tens of GB, and stays the same when the file is moved or copied. For
    formats with companion files (.mrxs, .vms) only the named file is covered."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(f"{size}\0".encode())
    with open(path, "rb") as f:
        digest.update(f.read(SLIDE_SAMPLE_BYTES))
        if size > SLIDE_SAMPLE_BYTES:
            f.seek(max(SLIDE_SAMPLE_BYTES, size - SLIDE_SAMPLE_BYTES))
            digest.update(f.read(SLIDE_SAMPLE_BYTES))
    return size, digest.hexdigest()


def extract_slide(model_or_name: nn.Module | str | os.PathLike, slide_path: str | os.PathLike,
                  out_h5: str | os.PathLike, *, mpp: float | None = None,
                  target_mpp: float | None = None, batch_size: int = 64,
                  device: str | torch.device = "cpu", num_workers: int = 0,
                  amp: bool | str = False, compile: bool = False, mask: str = "hsv",
                  min_foreground: float = 0.5, overwrite: bool = False,
                  preview: str | os.PathLike | None = None, max_patches: int | None = None,
                  progress: bool = True) -> SlideResult:
    """Features of every tissue patch of a slide, streamed into an HDF5 file.

    Tiles the slide at ``target_mpp`` (default: the model's, from the manifest; 0.5 um/px
    for the paper's models) with 224 px patches holding at least ``min_foreground`` tissue
    (``mask``: the paper's 'hsv' rule or 'otsu'), reads them while the model runs, and
    appends ``features`` (N, D) and ``coords`` (N, 2) to ``out_h5`` (layout:
    ``histohub._h5``). ``mpp`` gives the slide's microns per pixel when the file lacks it.
    ``max_patches`` keeps the first N grid patches (for quick trials). ``preview``: write a
    PNG of the mask and grid there. Corrupt tiles are logged, recorded in ``failed_coords``
    and skipped; NaN/inf features go to ``nonfinite_coords`` with a warning.

    Options are checked first (``OptionError``). Unless ``overwrite``:

    - a file at ``out_h5`` that histohub did not write raises ``OutputExistsError``;
    - a complete ``out_h5`` made for this request (same slide contents, model weights,
      preprocessing, mpp, tiling) is left alone (``skipped``); one from a ``max_patches``
      trial that this call extends is redone; one made for another request, or holding more
      patches than asked for, raises ``OutputExistsError`` saying what differs;
    - a ``.partial`` file from a killed run is resumed when it was made with the same
      weights and grid, and started over (with a warning) otherwise.

    A full disk raises ``DiskFullError`` (an OSError) and removes the partial file.
    """
    from ._h5 import FeatureWriter, disk_full_error, is_disk_full
    from .wsi import open_slide, preview as write_preview, tile_grid

    check_options(batch_size=batch_size, num_workers=num_workers, max_patches=max_patches,
                  mpp=mpp, target_mpp=target_mpp, min_foreground=min_foreground, mask=mask,
                  amp=amp)
    started = time.perf_counter()
    out_h5, slide_path = Path(out_h5), Path(slide_path)
    if not overwrite:
        _refuse_foreign(out_h5)
    device = torch.device(device)
    if device.type == "cpu":
        tune_allocator()
    model, spec = _resolve_model(model_or_name, device=device, progress=progress)
    pre = spec.preprocessing
    target = target_mpp if target_mpp is not None else pre.mpp
    if target is None:
        raise SlideError(f"the model {spec.name!r} does not state the microns per pixel it "
                         "expects; pass target_mpp= (--target-mpp), e.g. 0.5")
    with open_slide(slide_path) as slide:
        request = _request(spec, model, slide, mpp=mpp, target_mpp=target, mask=mask,
                           min_foreground=min_foreground)
        done = None if overwrite else _done(out_h5, request, max_patches=max_patches)
        if done is not None:
            log.info("%s: already done (%s); pass overwrite=True to redo it", slide_path.name,
                     out_h5)
            return SlideResult(slide_path, out_h5, int(done["n_patches"]),
                               int(done["n_failed"]), int(done["n_nonfinite"]),
                               int(done["n_grid"]), skipped=True)
        grid = tile_grid(slide, target_mpp=target, patch_size=pre.input_size,
                         min_foreground=min_foreground, method=mask, mpp_override=mpp)
        n_tissue = len(grid)
        if max_patches is not None:
            grid = _truncate(grid, max_patches)
        if preview is not None:
            try:
                write_preview(slide, grid, preview)
            except OSError as error:
                if not is_disk_full(error):
                    raise
                Path(preview).unlink(missing_ok=True)
                raise disk_full_error(Path(preview), error) from error
    result = SlideResult(slide_path, out_h5, 0, n_grid=len(grid))
    if len(grid) == 0:
        message = (f"{slide_path.name}: no patch has >= {min_foreground:.0%} tissue "
                   f"({mask} mask); the output holds no features. Try --mask otsu or a lower "
                   "--min-foreground, and check the preview (--preview)")
        log.warning(message)
        result.warnings.append(message)
    runner = _Runner(model, device=device, amp=amp, compile=compile, batch_size=batch_size)
    feature_dim = spec.feature_dim or _probe_dim(runner, pre.input_size)
    attrs = _attrs(spec, request, grid, feature_dim, n_tissue=n_tissue, max_patches=max_patches)
    with _output_lock(out_h5):
        writer = FeatureWriter(out_h5, attrs=attrs, feature_dim=feature_dim,
                               coords_attrs=_coords_attrs(grid), resume=not overwrite,
                               chunk_rows=max(1, min(CHUNK_ROWS, len(grid))))
        result.resumed_at = writer.next_index
        try:
            _run_grid(runner, writer, grid, pre, batch_size=batch_size,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      progress=progress, result=result)
            result.n_patches, result.n_failed = writer.n_patches, writer.n_failed
            result.n_nonfinite = writer.n_nonfinite
            writer.finish(overwrite=overwrite)
        finally:
            writer.close()
    if result.n_failed:
        result.warnings.append(f"{slide_path.name}: {result.n_failed} patches could not be "
                               "read and were skipped (failed_coords)")
    if result.n_nonfinite:
        result.warnings.append(f"{slide_path.name}: {result.n_nonfinite} patches gave NaN/inf "
                               "features and were left out (nonfinite_coords)")
    result.seconds = time.perf_counter() - started
    return result


_MODEL_ATTRS = ("model_name", "arch", "model_fingerprint", "norm_mean", "norm_std",
                "interpolation")
_SLIDE_ATTRS = ("slide_size", "slide_fingerprint", "slide_width", "slide_height")
#: What a complete feature file must share with a request to count as done for it.
REQUEST_ATTRS = (*_MODEL_ATTRS, *_SLIDE_ATTRS, "slide_mpp", "target_mpp", "patch_size",
                 "mask_method", "min_foreground")


def _request(spec: _ModelSpec, model: nn.Module, slide, *, mpp: float | None,
             target_mpp: float, mask: str, min_foreground: float) -> dict[str, Any]:
    """The ``REQUEST_ATTRS`` of this call, known without tiling the slide."""
    from .wsi import _slide_mpp

    pre = spec.preprocessing
    size, fingerprint = slide_fingerprint(slide.path)
    return {
        "model_name": spec.name, "arch": spec.arch, "model_fingerprint": model_fingerprint(model),
        "norm_mean": tuple(float(v) for v in pre.mean),
        "norm_std": tuple(float(v) for v in pre.std), "interpolation": pre.interpolation,
        "slide_size": size, "slide_fingerprint": fingerprint,
        "slide_width": slide.dimensions[0], "slide_height": slide.dimensions[1],
        # as tile_grid will take it (an mpp given by the user is checked, and warned about, there)
        "slide_mpp": float(mpp) if mpp is not None else _slide_mpp(slide, None)[0],
        "target_mpp": float(target_mpp), "patch_size": pre.input_size, "mask_method": mask,
        "min_foreground": float(min_foreground),
    }


def _refuse_foreign(out_h5: Path) -> None:
    """``OutputExistsError`` when ``out_h5`` or its partial file is not histohub's."""
    from ._h5 import foreign, partial_path

    for path in (out_h5, partial_path(out_h5)):
        if foreign(path):
            raise OutputExistsError(
                f"{path} exists and was not written by histohub; it is left as is. Pass "
                "--overwrite (overwrite=True) to replace it, or choose another output folder")


def _done(out_h5: Path, request: dict[str, Any], *, max_patches: int | None
          ) -> dict[str, Any] | None:
    """The attributes of ``out_h5`` when it is complete and made for this request (reuse
    it); None when it is to be made (absent, unfinished, or a shorter max_patches trial);
    ``OutputExistsError`` when replacing it would lose features of another request."""
    from ._h5 import read_attrs, same_value

    attrs = read_attrs(out_h5) if out_h5.exists() else None
    if attrs is None or not attrs.get("completed"):
        return None
    keep = "it is kept. Pass --overwrite (overwrite=True) to replace it, or choose another " \
           "output folder"
    missing = [k for k in (*REQUEST_ATTRS, "n_tissue") if k not in attrs]
    if missing:
        raise OutputExistsError(
            f"{out_h5} was made by histohub {attrs.get('histohub_version', '?')}, which did not "
            f"record {', '.join(missing)}, so whether it matches this request is unknown; {keep}")
    differing = [k for k in REQUEST_ATTRS if not same_value(attrs[k], request[k])]
    if differing:
        raise OutputExistsError(f"{out_h5} holds features made for another request "
                                f"({_differences(attrs, request, differing)}); {keep}")
    have, total = int(attrs["n_grid"]), int(attrs["n_tissue"])
    want = total if max_patches is None else min(max_patches, total)
    if want > have:
        log.warning("%s: a trial of %d of %d patches (max_patches=%d); extracting %d now",
                    out_h5, have, total, attrs.get("max_patches", 0), want)
        return None
    if want < have:
        raise OutputExistsError(f"{out_h5} holds {have} patches of this slide, more than the "
                                f"{want} asked for (max_patches={max_patches}); {keep}")
    return attrs


def _differences(attrs: dict[str, Any], request: dict[str, Any], keys: list[str]) -> str:
    """``another slide (slide_size, slide_fingerprint differ; the file's: /a/s.svs);
    min_foreground 0.5 in the file, 0.2 now``."""
    parts = []
    for what, group, source in (("another slide", _SLIDE_ATTRS, "slide_path"),
                                ("another model", _MODEL_ATTRS, "model_name")):
        if differing := [k for k in keys if k in group]:
            parts.append(f"{what} ({', '.join(differing)} differ; the file's: "
                         f"{attrs.get(source)})")
    parts += [f"{k} {_short(attrs[k])} in the file, {_short(request[k])} now" for k in keys
              if k not in _SLIDE_ATTRS + _MODEL_ATTRS]
    return "; ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) > 16:
        return value[:12] + "..."
    if isinstance(value, (np.ndarray, tuple, list)):
        return str([round(float(v), 4) for v in value])
    return repr(value)


def _run_grid(runner: _Runner, writer, grid: TileGrid, pre: Preprocessing, *, batch_size: int,
              num_workers: int, pin_memory: bool, progress: bool, result: SlideResult) -> None:
    from tqdm.auto import tqdm

    from .transforms import normalize_batch

    ranges = _batch_ranges(writer.next_index, len(grid), batch_size)
    if num_workers > 0:
        batches = _worker_batches(grid, ranges, pre.interpolation, num_workers, pin_memory)
    else:
        batches = prefetch(_thread_batches(grid, ranges, pre.interpolation))
    name = Path(grid.slide_path).name
    with tqdm(total=len(grid), initial=writer.next_index, unit="patch", desc=name[:30],
              disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for positions, (pixels, ok, failed) in zip(ranges, batches):
            pixels = torch.as_tensor(pixels)
            features = np.zeros((0, writer.feature_dim), np.float32)
            nonfinite = np.zeros(0, np.int64)
            if len(ok):
                # (b, S, S, 3) -> (b, 3, S, S) is a channels_last view: no copy
                batch = pixels.permute(0, 3, 1, 2).to(runner.device, non_blocking=True)
                batch = normalize_batch(batch, pre)
                out = runner(batch).numpy()
                finite = np.isfinite(out).all(axis=1)
                if not finite.all():
                    log.warning("%s: %d patches gave NaN/inf features, left out (coords %s)",
                                name, int((~finite).sum()), grid.coords[ok[~finite]][:3].tolist())
                features, nonfinite, ok = out[finite], ok[~finite], ok[finite]
            writer.append(features, grid.coords[ok], next_index=positions.stop,
                          failed_coords=grid.coords[failed], nonfinite_coords=grid.coords[nonfinite])
            result.patches_run += len(positions)
            bar.update(len(positions))


@contextmanager
def _output_lock(out_h5: Path) -> Iterator[None]:
    """Hold ``.<name>.h5.lock`` next to the output so two runs never write one slide."""
    from filelock import FileLock, Timeout

    out_h5.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out_h5.parent / f".{out_h5.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise HistohubError(f"{out_h5} is being written by another histohub process; "
                            "skipped (run again once it has finished)") from None
    try:
        yield
    finally:
        lock.release()


def _probe_dim(runner: _Runner, size: int) -> int:
    """Feature dimension of a model without ``histohub_info``: one forward pass on zeros."""
    return int(runner(torch.zeros(1, 3, size, size)).shape[1])


def _truncate(grid: TileGrid, n: int) -> TileGrid:
    from dataclasses import replace

    return replace(grid, coords=grid.coords[:n], foreground=grid.foreground[:n])


def _attrs(spec: _ModelSpec, request: dict[str, Any], grid: TileGrid, feature_dim: int, *,
           n_tissue: int, max_patches: int | None) -> dict[str, Any]:
    from . import __version__

    return {
        **request, "histohub_version": __version__, "model_sha256": spec.sha256,
        "feature_dim": feature_dim,
        "slide_path": str(Path(grid.slide_path).resolve()),
        "slide_name": Path(grid.slide_path).name,
        "slide_width": grid.slide_dimensions[0], "slide_height": grid.slide_dimensions[1],
        "slide_mpp": grid.slide_mpp, "mpp_source": grid.mpp_source,
        "target_mpp": grid.target_mpp, "patch_size": grid.patch_size, "level": grid.level,
        "level_downsample": grid.level_downsample, "read_size": grid.read_size,
        "patch_size_level0": grid.patch_size_level0, "mask_method": grid.mask_method,
        "min_foreground": grid.min_foreground, "n_grid": len(grid),
        "grid_sha256": grid_sha256(grid.coords), "n_tissue": n_tissue,
        "max_patches": max_patches or 0, "truncated": len(grid) < n_tissue,
    }


def _coords_attrs(grid: TileGrid) -> dict[str, Any]:
    """The attributes CLAM and TRIDENT put on ``coords``."""
    return {"patch_size": grid.read_size, "patch_level": grid.level,
            "patch_size_level0": grid.patch_size_level0, "target_mpp": grid.target_mpp,
            "level_dim": np.asarray(grid.slide_dimensions, np.int64)}
