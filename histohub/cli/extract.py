"""``histohub extract``: whole-slide images -> one HDF5 feature file per slide.

    histohub extract slides/ extra.svs 'batch2/*.ndpi' list.csv --model resnet18-ssl --out feats/

Inputs may be slide files, folders (searched at any depth), glob patterns, and CSV or
text lists of paths. Options are checked before the model loads or anything is written
(exit code 2). A slide that fails (not a slide, no mpp, a full disk, an output it must not
replace) is reported and the others go on; the exit code is 1 when any failed. A slide
whose output was made for the same request is skipped, a ``--max-patches`` trial is
extended; an output histohub did not write, or made for another slide, model or tiling, is
kept and reported unless ``--overwrite``. A killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

_LIST_SUFFIXES = (".csv", ".txt", ".lst")
_CSV_COLUMNS = ("path", "slide_path", "slide", "filename", "file")


def register(subparsers) -> None:
    from ..pretrained import DEFAULT_MODEL

    p = subparsers.add_parser(
        "extract", help="features of whole-slide images, one HDF5 file per slide",
        description="Tile slides at the model's microns per pixel, keep patches with tissue "
                    "(the paper's HSV rule), and write features + coords to <out>/<slide>.h5 "
                    "(the CLAM/TRIDENT layout).")
    p.add_argument("inputs", nargs="+", metavar="SLIDES_OR_DIRS",
                   help="slide files, folders, glob patterns, or .csv/.txt lists of paths")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name or checkpoint path (default: {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--mpp", type=float,
                   help="microns per pixel of the slides, for files that do not record it")
    p.add_argument("--target-mpp", type=float,
                   help="microns per pixel to tile at (default: the model's, 0.5 for the "
                        "paper's models)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes reading patches (default 0: one reader "
                        "thread, best on few CPU cores)")
    p.add_argument("--mask", choices=("hsv", "otsu"), default="hsv",
                   help="tissue detection: the paper's HSV rule (default) or Otsu on saturation")
    p.add_argument("--min-foreground", type=float, default=0.5,
                   help="minimum tissue fraction of a patch (default 0.5, as in the paper)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs: finished ones, ones made for another slide, "
                        "model or tiling, and files histohub did not write")
    p.add_argument("--preview", action="store_true",
                   help="also write <out>/<slide>.png: thumbnail, tissue mask and patch grid")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast precision (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--max-patches", type=int, help="only the first N patches of each slide")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def find_slides(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Expand files, folders, globs and CSV/text lists -> (slides, problems)."""
    from ..wsi import SLIDE_EXTENSIONS

    slides: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
            if not found:
                problems.append(f"{path}: no slide files ({', '.join(SLIDE_EXTENSIONS)}) inside")
            slides += found
        elif path.is_file() and path.suffix.lower() in _LIST_SUFFIXES:
            listed = _read_list(path)
            if not listed:
                problems.append(f"{path}: the list names no slides")
            for entry in listed:
                if entry.is_file():
                    slides.append(entry)
                else:
                    problems.append(f"{entry} (listed in {path.name}): no such file")
        elif path.is_file():
            slides.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                problems.append(f"{item}: no such file, folder or matching pattern")
            slides += matches
    unique = list(dict.fromkeys(p.resolve() for p in slides))
    return unique, problems


def _read_list(path: Path) -> list[Path]:
    """Slide paths from a CSV (a column named path/slide_path/slide/filename, else the
    first) or a text file (one per line, # comments); relative to the list's folder."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        column = next((header.index(c) for c in _CSV_COLUMNS if c in header), None)
        if column is None:  # no header: the first column holds paths
            column, body = 0, rows
        else:
            body = rows[1:]
        entries = [row[column].strip() for row in body if len(row) > column and row[column].strip()]
    else:
        entries = [line.strip() for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    return [(path.parent / Path(e).expanduser()) for e in entries]


def output_names(slides: list[Path]) -> dict[Path, str]:
    """Slide -> output stem: the file stem, plus a short path hash where stems collide."""
    stems: dict[str, int] = {}
    for slide in slides:
        stems[slide.stem] = stems.get(slide.stem, 0) + 1
    return {s: s.stem if stems[s.stem] == 1 else
            f"{s.stem}-{hashlib.sha256(str(s).encode()).hexdigest()[:8]}" for s in slides}


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..errors import HistohubError
    from ..features import check_options, extract_slide
    from ..pretrained import load_pretrained

    check_options(cli=True, batch_size=args.batch_size, num_workers=args.workers,
                  max_patches=args.max_patches, mpp=args.mpp, target_mpp=args.target_mpp,
                  min_foreground=args.min_foreground)
    slides, problems = find_slides(args.inputs)
    for problem in problems:
        log.error(problem)
    if not slides:
        log.error("no slides to process")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_pretrained(args.model, device=args.device, progress=not args.quiet)
    names = output_names(slides)
    started = time.perf_counter()
    failed, results = list(problems), []
    with logging_redirect_tqdm(), tqdm(slides, unit="slide", desc="slides",
                                       disable=args.quiet, dynamic_ncols=True) as bar:
        for slide in bar:
            stem = names[slide]
            try:
                result = extract_slide(
                    model, slide, args.out / f"{stem}.h5", mpp=args.mpp,
                    target_mpp=args.target_mpp, batch_size=args.batch_size,
                    device=args.device, num_workers=args.workers, amp=args.amp or False,
                    compile=args.compile, mask=args.mask, min_foreground=args.min_foreground,
                    overwrite=args.overwrite, max_patches=args.max_patches,
                    preview=args.out / f"{stem}.png" if args.preview else None,
                    progress=not args.quiet)
            except HistohubError as error:  # not a slide, no mpp, busy, disk full, kept
                # output: the others go on
                log.error("%s", error)
                failed.append(f"{slide}: {error}")
                continue
            results.append(result)
    _summary(results, failed, time.perf_counter() - started, args.out)
    return 1 if failed else 0


def _summary(results: list, failed: list[str], seconds: float, out: Path) -> None:
    skipped = sum(r.skipped for r in results)
    patches = sum(r.n_patches for r in results)
    run_now = sum(r.patches_run for r in results)
    bad_tiles = sum(r.n_failed for r in results)
    nonfinite = sum(r.n_nonfinite for r in results)
    empty = [r.slide_path.name for r in results if not r.skipped and r.n_grid == 0]
    lines = [
        f"slides: {len(results) - skipped} extracted, {skipped} already done, {len(failed)} failed"
        + (f", {len(empty)} without tissue ({', '.join(empty)})" if empty else ""),
        f"patches: {patches} written ({run_now} processed now), {bad_tiles} unreadable tiles "
        f"skipped, {nonfinite} NaN/inf features left out",
        f"time: {seconds:.1f} s, {run_now / seconds if seconds > 0 else 0:.1f} patches/s",
        f"output: {out}",
    ]
    for problem in failed:
        lines.append(f"failed: {problem}")
    print("\n".join(lines))
