"""``histohub extract``: whole-slide images -> one HDF5 feature file per slide.

    histohub extract slides/ extra.svs 'batch2/*.ndpi' list.csv --model resnet18-ssl --out feats/

Inputs may be slide files, folders (searched at any depth), glob patterns, and CSV or
text lists of paths. Options are checked before the model loads or anything is written
(exit code 2). A slide that fails (not a slide, no mpp, a full disk, an output it must not
replace) is reported and the others go on; the exit code is 1 when any failed. A slide
whose output was made for the same request is skipped, a ``--max-patches`` trial is
extended; an output histohub did not write, or made for another slide, model or tiling, is
kept and reported unless ``--overwrite``. A killed run resumes where it stopped.

A slide is the path given, made absolute without following links: a linked slide's output,
logs and attributes carry the link's own name, and two names for one file are two slides
(``histohub.slides._names``, docs/extraction-names.md). The summary lists every slide given,
once: extracted, already done, or failed and why.

The model is loaded (and compiled, when the job is big enough) once for all slides, and
the next slide's tissue mask and grid are prepared while the current one runs.

Many processes share a cohort: the slides, sorted by path, are dealt round-robin (slide
i to process i % N), from ``--shard I/N`` (job arrays) and from the ``RANK`` /
``WORLD_SIZE`` that ``torchrun`` sets (one process per GPU, on ``cuda:LOCAL_RANK``); with
both, a job array of multi-GPU jobs, each process takes one share of I x N. A lock beside
each output keeps two processes from writing one slide; a crashed process's slide is
resumed by the next run. See ``EPILOG`` for the commands.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import glob
import hashlib
import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)

_LIST_SUFFIXES = (".csv", ".txt", ".lst")
_CSV_COLUMNS = ("path", "slide_path", "slide", "filename", "file")

EPILOG = """\
many processes (each takes the slides i with i % N == its share; a rerun finishes what a
crashed process left):
  one machine, 4 GPUs (one process per GPU, cuda:LOCAL_RANK; on a GPU reading is the
  bottleneck: give each process reader workers):
    torchrun --standalone --nproc_per_node=4 -m histohub extract slides/ --out feats/ \\
        --device cuda --workers 4
  a SLURM job array of 8 tasks (CPU or one GPU each):
    #SBATCH --array=0-7
    histohub extract slides/ --out feats/ \\
        --shard ${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}
  both (8 array tasks x 4 GPUs = 32 shares):
    torchrun --standalone --nproc_per_node=4 -m histohub extract slides/ --out feats/ \\
        --device cuda --workers 4 --shard ${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}
