"""Pretraining data: image folders, patches sampled from slides, and a capped pool of both.

Paper section 5.4: at most ``patches_per_slide`` (100) foreground patches are sampled from
each slide at the chosen resolution (foreground as in Appendix B, via ``histohub.slides._reader``);
then ``percent`` of each dataset is drawn, at least ``min_per_dataset`` (10) and at most
``max_per_dataset`` (2,000) images per dataset, so large datasets cannot swamp small ones.
Within a dataset the draw is uniform without replacement.

A pool is written to ``pool.json`` in the run folder, so every process and every resumed
run trains on exactly the same images. Images that cannot be read while training are
replaced by the next readable one (the batch stays full and deterministic), counted and
reported.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histohub.files import write_text_atomic
from histohub.files import IMAGE_EXTENSIONS
from histohub.errors import SlideError

log = logging.getLogger(__name__)

_MAX_REPLACEMENTS = 16


@dataclass(frozen=True)
class DatasetSpec:
    """One source: ``kind`` "images" (a folder, any nesting) or "slides" (a folder of WSIs)."""

    path: str
    kind: str = "images"
    name: str = ""
    patches_per_slide: int = 100
    mpp: float = 0.5
    min_foreground: float = 0.5
    mpp_override: float | None = None
    pattern: str | None = None  # images only: keep files whose path under ``path`` matches
    max_images: int | None = None  # this dataset's cap, instead of ``max_per_dataset``


def parse_datasets(entries: Sequence[Any], *, patches_per_slide: int = 100, mpp: float = 0.5,
                   min_foreground: float = 0.5) -> list[DatasetSpec]:
    """``"/folder"``, ``"slides:/folder"`` or ``{"path": ..., "kind": ..., ...}`` -> specs."""
    specs = []
    defaults = {"patches_per_slide": patches_per_slide, "mpp": mpp,
                "min_foreground": min_foreground}
    for entry in entries:
        if isinstance(entry, str):
            kind, sep, path = entry.partition(":")
            entry = ({"path": path, "kind": kind} if sep and kind in ("slides", "images")
                     else {"path": entry})
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"Dataset {entry!r}: give a folder, 'slides:/folder' or an object "
                             "with 'path'")
        known = {f.name for f in dataclasses.fields(DatasetSpec)}
        if set(entry) - known:
            raise ValueError(f"Dataset {entry!r}: unknown key(s) {sorted(set(entry) - known)}")
        spec = DatasetSpec(**{**defaults, **entry})
        if spec.kind not in ("images", "slides"):
            raise ValueError(f"Dataset {spec.path}: kind must be 'images' or 'slides'")
        if not Path(spec.path).is_dir():
            raise FileNotFoundError(f"Dataset folder {spec.path} does not exist")
        specs.append(dataclasses.replace(spec, name=spec.name or Path(spec.path).name))
    if not specs:
        raise ValueError("No datasets: set data.datasets, e.g. "
                         "'data.datasets=[\"/data/tiles\", \"slides:/data/wsis\"]'")
    return specs


def list_images(root: str | os.PathLike, pattern: str | None = None) -> list[str]:
    """Every image file under ``root`` (any nesting), sorted for determinism.

    ``pattern``: a glob on the path relative to ``root`` (``*/image/*`` keeps EBHI-Seg's
    images and leaves out its masks in ``*/label/*``).
    """
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(folder, f) for f in sorted(files)
                     if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if pattern:
        found = [f for f in found
                 if fnmatch.fnmatch(Path(f).relative_to(root).as_posix(), pattern)]
    return found


def list_slides(root: str | os.PathLike) -> list[str]:
    """Every whole-slide image under ``root`` (any nesting), sorted."""
    from histohub.slides import SLIDE_EXTENSIONS

    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(folder, f) for f in sorted(files)
                     if f.lower().endswith(SLIDE_EXTENSIONS) and not f.startswith("."))
    return found


def sample_slide_patches(slides: Sequence[str], *, patch_size: int, mpp: float,
                         max_patches: int, min_foreground: float = 0.5,
                         mpp_override: float | None = None, seed: int = 0,
                         progress: bool = False) -> tuple[list[dict], list[tuple[str, str]]]:
    """At most ``max_patches`` random foreground patches per slide (section 5.4).

    Returns ``(patches, skipped)``: each patch a dict naming the slide, the level-0
    corner, the pyramid level and read size (what ``histohub.slides._reader.PatchReader`` needs);
    ``skipped`` lists slides that could not be opened or tiled, with the reason.
    """
    from tqdm.auto import tqdm

    from histohub.slides import open_slide, tile_grid

    rng = random.Random(seed)
    patches, skipped = [], []
    for path in tqdm(slides, desc="tiling slides", unit="slide", disable=not progress):
        try:
            with open_slide(path) as slide:
                grid = tile_grid(slide, target_mpp=mpp, patch_size=patch_size,
                                 min_foreground=min_foreground, mpp_override=mpp_override)
        except (SlideError, OSError, ValueError) as error:
            skipped.append((path, str(error)))
            continue
        chosen = sorted(rng.sample(range(len(grid)), min(max_patches, len(grid))))
        patches.extend({"slide": path, "x": int(grid.coords[i][0]), "y": int(grid.coords[i][1]),
                        "level": grid.level, "read_size": grid.read_size,
                        "patch_size": grid.patch_size, "size0": grid.patch_size_level0,
                        "slide_mpp": grid.slide_mpp, "mpp": grid.target_mpp}
                       for i in chosen)
    return patches, skipped


def capped_count(available: int, *, percent: float, min_count: int = 10,
                 max_count: int | None = 2000) -> int:
    """Images to draw from a dataset: ``percent`` of it, within [min_count, max_count]."""
    count = max(int(round(available * percent / 100)), min_count)
    if max_count is not None:
        count = min(count, max_count)
    return min(count, available)


@dataclass
class Pool:
    """The images of one run: ``items`` (paths, or slide-patch dicts) and what they are."""

    items: list[Any]
    sources: list[int]
    summary: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically."""
        data = {"items": self.items, "sources": self.sources, "summary": self.summary,
                "skipped": self.skipped}
        write_text_atomic(path, json.dumps(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Pool:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["items"], data["sources"], data["summary"],
                   [tuple(s) for s in data["skipped"]])

    def describe(self) -> str:
        """One line per dataset: name, kind, available, drawn."""
        lines = [f"{len(self.items)} images from {len(self.summary)} dataset(s):"]
        for s in self.summary:
            lines.append(f"  {s['name']} ({s['kind']}): {s['selected']} of {s['available']}"
                         + (f", {s['skipped']} slide(s) skipped" if s.get("skipped") else ""))
        return "\n".join(lines)


def build_pool(specs: Sequence[DatasetSpec], *, patch_size: int, percent: float = 100.0,
               min_per_dataset: int = 10, max_per_dataset: int | None = 2000, seed: int = 0,
               progress: bool = False) -> Pool:
    """Draw the capped sample of every dataset (section 5.4); empty datasets are an error."""
    rng = random.Random(seed)
    items, sources, summary, skipped = [], [], [], []
    for index, spec in enumerate(specs):
        if spec.kind == "slides":
            candidates, bad = sample_slide_patches(
                list_slides(spec.path), patch_size=patch_size, mpp=spec.mpp,
                max_patches=spec.patches_per_slide, min_foreground=spec.min_foreground,
                mpp_override=spec.mpp_override, seed=rng.randrange(2**31), progress=progress)
            skipped.extend(bad)
        else:
            candidates, bad = list_images(spec.path, spec.pattern), []
        if not candidates:
            raise ValueError(f"Dataset {spec.name} ({spec.path}) has no usable "
                             f"{'slide patches' if spec.kind == 'slides' else 'images'}"
                             + (f"; {len(bad)} slide(s) skipped, first: {bad[0][1]}" if bad else ""))
        count = capped_count(len(candidates), percent=percent, min_count=min_per_dataset,
                             max_count=spec.max_images if spec.max_images is not None
                             else max_per_dataset)
        chosen = sorted(rng.sample(range(len(candidates)), count))
        items.extend(candidates[i] for i in chosen)
        sources.extend([index] * count)
        summary.append({"name": spec.name, "kind": spec.kind, "path": spec.path,
                        "available": len(candidates), "selected": count, "skipped": len(bad)})
    return Pool(items, sources, summary, skipped)


# --------------------------------------------------------------------------- reading

def load_image(path: str, size: int) -> np.ndarray:
    """An image file -> uint8 (size, size, 3): shorter side resized to ``size``, centre crop."""
    from PIL import Image

    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when larger
        image = image.convert("RGB")
        return _square(image, size)


def _square(image, size: int) -> np.ndarray:
    from PIL import Image

    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image)


class PoolDataset(torch.utils.data.Dataset):
    """``dataset[(index, batch_seed)]`` -> (uint8 (3, S, S), batch_seed, failures).

    ``failures``: ``[(item, reason)]`` for unreadable items that were replaced by the next
    readable one. Slide patches are read through ``histohub.slides._reader.PatchReader``.
    """

    def __init__(self, items: Sequence[Any], size: int) -> None:
        self.items = list(items)
        self.size = size
        self._readers: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, batch_seed = key if isinstance(key, tuple) else (key, None)
        failures = []
        for attempt in range(_MAX_REPLACEMENTS):
            item = self.items[(index + attempt) % len(self.items)]
            try:
                array = self._read(item)
            except Exception as error:  # noqa: BLE001 - any decode error: skip, count, report
                failures.append((_describe(item), f"{type(error).__name__}: {error}"))
                continue
            image = torch.from_numpy(np.require(array, requirements=["C", "W"])).permute(2, 0, 1)
            return image, batch_seed, failures
        raise RuntimeError(f"{_MAX_REPLACEMENTS} images in a row could not be read, starting at "
                           f"{failures[0][0]} ({failures[0][1]}); check the dataset")

    def _read(self, item) -> np.ndarray:
        if isinstance(item, str):
            return load_image(item, self.size)
        return self._read_patch(item)

    def _read_patch(self, item: dict) -> np.ndarray:
        from PIL import Image

        reader = self._readers.get(item["slide"])
        if reader is None:
            if len(self._readers) >= 8:  # bound open slide handles per worker
                self._readers.pop(next(iter(self._readers))).close()
            reader = self._readers[item["slide"]] = _patch_reader(item)
        patch = reader.read_at(item["x"], item["y"])[..., :3]
        if patch.shape[0] != self.size:
            patch = np.asarray(Image.fromarray(patch).resize((self.size, self.size),
                                                             Image.Resampling.BILINEAR))
        return patch


def _patch_reader(item: dict):
    """A ``PatchReader`` for one slide from a patch dict (no tissue mask needed)."""
    from histohub.slides import PatchReader, TileGrid

    grid = TileGrid(
        slide_path=item["slide"], slide_dimensions=(0, 0), slide_mpp=item["slide_mpp"],
        mpp_source="pool", target_mpp=item["mpp"], patch_size=item["patch_size"],
        patch_size_level0=item["size0"], level=item["level"], level_downsample=1.0,
        read_size=item["read_size"], coords=np.zeros((0, 2), np.int64),
        foreground=np.zeros(0, np.float32), mask_method="hsv", min_foreground=0.0,
        mask=np.zeros((0, 0), bool), mask_downsample=1.0, n_candidates=0)
    return PatchReader(grid)


def _describe(item) -> str:
    return item if isinstance(item, str) else f"{item['slide']}@({item['x']},{item['y']})"


class EpochBatchSampler(torch.utils.data.Sampler):
    """Per epoch, a seeded shuffle cut into global batches; each rank takes its slice.

    Yields lists of ``(index, batch_seed)``: rank r gets items [r*B, (r+1)*B) of every global
    batch of ``world_size * B``, so N processes see exactly the batches one process with
    N x B would. ``batch_seed`` (from seed, epoch, step, rank) drives the augmentations.
    The last incomplete global batch is dropped.
    """

    def __init__(self, size: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        if size < batch_size * world_size:
            raise ValueError(f"{size} images are fewer than one global batch of "
                             f"{batch_size * world_size}; lower batch_size or add data")
        self.size, self.batch_size = size, batch_size
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        step_size = self.batch_size * self.world_size
        for step in range(len(self)):
            start = step * step_size + self.rank * self.batch_size
            batch_seed = int(np.random.SeedSequence(
                [self.seed, self.epoch, step, self.rank]).generate_state(1)[0])
            yield [(i, batch_seed) for i in order[start:start + self.batch_size]]


class Collate:
    """Stack a batch; optionally augment it right here (in the DataLoader workers).

    Returns ``(views_or_images, batch_seed, failures)``: with ``augment`` two float views
    (B, 3, S, S) in [0, 1], else uint8 images (B, 3, S, S) for augmenting on the device.
    """

    def __init__(self, augment=None) -> None:
        self.augment = augment

    def __call__(self, batch):
        images = torch.stack([b[0] for b in batch])
        seed = batch[0][1]
        failures = [f for b in batch for f in b[2]]
        if self.augment is None:
            return images, seed, failures
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        return self.augment.two_views(images, generator), seed, failures
