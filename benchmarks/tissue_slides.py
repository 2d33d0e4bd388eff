"""Test slides with known tissue masks, made from real H&E: the benchmark of tissue masks
(``bench_tissue.py``) and the tests use them.

Each case is a glass background (Kather 2016 ``08_empty`` tiles) with 2-3 tissue sections of
random outline, each a mosaic of real tissue: dense and dark (Kather tumour and lymphocyte
tiles, cells of the CMU slide's epidermis), ordinary (stroma, complex stroma, mucosa,
debris, cells of the TCGA slide) or pale (the same at 45% of their stain, as a thin or
faintly stained section looks). Sections have holes (glass showing through: lumen, tears).
Pen strokes in blue, green and black marker cross glass and tissue (marker ink filters the
light: each colour a transmittance per channel, laid over the pixels beneath). Dust specks
lie on the glass. Truth: ``tissue`` = the sections less their holes and the ink; ``ink`` =
the strokes.

Shared data (``../shared/data``; see its SOURCES.md): ``tiles(data_dir)`` reads it;
``None`` when it is absent (tests skip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Level-0 microns per pixel of the cases (Kather tiles are 0.495 um/px, the CMU slide 0.499).
MPP = 0.5
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
_DENSE = ("01_tumor", "04_lympho")
_ORDINARY = ("02_stroma", "03_complex", "05_debris", "06_mucosa")
#: Per-channel light transmittance of marker ink (multiplies what lies beneath).
INK_COLOURS = {"blue": (0.20, 0.35, 0.80), "green": (0.30, 0.70, 0.45),
               "black": (0.10, 0.10, 0.12)}
PALE_STAIN = 0.45
CELL = 150


@dataclass
class Case:
    """One synthetic slide: ``rgb`` uint8 ``(H, W, 3)``; bool ``(H, W)`` truths: ``tissue``
    (sections less holes and ink), ``ink`` (all strokes), ``ink_by_colour``, ``dust``,
    ``dense`` (the dense sections' tissue), ``pale`` (the pale sections')."""

    name: str
    rgb: np.ndarray
    tissue: np.ndarray
    ink: np.ndarray
    ink_by_colour: dict[str, np.ndarray]
    dust: np.ndarray
    dense: np.ndarray
    pale: np.ndarray


def tiles(data_dir: Path = DATA_DIR) -> dict[str, list[np.ndarray]] | None:
    """Pools of 150 px RGB cells: ``dense``, ``ordinary``, ``glass``; None without the data."""
    from PIL import Image

    kather = data_dir / "kather2016-tiles"
    slides = data_dir / "slides"
    if not kather.is_dir() or not slides.is_dir():
        return None

    def read(classes):
        return [np.asarray(Image.open(f).convert("RGB"))[:CELL, :CELL]
                for c in classes for f in sorted((kather / c).iterdir())]

    pools = {"dense": read(_DENSE), "ordinary": read(_ORDINARY), "glass": read(("08_empty",))}
    pools["dense"] += _slide_cells(slides / "cmu_small_region.svs", dark=True)
    pools["ordinary"] += _slide_cells(slides / "tcga-cr-7395-01a-01-ts1.svs", dark=False)
    return pools


def _slide_cells(path: Path, *, dark: bool) -> list[np.ndarray]:
    """150 px cells of a real slide that are all tissue (saturation > 0.1 in 98% of the
    pixels); ``dark``: only the darker half of them (the CMU slide's epidermis)."""
    import cv2

    from histohub.slides._reader import open_slide

    if not path.is_file():
        return []
    with open_slide(path) as slide:
        image = slide.read_region((0, 0), 0, slide.dimensions)
    cells = []
    for y in range(0, image.shape[0] - CELL + 1, CELL):
        for x in range(0, image.shape[1] - CELL + 1, CELL):
            cell = image[y:y + CELL, x:x + CELL]
            hsv = cv2.cvtColor(cell, cv2.COLOR_RGB2HSV_FULL)
            if (hsv[..., 1] > 25).mean() >= 0.98:
                cells.append((float(hsv[..., 2].mean()), cell))
    cells.sort(key=lambda c: c[0])
    chosen = cells[:max(1, len(cells) // 2)] if dark else cells
    return [c for _, c in chosen]


def _mosaic(pool: list[np.ndarray], shape: tuple[int, int], rng: np.random.Generator
            ) -> np.ndarray:
    height, width = shape
    out = np.empty((math.ceil(height / CELL) * CELL, math.ceil(width / CELL) * CELL, 3),
                   np.uint8)
    for y in range(0, out.shape[0], CELL):
        for x in range(0, out.shape[1], CELL):
            cell = np.rot90(pool[rng.integers(len(pool))], rng.integers(4))
            out[y:y + CELL, x:x + CELL] = cell[:, ::-1] if rng.random() < 0.5 else cell
    return out[:height, :width]


def _blob(shape: tuple[int, int], centre: tuple[float, float], radius: tuple[float, float],
          rng: np.random.Generator) -> np.ndarray:
    """A filled random outline: an ellipse whose radius wanders with a few harmonics."""
    import cv2

    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    wobble = 1 + sum(rng.uniform(0, 0.09) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
                     for k in range(2, 6))
    xs = centre[0] + radius[0] * wobble * np.cos(theta)
    ys = centre[1] + radius[1] * wobble * np.sin(theta)
    out = np.zeros(shape, np.uint8)
    cv2.fillPoly(out, [np.stack([xs, ys], 1).round().astype(np.int32)], 1)
    return out.astype(bool)


def _stroke(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A marker stroke: a curve across the slide, 30-80 um wide, soft-edged -> float alpha."""
    import cv2

    height, width = shape
    ends = rng.uniform([0, 0], [width, height], (3, 2))
    t = np.linspace(0, 1, 200)[:, None]
    curve = (1 - t) ** 2 * ends[0] + 2 * (1 - t) * t * ends[1] + t ** 2 * ends[2]
    alpha = np.zeros(shape, np.float32)
    cv2.polylines(alpha, [curve.round().astype(np.int32)], False, 1.0,
                  thickness=int(rng.uniform(30, 80) / MPP))
    return cv2.GaussianBlur(alpha, (0, 0), 1.5)


def make_case(seed: int, pools: dict[str, list[np.ndarray]], *,
              size: tuple[int, int] = (4800, 3600)) -> Case:
    """Case ``seed``: ``size`` (width, height) level-0 px at ``MPP``."""
    import cv2

    rng = np.random.default_rng(seed)
    width, height = size
    shape = (height, width)
    rgb = _mosaic(pools["glass"], shape, rng)
    tissue = np.zeros(shape, bool)
    dense, pale = np.zeros(shape, bool), np.zeros(shape, bool)
    kinds = ["dense", "ordinary", "pale"]
    rng.shuffle(kinds)
    n = 3 if seed % 2 else 2
    for i, kind in enumerate(kinds[:n]):
        centre = ((i + 0.5) * width / n, rng.uniform(0.4, 0.6) * height)
        radius = (rng.uniform(0.32, 0.42) * width / n, rng.uniform(0.28, 0.4) * height)
        section = _blob(shape, centre, radius, rng)
        for _ in range(rng.integers(1, 3)):  # holes: lumen or a tear, glass showing
            hole_r = rng.uniform(100, 250, 2)
            at = (centre[0] + rng.uniform(-0.4, 0.4) * radius[0],
                  centre[1] + rng.uniform(-0.4, 0.4) * radius[1])
            section &= ~_blob(shape, at, tuple(hole_r), rng)
        texture = _mosaic(pools["ordinary" if kind == "pale" else kind], shape, rng)
        if kind == "pale":
            texture = (255 - (255 - texture.astype(np.float32)) * PALE_STAIN).astype(np.uint8)
        rgb[section] = texture[section]
        tissue |= section
        if kind == "dense":
            dense |= section
        elif kind == "pale":
            pale |= section
    dust = _dust(rgb, tissue, rng)
    ink_by_colour = {}
    light = rgb.astype(np.float32)
    for colour, transmit in INK_COLOURS.items():
        alpha = _stroke(shape, rng)[..., None] * rng.uniform(0.85, 1.0)
        light *= 1 - alpha * (1 - np.asarray(transmit, np.float32))
        ink_by_colour[colour] = alpha[..., 0] > 0.5
    rgb = light.clip(0, 255).astype(np.uint8)
    ink = np.logical_or.reduce(list(ink_by_colour.values()))
    tissue &= ~ink
    rgb = cv2.GaussianBlur(rgb, (0, 0), 0.6)  # the scanner's optics: no razor edges
    return Case(f"case{seed}", rgb, tissue, ink, ink_by_colour, dust & ~ink, dense & tissue,
                pale & tissue)


def _dust(rgb: np.ndarray, tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey-brown specks and fibres on the glass, 1-25 um across; returns where they lie."""
    import cv2

    height, width = tissue.shape
    dust = np.zeros(tissue.shape, np.uint8)
    for _ in range(60):
        x, y = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        if tissue[y, x]:
            continue
        r = int(rng.uniform(1, 25) / MPP / 2) + 1
        if rng.random() < 0.3:  # a fibre
            dx, dy = rng.normal(0, 4 * r, 2).astype(int)
            cv2.line(dust, (x, y), (x + dx, y + dy), 1, max(1, r // 3))
        else:
            cv2.circle(dust, (x, y), r, 1, -1)
    dust = dust.astype(bool) & ~tissue
    shade = rng.uniform(60, 130)
    rgb[dust] = (np.array([shade + 10, shade, shade - 10])).clip(0, 255).astype(np.uint8)
    return dust
