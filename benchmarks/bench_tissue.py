"""Tissue masks against known truth: IoU and the share of pen ink kept, per mask method.

    python benchmarks/bench_tissue.py                # 6 cases, 4800 x 3600 px at 0.5 um/px
    python benchmarks/bench_tissue.py --cases 2 --markdown

Each case (``tissue_slides.make_case``: real H&E tissue from the shared Kather tiles and
slide cells, with holes, 2-3 sections, blue/green/black marker strokes across tissue and
glass, dust) is written as a JPEG pyramidal TIFF and tiled by ``histohub.slides.tile_grid``
exactly as ``histohub extract`` tiles it (224 px at 0.5 um/px); its mask is compared with
the truth brought to the mask's grid (a mask pixel is tissue in truth when over half its
area is). Reported per method, summed over all cases:

- IoU: tissue intersection over union; recall on dense and on pale sections;
- ink kept: the share of ink pixels the mask keeps (by colour too); dust kept likewise;
- patches: kept patches whose footprint is under half tissue in truth (false), and
  patches at least half tissue in truth left out (missed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from tissue_slides import MPP, make_case, tiles
from histohub.slides._synthetic import write_slide

METHODS = ("contours", "hsv", "otsu")


def _on_grid(truth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(truth.astype(np.float32), (shape[1], shape[0]),
                      interpolation=cv2.INTER_AREA) > 0.5


def _patch_truth(truth: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 truth's tissue fraction of every candidate patch -> (coords, fraction)."""
    size = grid.patch_size_level0
    rows, cols = truth.shape[0] // size, truth.shape[1] // size
    blocks = truth[:rows * size, :cols * size].reshape(rows, size, cols, size)
    fraction = blocks.mean(axis=(1, 3))
    ys, xs = np.mgrid[0:rows, 0:cols]
    return np.stack([xs.ravel(), ys.ravel()], 1) * size, fraction.ravel()


def measure(case, slide_path: Path) -> dict[str, dict[str, float]]:
    """Counts per method for one case (summed later)."""
    from histohub.slides import open_slide, tile_grid

    out = {}
    coords, fraction = None, None
    with open_slide(slide_path) as slide:
        for method in METHODS:
            grid = tile_grid(slide, target_mpp=MPP, patch_size=224, method=method)
            mask = grid.mask
            truth = _on_grid(case.tissue, mask.shape)
            counts = {"inter": (mask & truth).sum(), "union": (mask | truth).sum()}
            for name, region in (("dense", case.dense), ("pale", case.pale),
                                 ("ink", case.ink), ("dust", case.dust),
                                 *case.ink_by_colour.items()):
                on = _on_grid(region, mask.shape) if name != "dust" else \
                    _on_grid(region, mask.shape) | (_coverage(region, mask.shape) > 0)
                counts[f"{name}_all"] = on.sum()
                counts[f"{name}_kept"] = (mask & on).sum()
            if coords is None:
                coords, fraction = _patch_truth(case.tissue, grid)
            kept = {tuple(c) for c in grid.coords.tolist()}
            in_grid = np.array([tuple(c) in kept for c in coords.tolist()])
            counts["patches_true"] = (fraction >= 0.5).sum()
            counts["patches_kept"] = in_grid.sum()
            counts["patches_false"] = (in_grid & (fraction < 0.5)).sum()
            counts["patches_missed"] = (~in_grid & (fraction >= 0.5)).sum()
            out[method] = counts
    return out


def _coverage(region: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(region.astype(np.float32), (shape[1], shape[0]),
                      interpolation=cv2.INTER_AREA)


def table(totals: dict[str, dict[str, float]], *, markdown: bool) -> str:
    head = ["mask", "IoU", "dense recall", "pale recall", "ink kept", "blue", "green",
            "black", "dust kept", "patches kept", "false", "missed"]
    rows = []
    for method, c in totals.items():
        def share(name):
            return c[f"{name}_kept"] / max(c[f"{name}_all"], 1)
        rows.append([method + (" (default)" if method == "contours" else ""),
                     f"{c['inter'] / c['union']:.3f}", f"{share('dense'):.3f}",
                     f"{share('pale'):.3f}", f"{share('ink'):.1%}", f"{share('blue'):.1%}",
                     f"{share('green'):.1%}", f"{share('black'):.1%}", f"{share('dust'):.1%}",
                     f"{c['patches_kept']}/{c['patches_true']}", str(c["patches_false"]),
                     str(c["patches_missed"])])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [head, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--size", type=int, nargs=2, default=(4800, 3600),
                        metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--keep", type=Path, help="write the case slides and truths here")
    args = parser.parse_args(argv)
    pools = tiles()
    if pools is None:
        print("the shared data (../shared/data) is absent: nothing to measure")
        return 1
    totals: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for seed in range(args.cases):
            case = make_case(seed, pools, size=tuple(args.size))
            path = write_slide(folder / f"{case.name}.tiff", case.rgb, mpp=MPP)
            if args.keep:
                np.savez_compressed(folder / f"{case.name}_truth.npz", tissue=case.tissue,
                                    ink=case.ink, dust=case.dust)
            for method, counts in measure(case, path).items():
                total = totals.setdefault(method, {})
                for key, value in counts.items():
                    total[key] = total.get(key, 0) + int(value)
            print(f"{case.name} done", file=sys.stderr)
    print(f"{args.cases} cases of {args.size[0]} x {args.size[1]} px at {MPP} um/px, "
          "masks as `histohub extract` makes them (224 px patches at 0.5 um/px)")
    print(table(totals, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
