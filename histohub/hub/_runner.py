"""The model side of feature extraction: a model placed on its device once, then run on
batch after batch.

- ``resolve_model``: an ``nn.Module`` (used as is) or a manifest name / checkpoint path ->
  the model and its ``ModelDescriptor`` (name, architecture, weights' sha256,
  preprocessing; ``_descriptor``).
- ``local_model_spec``: the descriptor of a model whose weights are already on this
  machine (a checkpoint file, a bundled or cached model), known before they are read, so
  slides can be tiled while the weights load.
- ``ModelRunner``: eval, channels_last, optional autocast and ``torch.compile``; normalised
  float batches ``(B, 3, S, S)``, or uint8 pixels ``(B, S, S, 3)`` moved to the device
  (pinned memory, ``non_blocking``) and normalised there -> float32 CPU ``(B, D)``.
- ``model_fingerprint``: sha256 of a module's weights, whatever its device or layout.
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
import sys
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from histohub._env import mallopt_enabled
from histohub._limits import max_batch_size
from histohub.errors import HistohubError, check_option
from histohub.hub._descriptor import ModelDescriptor, describe_model, describe_module

if TYPE_CHECKING:
    from histohub.hub._schema import Preprocessing

log = logging.getLogger(__name__)

#: With ``compile="auto"`` on a CPU, compile when a job holds at least this many patches.
#: Measured on 2 cores (ResNet18, 224 px, batch 64, ``benchmarks/bench_compile.py``):
#: compiling costs 25 s with an empty inductor cache (4 s once warm) and runs the model
#: 1.06-1.08x faster (PERFORMANCE.md saw up to 1.37x in a slow spell), so it pays for itself
#: after 1,900 (warm cache) to 8,500 patches (cold); above that, a job always gains.
COMPILE_MIN_PATCHES = 10000
COMPILE_CHOICES = (False, True, "auto")
_AMP = (False, True, "bf16", "bfloat16", "fp16", "float16")
#: The runner's options and their allowed values (``errors.check_option`` rules);
#: ``features.check_options`` checks these with the other extraction options.
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    "batch_size": {"integer": True, "low": 1, "high": max_batch_size()},
    "amp": {"choices": _AMP},
    "compile": {"choices": COMPILE_CHOICES},
}


def resolve_model(model_or_name: nn.Module | str | os.PathLike | ModelDescriptor, *,
                  device: torch.device, progress: bool) -> tuple[nn.Module, ModelDescriptor]:
    """A module (used as is), a manifest name / checkpoint path (``load_pretrained``) or a
    descriptor (``describe_model``'s, loaded) -> the model and its ``ModelDescriptor``."""
    from histohub.hub._pretrained import load_described, load_pretrained

    if isinstance(model_or_name, nn.Module):
        model = model_or_name
    elif isinstance(model_or_name, ModelDescriptor):
        model = load_described(model_or_name, progress=progress).to(device).eval()
    else:
        model = load_pretrained(model_or_name, device=device, progress=progress)
    return model, describe_module(model)


def local_model_spec(model_or_name: nn.Module | str | os.PathLike) -> ModelDescriptor | None:
    """The descriptor of a model whose weights are here, known before they are read: a
    checkpoint file (its first bytes are checked now, so a file that is no checkpoint is
    refused at once), or a manifest model bundled in the package or cached and verified
    (from the manifest alone). None for a module, an unknown name or weights still to
    download: those are resolved now, so their errors come first. Name or file is decided
    by ``describe_model``.

    ``sha256`` is the pinned hash of the file the load is expected to use (None for a
    checkpoint file, whose ``arch`` and ``feature_dim`` are unknown until it is read);
    ``resolve_model`` gives the authoritative descriptor once the weights are loaded.
    """
    from histohub.hub._checkpoint import sniff_format
    from histohub.hub._cache import cache_status
    from histohub.errors import UnknownModelError

    if isinstance(model_or_name, nn.Module):
        return None
    try:
        described = describe_model(model_or_name)
    except UnknownModelError:
        return None
    if described.file is not None:
        sniff_format(described.file)
        return described
    for file in described.entry.weights:
        bundled = any(s.package_path is not None and s.package_path.is_file()
                      for s in file.sources)
        if bundled or cache_status(file) == "verified":
            return replace(described, sha256=file.sha256)
    return None


class ModelRunner:
    """Runs a model batch after batch: eval, ``inference_mode``, channels_last, optional
    autocast (``amp``) and ``torch.compile``, compiled at most once.

    ``compile``: True compiles now, False never, ``"auto"`` once ``plan()`` is told of a
    job worth it (on a CPU, at least ``COMPILE_MIN_PATCHES`` patches). A compiled model
    runs the full batches (one static shape); a shorter batch (a job's last: a cohort's
    batches run across slide boundaries) runs the same weights eagerly, so nothing is padded
    and nothing recompiles.

    Shape: ``run(batch)``: float ``(B, 3, S, S)`` -> float32 CPU ``(B, D)``;
    ``run_pixels(pixels)``: uint8 ``(B, S, S, 3)`` -> float32 CPU ``(B, D)``.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu",
                 amp: bool | str = False, compile: bool | str = False, batch_size: int = 64,
                 preprocessing: Preprocessing | None = None, fingerprint: bool = False
                 ) -> None:
        for name, value in (("batch_size", batch_size), ("amp", amp), ("compile", compile)):
            check_option(name, value, **MODEL_OPTIONS[name])
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.preprocessing = preprocessing
        # hashed before channels_last: in the layout weights load in, hashing copies nothing
        digest = model_fingerprint(model) if fingerprint else None
        self.eager = model.eval().to(device=self.device, memory_format=torch.channels_last)
        if digest is not None:
            remember_fingerprint(self.eager, digest)
        self.autocast = _autocast(self.device, amp)
        self.compile_mode = compile
        self.compiled: nn.Module | None = None
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
        from histohub.hub._transforms import normalize_batch

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
    remember_fingerprint(model, digest.hexdigest())
    return digest.hexdigest()


def remember_fingerprint(model: nn.Module, digest: str) -> None:
    """Record ``digest`` as the fingerprint of ``model``'s weights as they are now in memory,
    e.g. after moving them or changing their memory format, which keeps their values."""
    tensors = model.state_dict(keep_vars=True)
    try:
        _FINGERPRINTS[model] = ({name: (weakref.ref(t), t.data_ptr(), t._version)
                                 for name, t in tensors.items()}, digest)
    except RuntimeError:  # inference tensors have no version counter: not cached
        pass


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
    if not mallopt_enabled():
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
