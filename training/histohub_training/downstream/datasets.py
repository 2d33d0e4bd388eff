"""Benchmark datasets: image folders, CSV files, image/mask pairs, and the shared presets.

Every source becomes one :class:`ImageDataset`: file paths plus class labels, 0-100 scores
(regression), mask paths (segmentation) and groups (source image or patient, so that
tiles of one group never straddle splits). Images are not read here (see ``images``).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from histohub.files import IMAGE_EXTENSIONS
from histohub.errors import HistohubError

IMAGE_DIRS = ("image", "images", "img")
MASK_DIRS = ("label", "labels", "mask", "masks")
MASK_THRESHOLD = 128
#: Where the presets live: ``$HISTOHUB_BENCH_DATA`` or ``<repo>/../shared/data``.
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[4] / "shared" / "data"


class DatasetError(HistohubError, ValueError):
    """A benchmark dataset cannot be used as given; the message says what to change."""


@dataclass(frozen=True)
class ImageDataset:
    """Images and their targets, in a fixed order (sorted relative paths).

    ``labels``: ``(N,)`` int64 class indices into ``classes``, or None.
    ``scores``: ``(N,)`` float32 regression targets in [0, 100], or None.
    ``masks``: one mask path per image (None where an image has none), or None.
    ``groups``: ``(N,)`` str group ids (source image, patient), or None.
    """

    name: str
    root: Path
    paths: tuple[Path, ...]
    classes: tuple[str, ...] = ()
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None
    masks: tuple[Path | None, ...] | None = None
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The images at ``indices``, in that order, with everything that goes with them."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            paths=tuple(self.paths[i] for i in idx),
            labels=None if self.labels is None else self.labels[idx],
            scores=None if self.scores is None else self.scores[idx],
            masks=None if self.masks is None else tuple(self.masks[i] for i in idx),
            groups=None if self.groups is None else self.groups[idx],
        )

    def relative_paths(self) -> list[str]:
        return [_relative(p, self.root) for p in self.paths]

    def content_hash(self) -> str:
        """sha256 over every image's relative path and bytes (masks included): the data's identity."""
        digest = hashlib.sha256()
        files = list(self.paths) + [m for m in (self.masks or ()) if m is not None]
        for path in files:
            digest.update(_relative(path, self.root).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Presets: the real datasets of ../shared/data (see its SOURCES.md)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """A dataset of ``../shared/data`` with the layout and grouping its SOURCES.md gives."""

    folder: str
    label_from: str            # "top": first folder under the root; "parent": the file's folder
    group_pattern: str         # regex on the relative path; group 1 (or the match) is the group
    description: str


PRESETS: dict[str, Preset] = {
    "kather2016": Preset(
        "kather2016-tiles", "top", r"(CRC-Prim-HE-\d+)",
        "Kather 2016 colorectal texture tiles, 8 classes, grouped by source image"),
    "idc-breast": Preset(
        "idc-breast-patches", "parent", r"([^/]+)/[01]/[^/]+$",
        "IDC breast patches, binary (folder 0 / 1), grouped by patient"),
    "ebhi-seg": Preset(
        "ebhi-seg", "top", r"GT[A-Za-z]*(\d+)-\d+-\d+-\d+\.png$",
        "EBHI-Seg biopsy images, 6 classes, masks under label/, grouped by case id"),
}
#: Accepted spellings: the folder names of ../shared/data work too.
_PRESET_ALIASES = {"kather2016-tiles": "kather2016", "idc-breast-patches": "idc-breast",
                   "idc": "idc-breast", "ebhi": "ebhi-seg"}


def data_root() -> Path:
    """Folder holding the preset datasets."""
    return Path(os.environ.get("HISTOHUB_BENCH_DATA", DEFAULT_DATA_ROOT)).expanduser()


def preset_name(spec: str) -> str | None:
    """The preset ``spec`` names, or None when it names no preset."""
    spec = _PRESET_ALIASES.get(spec, spec)
    return spec if spec in PRESETS else None


def load_dataset(spec: str | os.PathLike, *, root: str | os.PathLike | None = None,
                 group_pattern: str | None = None, group_column: str | None = None,
                 label_from: str | None = None, name: str | None = None) -> ImageDataset:
    """A preset name (``kather2016``, ``idc-breast``, ``ebhi-seg``), a folder, or a CSV file.

    ``root``: where presets live (default :func:`data_root`). ``group_pattern``: a regex
    searched in each image's relative path; its first group (or the whole match) is the
    group. ``group_column``: the CSV column holding groups (default ``group`` if present).
    ``label_from``: ``"top"`` (class = first folder under the root, any nesting below,
    as torchvision's ImageFolder) or ``"parent"`` (class = the folder holding the file).
    """
    text = os.fspath(spec)
    preset = preset_name(text)
    if preset is not None and not Path(text).exists():
        info = PRESETS[preset]
        folder = Path(root).expanduser() if root is not None else data_root()
        path = folder / info.folder
        if not path.is_dir():
            raise FileNotFoundError(
                f"Preset {preset!r} expects {path}, which does not exist; set "
                "HISTOHUB_BENCH_DATA (or --data-root) to the folder holding "
                f"{info.folder}/, or pass a path with --data")
        return scan_folder(path, name=name or preset,
                           label_from=label_from or info.label_from,
                           group_pattern=group_pattern or info.group_pattern)
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Dataset {text!r} is neither an existing path nor a preset; presets: "
            f"{', '.join(sorted(PRESETS))} (under {data_root()})")
    if path.is_dir():
        return scan_folder(path, name=name or path.name, label_from=label_from or "top",
                           group_pattern=group_pattern)
    if path.suffix.lower() == ".csv":
        return read_csv(path, name=name or path.stem, group_column=group_column,
                        group_pattern=group_pattern)
    raise DatasetError(f"{path} is a file but not a .csv; pass a folder of images (one "
                       "folder per class), a CSV with columns path,label / path,score / "
                       "path,mask, or a preset name")


# ---------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------

def scan_folder(root: str | os.PathLike, *, name: str | None = None, label_from: str = "top",
                group_pattern: str | None = None) -> ImageDataset:
    """Every image under ``root``; image/mask pairs where ``image/`` has a sibling ``label/``.

    A folder ``image`` (or ``images``, ``img``) next to a folder ``label`` (or ``labels``,
    ``mask``, ``masks``) holds pairs matched by file stem; an image with no mask gets None.
    Images directly under ``root`` have no class.
    """
    root = Path(root)
    if label_from not in ("top", "parent"):
        raise ValueError(f"label_from must be 'top' or 'parent', got {label_from!r}")
    images: list[Path] = []
    masks: dict[Path, Path | None] = {}
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder_path = Path(folder)
        if folder_path.name.lower() in MASK_DIRS and _sibling(folder_path, IMAGE_DIRS):
            continue
        mask_dir = (_sibling(folder_path, MASK_DIRS)
                    if folder_path.name.lower() in IMAGE_DIRS else None)
        stems = _by_stem(mask_dir) if mask_dir else {}
        for filename in sorted(filenames):
            path = folder_path / filename
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            images.append(path)
            if mask_dir is not None:
                masks[path] = stems.get(path.stem)
    if not images:
        raise DatasetError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    images.sort(key=lambda p: _relative(p, root))
    label_names = [_label_of(p, root, label_from) for p in images]
    classes, labels = _encode(label_names) if any(label_names) else ((), None)
    if labels is not None and not all(label_names):
        loose = [_relative(p, root) for p, n in zip(images, label_names) if not n][:3]
        raise DatasetError(f"Some images under {root} are not in a class folder ({loose}); "
                           "put every image in a folder named after its class")
    dataset = ImageDataset(
        name=name or root.name, root=root, paths=tuple(images), classes=classes,
        labels=labels, masks=tuple(masks.get(p) for p in images) if masks else None)
    if group_pattern:
        dataset = replace(dataset, groups=groups_from_pattern(dataset, group_pattern))
    return dataset


def _sibling(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        for candidate in (folder.parent / name, folder.parent / name.capitalize()):
            if candidate.is_dir():
                return candidate
    return None


def _by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.suffix.lower() in IMAGE_EXTENSIONS}


def _label_of(path: Path, root: Path, label_from: str) -> str:
    parts = [p for p in path.relative_to(root).parts[:-1] if p.lower() not in IMAGE_DIRS]
    if not parts:
        return ""
    return parts[0] if label_from == "top" else parts[-1]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _encode(names: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    classes = tuple(sorted(set(names)))
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[n] for n in names], dtype=np.int64)


def groups_from_pattern(dataset: ImageDataset, pattern: str) -> np.ndarray:
    """``(N,)`` group ids: ``pattern`` searched in each relative path (group 1 or the match)."""
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise DatasetError(f"Bad group pattern {pattern!r}: {error}") from None
    groups = []
    for rel in dataset.relative_paths():
        match = regex.search(rel)
        if match is None:
            raise DatasetError(f"Group pattern {pattern!r} does not match {rel!r}; every "
                               "image needs a group (or drop --group-pattern)")
        groups.append(match.group(1) if regex.groups else match.group(0))
    return np.array(groups, dtype=object)


# ---------------------------------------------------------------------------------------
# CSV files
# ---------------------------------------------------------------------------------------

CSV_TARGETS = ("label", "score", "mask")


def read_csv(path: str | os.PathLike, *, name: str | None = None,
             group_column: str | None = None, group_pattern: str | None = None
             ) -> ImageDataset:
    """A CSV with a ``path`` column and at least one of ``label``, ``score`` (0-100), ``mask``.

    Relative paths are resolved against the CSV's folder. An optional ``group`` column
    (or ``group_column``) keeps rows of one group on one side of every split.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    wanted_group = group_column or ("group" if "group" in columns else None)
    if "path" not in columns or not set(CSV_TARGETS) & set(columns):
        raise DatasetError(f"{path} has columns {columns}; expected 'path' and at least one "
                           f"of {list(CSV_TARGETS)} (e.g. path,label or path,score), "
                           "plus an optional 'group'")
    if wanted_group and wanted_group not in columns:
        raise DatasetError(f"{path} has no group column {wanted_group!r}; columns: {columns}")
    if not rows:
        raise DatasetError(f"{path} has a header but no rows")
    base = path.parent
    files = [(base / r["path"]).resolve() if not Path(r["path"]).is_absolute()
             else Path(r["path"]) for r in rows]
    _check_exist(files, path)
    masks = None
    if "mask" in columns:
        masks = tuple((base / r["mask"]).resolve() if r["mask"] else None for r in rows)
        _check_exist([m for m in masks if m is not None], path)
    classes, labels = ((), None)
    if "label" in columns:
        classes, labels = _encode([r["label"] for r in rows])
    scores = _parse_scores([r["score"] for r in rows], path) if "score" in columns else None
    groups = (np.array([r[wanted_group] for r in rows], dtype=object)
              if wanted_group else None)
    dataset = ImageDataset(name=name or path.stem, root=base.resolve(), paths=tuple(files),
                           classes=classes, labels=labels, scores=scores, masks=masks,
                           groups=groups)
    if group_pattern and groups is None:
        dataset = replace(dataset, groups=groups_from_pattern(dataset, group_pattern))
    return dataset


def _check_exist(files: Sequence[Path], csv_path: Path) -> None:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) listed in {csv_path} do not exist, "
                                f"e.g. {missing[:3]}; paths are relative to the CSV's folder")