torchrun sets OMP_NUM_THREADS=1 in each process: for processes on CPUs, set it to the
cores each may use.
"""


def register(subparsers) -> None:
    from histohub.hub._registry import default_model   # torch-free: --help must not import torch

    p = subparsers.add_parser(
        "extract", help="features of whole-slide images, one HDF5 file per slide",
        description="Tile slides at the model's microns per pixel, keep patches with tissue "
                    "(by default the 'contours' mask: all tissue, dense and pale, without "
                    "pen ink or debris), and write features + coords to <out>/<slide>.h5 "
                    "(the CLAM/TRIDENT layout).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="SLIDES_OR_DIRS",
                   help="slide files, folders, glob patterns, or .csv/.txt lists of paths")
    p.add_argument("--model", default=default_model(),
                   help=f"model name or checkpoint path (default: {default_model()})")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--accept-licence", action="store_true",
                   help="accept the licence of a restricted (non-commercial or gated) --model; "
                        "remembered in HISTOHUB_HOME")
    p.add_argument("--mpp", type=float,
                   help="microns per pixel of the slides, for files that do not record it")
    p.add_argument("--target-mpp", type=float,
                   help="microns per pixel to tile at (default: the model's, 0.5 for the "
                        "paper's models)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--read-threads", type=int, default=1,
                   help="threads reading patches while the model runs (default 1, best on "
                        "few CPU cores; 2 when reading is the bottleneck)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes reading patches instead of threads "
                        "(default 0: threads); on a GPU, where reading is the bottleneck, "
                        "one per free CPU core")
    p.add_argument("--mask", choices=("contours", "hsv", "otsu"), default="contours",
                   help="tissue detection. contours (default): tissue contours with holes, "
                        "keeping dense dark and pale tissue and leaving out glass, blue/green/"
                        "black pen ink and dust (IoU 0.979 against known masks, docs/tissue.md)"
                        "; hsv: the paper's rule (Appendix B; drops the darkest, densest "
                        "tissue; what training samples with); otsu: Otsu on saturation "
                        "(keeps ink)")
    p.add_argument("--roi", type=Path, metavar="FILE_OR_DIR",
                   help="GeoJSON regions of interest (QuPath annotations, level-0 px): one "
                        "file, or a folder of <slide stem>.geojson; only tissue inside counts, "
                        "holes and excluded classes are cut out")
    p.add_argument("--roi-exclude", nargs="+", default=["Ignore*"], metavar="CLASS",
                   help="classes (glob patterns, any case) of --roi annotations to cut out "
                        "(default: Ignore*)")
    p.add_argument("--coords", type=Path, metavar="FILE_OR_DIR",
                   help="extract exactly the patches of a CLAM or TRIDENT coordinates h5 "
                        "('coords' + patch_size_level0 or patch_size): one file, or a folder "
                        "of <slide stem>.h5; checked against each slide's size")
    p.add_argument("--geojson", action="store_true",
                   help="also write <out>/<slide>.geojson: tissue contours (annotations) and "
                        "patches (tiles) in level-0 px, for QuPath (drag it onto the slide)")
    p.add_argument("--min-foreground", type=float, default=0.5,
                   help="minimum tissue fraction of a patch (default 0.5, as in the paper)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs: finished ones, ones made for another slide, "
                        "model or tiling, and files histohub did not write")
    p.add_argument("--preview", action="store_true",
                   help="also write <out>/<slide>.png: thumbnail, tissue mask and patch grid")
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda when available, else cpu), cpu, cuda, cuda:1, ...; "
                        "under torchrun, cuda means cuda:LOCAL_RANK")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast precision (GPU)")
    p.add_argument("--compile", nargs="?", choices=("auto", "on", "off"), default="auto",
                   const="on",
                   help="torch.compile the model, once for all slides: auto (default: on a "
                        "CPU, when the slides hold enough patches to repay it), on, off")
    p.add_argument("--shard", metavar="I/N",
                   help="process only share I of N (0 <= I < N): slide i of the sorted list "
                        "when i %% N == I; for job arrays (see below)")
    p.add_argument("--max-patches", type=int, help="only the first N patches of each slide")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--record-resolved-path", action="store_true",
                   help="also record the file a linked slide leads to (slide_resolved_path); "
                        "by default outputs, logs and attributes name a slide only by the path "
                        "given (a link's own name), see docs/extraction-names.md")
    p.set_defaults(func=run)


def find_slides(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Expand files, folders, globs and CSV/text lists -> (slides, problems). Slides keep
    the path given (made absolute, links not followed: ``slides._names.given_path``)."""
    from histohub.slides._names import broken_link, find_in_folder, given_path
    from histohub.slides._reader import SLIDE_EXTENSIONS

    slides: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found, broken = find_in_folder(path, SLIDE_EXTENSIONS)
            problems += broken
            if not found and not broken:
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
                    problems.append(broken_link(entry) or
                                    f"{entry} (listed in {path.name}): no such file")
        elif path.is_file():
            slides.append(path)
        elif problem := broken_link(path):
            problems.append(problem)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            broken = [problem for problem in map(broken_link, matches) if problem]
            matches = [m for m in matches if m.is_file()]
            if not matches and not broken:
                problems.append(f"{item}: no such file, folder or matching pattern")
            problems += broken
            slides += matches
    # the path as given (links not followed): two names for one file are two slides
    unique = list(dict.fromkeys(given_path(p) for p in slides))
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


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; None -> ``(0, 1)``."""
    from histohub.errors import OptionError

    if text is None:
        return 0, 1
    from histohub._limits import MAX_COUNT

    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None or not int(match[1]) < int(match[2]) <= MAX_COUNT:
        raise OptionError(f"--shard {text}: must be I/N with 0 <= I < N, e.g. --shard 0/4")
    return int(match[1]), int(match[2])


def launcher_rank() -> tuple[int, int, int | None]:
    """``(rank, world size, local rank)`` that ``torchrun`` (or another launcher setting
    the same variables) gave this process; ``(0, 1, None)`` when started alone."""
    from histohub.errors import OptionError

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = os.environ.get("LOCAL_RANK")
        local_rank = None if local is None else int(local)
    except ValueError:
        raise OptionError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by "
                          "torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise OptionError(f"RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local_rank


def shard_slides(slides: list[Path], index: int, count: int) -> list[Path]:
    """The slides of share ``index`` of ``count``: sorted by path, slide i goes to share
    ``i % count`` (the same split in every process, whatever order the inputs came in)."""
    return sorted(slides, key=str)[index::count]


def pick_device(device: str, local_rank: int | None) -> str:
    """``auto``: cuda when available, else cpu. A bare ``cuda`` under a launcher is
    ``cuda:LOCAL_RANK`` (one GPU per process; with more processes than GPUs, they take
    the GPUs in turn)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and local_rank is not None:
        gpus = torch.cuda.device_count()
        device = f"cuda:{local_rank % gpus if gpus else local_rank}"
    return device


