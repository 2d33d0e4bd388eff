"""The slides ``bench_slides.py`` measures: tiled pyramidal TIFFs built from real tissue
(the Kather 2016 tiles and cells of the two shared slides, on noisy glass, 256 px JPEG
tiles, 3 levels, 0.5 um/px), the shared slides themselves, and the CLAM-style grid every
arm cuts (``naive_grid``). Built once into a work folder and reused."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
KATHER = SHARED / "kather2016-tiles"
CMU = SHARED / "slides" / "cmu_small_region.svs"
TCGA = SHARED / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
#: The TCGA cut-down records no microns per pixel; it is a 20x scan.
TCGA_MPP = 0.5

#: Microns per pixel of the built slides, and of the patches every arm cuts.
MPP = 0.5
PATCH = 224
MIN_FOREGROUND = 0.5
#: Side of a mosaic cell: a Kather 2016 tile.
CELL = 150
#: Fraction of a built slide's area (inside a glass margin) covered by tissue sections.
COVERAGE = 0.72
GLASS = (243, 241, 245)
#: Bump when the slides change, so cached ones are rebuilt.
BUILDER_VERSION = 1
LARGE_MIN_PATCHES = 2000

SIZES: dict[str, dict[str, Any]] = {
    "full": {"large": (15000, 12500),
             "cohort": [(round(s * a), round(s / a)) for s, a in zip(
                 np.geomspace(1100, 3800, 22), [1.0, 1.2, 0.85, 1.35, 0.75] * 5)]},
    "quick": {"large": (1800, 1500), "cohort": [(700, 800), (1000, 900), (1300, 1000)]},
}


# --------------------------------------------------------------------------- real tissue

def tissue_pool() -> list[np.ndarray]:
    """150 px RGB uint8 cells of real H&E at about 0.5 um/px, each >= 50% tissue.

    Sources: the Kather 2016 tiles (150 px, 0.495 um/px) and cells cut from the two shared
    slides (CMU-1-Small-Region at 0.499 um/px; the TCGA slide, taken as 0.5 um/px).
    """
    from PIL import Image

    import histohub

    candidates = [np.asarray(Image.open(path).convert("RGB"))
                  for path in sorted(KATHER.glob("*/*")) if path.is_file()]
    for path in (CMU, TCGA):
        with histohub.open_slide(path) as slide:
            image = slide.read_region((0, 0), 0, slide.dimensions)
        height, width = image.shape[:2]
        candidates += [image[y:y + CELL, x:x + CELL] for y in range(0, height - CELL + 1, CELL)
                       for x in range(0, width - CELL + 1, CELL)]
    pool = [np.ascontiguousarray(c) for c in candidates
            if c.shape == (CELL, CELL, 3) and histohub.tissue_mask(c).mean() >= MIN_FOREGROUND]
    if len(pool) < 50:
        raise SystemExit(f"only {len(pool)} tissue cells found in {KATHER} and {CMU.parent}; "
                         "the benchmark needs the shared data")
    return pool


def _sections(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Irregular tissue sections: bool ``(height, width)``, ``COVERAGE`` of the area inside
    a glass margin. A smooth random field (features about 1,000 px) thresholded."""
    from PIL import Image

    step = 16  # level-0 px per field pixel
    fw, fh = -(-width // step), -(-height // step)
    coarse = rng.random((fh * step // 512 + 2, fw * step // 512 + 2))
    field = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize(
        (fw, fh), Image.Resampling.BICUBIC), np.float64)
    margin = max(2, min(fw, fh) // 20)
    ys, xs = np.mgrid[0:fh, 0:fw]
    border = np.minimum.reduce([xs, ys, fw - 1 - xs, fh - 1 - ys]) / margin
    inside = border >= 1
    field = np.where(inside, field, -np.inf)
    threshold = np.quantile(field[inside], 1 - COVERAGE)
    small = Image.fromarray(((field > threshold) * 255).astype(np.uint8))
    return np.asarray(small.resize((width, height), Image.Resampling.BILINEAR)) > 127


def compose_slide(width: int, height: int, pool: Sequence[np.ndarray], *, seed: int
                  ) -> np.ndarray:
    """RGB uint8 ``(height, width, 3)``: tissue sections filled with ``pool`` cells (each
    turned by a random multiple of 90 degrees and maybe flipped) on noisy glass."""
    rng = np.random.default_rng(seed)
    sections = _sections(width, height, rng)
    glass = [np.clip(np.asarray(GLASS) + rng.normal(0, 1.5, (CELL, CELL, 3)), 0, 255)
             .astype(np.uint8) for _ in range(8)]
    image = np.empty((height, width, 3), np.uint8)
    for y in range(0, height, CELL):
        for x in range(0, width, CELL):
            h, w = min(CELL, height - y), min(CELL, width - x)
            background = glass[rng.integers(len(glass))][:h, :w]
            inside = sections[y:y + h, x:x + w]
            if not inside.any():
                image[y:y + h, x:x + w] = background
                continue
            cell = np.rot90(pool[rng.integers(len(pool))], int(rng.integers(4)))
            cell = cell[:, ::-1] if rng.integers(2) else cell
            image[y:y + h, x:x + w] = np.where(inside[..., None], cell[:h, :w], background)
    return image


def write_pyramid(path: Path, image: np.ndarray) -> Path:
    """A tiled JPEG pyramidal TIFF (3 levels) with a 0.5 um/px resolution tag, written to a
    temporary name then renamed."""
    from histohub.slides._synthetic import write_slide

    partial = path.with_name(path.name + ".partial")
    write_slide(partial, image, mpp=MPP, levels=3, tile=256, quality=90)
    partial.replace(path)
    return path


# --------------------------------------------------------------------------- slides to measure

def naive_grid(slide: Any, mpp: float | None) -> tuple[np.ndarray, int]:
    """CLAM-style tiling: level-0 ``(x, y)`` int64 ``(N, 2)`` of the non-overlapping patches
    of ``PATCH`` px at ``MPP`` with >= ``MIN_FOREGROUND`` tissue, and their level-0 side.

    The tissue mask (``histohub.tissue_mask``, the paper's HSV rule) is taken on a thumbnail
    of about 32 px per patch side (at most 4,096 px a side), as histohub tiles.
    """
    import histohub

    mpp = mpp if mpp is not None else slide.mpp
    size0 = max(1, round(PATCH * MPP / mpp))
    width, height = slide.dimensions
    downsample = max(1.0, size0 / 32, max(width, height) / 4096)
    mask = histohub.tissue_mask(slide.thumbnail(downsample))
    ys, xs = np.mgrid[0:height // size0, 0:width // size0]
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64) * size0
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    x0, y0 = (np.clip(np.round(coords[:, i] / downsample).astype(np.int64), 0, mask.shape[1 - i])
              for i in (0, 1))
    x1, y1 = (np.clip(np.round((coords[:, i] + size0) / downsample).astype(np.int64), 0,
                      mask.shape[1 - i]) for i in (0, 1))
    x1 = np.maximum(x1, x0 + 1).clip(max=mask.shape[1])
    y1 = np.maximum(y1, y0 + 1).clip(max=mask.shape[0])
    tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    fraction = tissue / np.maximum((x1 - x0) * (y1 - y0), 1)
    return coords[fraction >= MIN_FOREGROUND], size0


def count_patches(path: Path, mpp: float | None = None) -> int:
    import histohub

    with histohub.open_slide(path) as slide:
        return len(naive_grid(slide, mpp)[0])


def build_slides(work: Path, *, quick: bool, log: Callable[[str], None] = print
                 ) -> dict[str, list[dict[str, Any]]]:
    """Build (or find in ``work``) the large slide and the cohort -> scenario name -> slides
    (``{"path", "mpp", "patches"}``), with the shared slides added."""
    sizes = SIZES["quick" if quick else "full"]
    key = hashlib.sha256(json.dumps([BUILDER_VERSION, sizes, COVERAGE]).encode()).hexdigest()[:10]
    folder = work / f"slides-{'quick' if quick else 'full'}-{key}"
    index = folder / "slides.json"
    if index.is_file():
        built = json.loads(index.read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        log(f"building the benchmark slides in {folder} (once; --work keeps them) ...")
        started = time.perf_counter()
        pool = tissue_pool()
        log(f"  {len(pool)} real tissue cells of {CELL} px (Kather 2016 + the shared slides)")
        built = {"large": [], "cohort": []}
        jobs = [("large", "large.tif", sizes["large"])]
        jobs += [("cohort", f"cohort-{i:02d}.tif", size) for i, size in enumerate(sizes["cohort"])]
        for seed, (group, name, (width, height)) in enumerate(jobs):
            path = write_pyramid(folder / name, compose_slide(width, height, pool, seed=seed))
            patches = count_patches(path)
            built[group].append({"path": str(path), "mpp": None, "patches": patches})
            log(f"  {name}: {width} x {height} px, {patches} tissue patches, "
                f"{path.stat().st_size / 2**20:.1f} MiB ({time.perf_counter() - started:.0f} s)")
        index.write_text(json.dumps(built, indent=1))
    if not quick and built["large"][0]["patches"] < LARGE_MIN_PATCHES:
        raise SystemExit(f"the large slide has {built['large'][0]['patches']} tissue patches, "
                         f"fewer than {LARGE_MIN_PATCHES}: enlarge SIZES['full']['large']")
    built["cmu"] = [{"path": str(CMU), "mpp": None, "patches": count_patches(CMU)}]
    built["tcga"] = [{"path": str(TCGA), "mpp": TCGA_MPP,
                      "patches": count_patches(TCGA, TCGA_MPP)}]
    return built