def _parse_scores(values: Sequence[str], where: Path) -> np.ndarray:
    try:
        scores = np.array([float(v) for v in values], dtype=np.float32)
    except ValueError as error:
        raise DatasetError(f"{where}: column 'score' must hold numbers: {error}") from None
    if not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 100:
        raise DatasetError(f"{where}: scores must be percentages in [0, 100], got "
                           f"{scores.min():g} to {scores.max():g}")
    return scores


# ---------------------------------------------------------------------------------------
# What each task needs
# ---------------------------------------------------------------------------------------

def for_classification(dataset: ImageDataset) -> ImageDataset:
    """``dataset`` checked to have at least two classes."""
    if dataset.labels is None:
        raise DatasetError(f"{dataset.name} has no class labels: use class folders or a CSV "
                           "'label' column")
    counts = Counter(dataset.labels.tolist())
    if len(counts) < 2:
        only = dataset.classes[next(iter(counts))]
        raise DatasetError(f"{dataset.name} has a single class ({only!r}); classification "
                           "needs at least two")
    return dataset


def for_segmentation(dataset: ImageDataset) -> ImageDataset:
    """``dataset`` restricted to the images that have a mask (the others are reported)."""
    if dataset.masks is None:
        raise DatasetError(f"{dataset.name} has no masks: use image/ and label/ folders "
                           "(masks named as their images) or a CSV 'mask' column")
    keep = [i for i, m in enumerate(dataset.masks) if m is not None]
    if not keep:
        raise DatasetError(f"No image of {dataset.name} has a mask")
    dropped = len(dataset) - len(keep)
    if dropped:
        missing = [dataset.relative_paths()[i] for i, m in enumerate(dataset.masks)
                   if m is None][:3]
        warnings.warn(f"{dropped} image(s) of {dataset.name} have no mask and are left out, "
                      f"e.g. {missing}", stacklevel=2)
    return dataset.subset(keep)


def for_regression(dataset: ImageDataset, *,
                   coverage: Callable[[Path], float] | None = None) -> ImageDataset:
    """``dataset`` with 0-100 scores: its own, or the share of each image its mask covers."""
    if dataset.scores is not None:
        return dataset
    if dataset.masks is None:
        raise DatasetError(f"{dataset.name} has neither scores (CSV 'score' column) nor "
                           "masks to derive a coverage score from")
    with_masks = for_segmentation(dataset)
    measure = coverage or mask_coverage
    scores = np.array([measure(m) for m in with_masks.masks], dtype=np.float32)
    return replace(with_masks, scores=scores)


def mask_coverage(path: Path, *, threshold: int = MASK_THRESHOLD) -> float:
    """Share of the image the mask covers, in percent (pixels >= ``threshold``)."""
    from PIL import Image

    with Image.open(path) as image:
        mask = np.asarray(image.convert("L"))
    return float((mask >= threshold).mean() * 100.0)
