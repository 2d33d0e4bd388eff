"""Decode images and masks into fixed-size uint8 tensors (mixed sizes are resized).

Decoding runs in a small thread pool: PIL releases the GIL while it decodes, and on two
cores a thread for I/O is the cheap kind of overlap (``shared/PERFORMANCE.md``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .datasets import MASK_THRESHOLD, DatasetError


def read_image(path: Path, size: int) -> np.ndarray:
    """One RGB image resized (bilinear) to ``(size, size, 3)`` uint8."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.array(image, dtype=np.uint8)   # a writable copy, for torch
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"Cannot read image {path}: {error}") from None


def read_mask(path: Path, size: int, *, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """One mask resized (nearest) to ``(size, size)``, binarised: 1 where >= ``threshold``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.NEAREST)
            return (np.asarray(image) >= threshold).astype(np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"Cannot read mask {path}: {error}") from None


def load_images(paths: Sequence[Path], size: int, *, threads: int = 2,
                progress: bool = False, desc: str = "images") -> torch.Tensor:
    """All ``paths`` as one uint8 tensor ``(N, 3, size, size)``."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for start, batch in iter_image_batches(paths, size, batch_size=64, threads=threads,
                                           progress=progress, desc=desc):
        out[start:start + len(batch)] = batch
    return out


def load_masks(paths: Sequence[Path], size: int, *, threads: int = 2) -> torch.Tensor:
    """All masks as one int64 tensor ``(N, size, size)`` of 0 / 1."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        masks = list(pool.map(lambda p: read_mask(p, size), paths))
    return torch.from_numpy(np.stack(masks)).long()


def iter_image_batches(paths: Sequence[Path], size: int, *, batch_size: int, threads: int = 2,
                       progress: bool = False, desc: str = "images"
                       ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, uint8 (B, 3, size, size))`` batches; the next batch decodes meanwhile."""
    from tqdm.auto import tqdm

    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=threads) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        def submit(start: int):
            return [pool.submit(read_image, p, size) for p in paths[start:start + batch_size]]

        pending = submit(starts[0]) if starts else []
        for i, start in enumerate(starts):
            current = pending
            pending = submit(starts[i + 1]) if i + 1 < len(starts) else []
            arrays = [f.result() for f in current]
            batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
            bar.update(len(arrays))
            yield start, batch