def check_device(device: str) -> None:
    """``OptionError`` (one line) unless torch knows ``device`` and, for a GPU, this
    machine has it: checked before ``--out`` is made or the model loads."""
    import torch

    from histohub.errors import OptionError

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise OptionError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N"
                          ) from None
    if parsed.type == "cuda":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            raise OptionError(f"--device {device}: no CUDA GPU on this machine; use "
                              "--device cpu")
        if parsed.index is not None and parsed.index >= gpus:
            raise OptionError(f"--device {device}: this machine has {gpus} GPU(s), cuda:0 "
                              f"to cuda:{gpus - 1}")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from histohub._features import check_options
    from histohub.errors import OptionError
    from histohub.slides._extract import SlideExtractor, SlideJob, Tiling
    from histohub.slides._guard import guarded_results
    from histohub.slides._names import same_files

    compile = {"auto": "auto", "on": True, "off": False}[args.compile]
    check_options(cli=True, batch_size=args.batch_size, num_workers=args.workers,
                  read_threads=args.read_threads, max_patches=args.max_patches, mpp=args.mpp,
                  target_mpp=args.target_mpp, min_foreground=args.min_foreground)
    if args.accept_licence:
        _accept_licence(args.model)
    index, count = parse_shard(args.shard)
    rank, world, local_rank = launcher_rank()
    device = pick_device(args.device, local_rank)
    check_device(device)
    if args.out.exists() and not args.out.is_dir():
        raise OptionError(f"--out {args.out}: is a file, not a folder; give a folder (made "
                          "when missing)")
    share, shares = index * world + rank, count * world
    slides, problems = find_slides(args.inputs)
    for problem in problems:
        log.error(problem)
    if not slides:
        log.error("no slides to process")
        return 1
    names = output_names(slides)  # from the whole list: every share names outputs alike
    for group in same_files(slides):
        log.info("%s are one file; each name gets its own output",
                 ", ".join(str(p) for p in group))
    if shares > 1:
        total = len(slides)
        slides = shard_slides(slides, share, shares)
        log.info("share %d of %d: %d of %d slides", share, shares, len(slides), total)
    tiling = Tiling(mpp=args.mpp, target_mpp=args.target_mpp, mask=args.mask,
                    min_foreground=args.min_foreground, max_patches=args.max_patches,
                    roi=args.roi, roi_exclude=tuple(args.roi_exclude), coords=args.coords)
    check_regions(tiling, slides)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [SlideJob(slide, args.out / f"{names[slide]}.h5",
                     args.out / f"{names[slide]}.png" if args.preview else None,
                     args.out / f"{names[slide]}.geojson" if args.geojson else None,
                     record_resolved_path=args.record_resolved_path)
            for slide in slides]
    started = time.perf_counter()
    failed, results = list(problems), []
    # what the imports made lives as long as this process: exempt it from the cyclic
    # garbage collector, whose full passes over it (0.1-0.2 s each, holding the GIL)
    # stalled the threads of a run
    gc.freeze()
    # in a child process: a slide whose reading kills it (a native abort) fails alone
    extractor = functools.partial(
        SlideExtractor, args.model, device=device, batch_size=args.batch_size,
        num_workers=args.workers, read_threads=args.read_threads, amp=args.amp or False,
        compile=compile, progress=not args.quiet)
    with logging_redirect_tqdm(), tqdm(
            total=len(jobs), unit="slide", desc="slides", disable=args.quiet,
            dynamic_ncols=True) as bar:
        for result in guarded_results(extractor, jobs, tiling=tiling,
                                      overwrite=args.overwrite):
            if result.error is not None:  # not a slide, no mpp, busy, disk full, kept
                # output: reported (logged already), the others go on
                failed.append(f"{result.slide_path}: {result.error}")
            else:
                results.append(result)
            bar.update(1)
    _summary(results, failed, time.perf_counter() - started, args.out)
    return 1 if failed else 0


def check_regions(tiling, slides: list[Path]) -> None:
    """Every slide's ROI or coordinates file, read and checked before the model loads or
    anything is written (``RoiError``: exit code 2)."""
    if tiling.roi is None and tiling.coords is None:
        return
    from histohub.errors import SlideError
    from histohub.slides._regions import slide_regions
    from histohub.slides._reader import open_slide

    for path in slides:
        try:
            slide = open_slide(path)
        except SlideError:
            continue  # not a slide: reported with the others when its turn comes
        with slide:
            slide_regions(tiling, slide)


def _accept_licence(model: str) -> None:
    """Record acceptance of ``model``'s licence (a manifest name; a file, even one named
    like a model, needs none: ``describe_model`` decides which it is)."""
    from histohub.hub._descriptor import describe_model
    from histohub.hub._licences import accept

    described = describe_model(model)
    if described.entry is not None:
        accept(described.entry)


def _summary(results: list, failed: list[str], seconds: float, out: Path) -> None:
    from histohub.slides._names import slide_lines

    skipped = sum(r.skipped for r in results)
    patches = sum(r.n_patches for r in results)
    run_now = sum(r.patches_run for r in results)
    bad_tiles = sum(r.n_failed for r in results)
    nonfinite = sum(r.n_nonfinite for r in results)
    empty = [r.slide_path.name for r in results if not r.skipped and r.n_grid == 0]
    resumed = sum(r.resumed_at > 0 for r in results)
    lines = [
        f"slides: {len(results) - skipped} extracted"
        + (f" ({resumed} resumed)" if resumed else "")
        + f", {skipped} already done, {len(failed)} failed"
        + (f", {len(empty)} without tissue ({', '.join(empty)})" if empty else ""),
        f"patches: {patches} written ({run_now} processed now), {bad_tiles} unreadable tiles "
        f"skipped, {nonfinite} NaN/inf features left out",
        f"time: {seconds:.1f} s, {run_now / seconds if seconds > 0 else 0:.1f} patches/s",
        f"output: {out}",
    ]
    from histohub.hub._redact import one_line

    # with the failed ones below: every slide given, once
    lines = [one_line(line) for line in slide_lines(results)] + lines
    for problem in failed:  # one line each, whatever the file names hold
        lines.append(f"failed: {one_line(problem)}")
    print("\n".join(lines))
