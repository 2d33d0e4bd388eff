"""``histohub list | info | download | pin | convert``: the commands about models and weights."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from histohub.hub._cache import cache_status, cached_path
from histohub.hub._fetch import fetch_file, fetch_weights
from histohub.hub._verify import sha256_file
from histohub.files import atomic_path
from histohub.hub._registry import get_entry, load_manifest, read_manifest
from histohub.hub._manifest_writer import pin_weights
from histohub.errors import HistohubError, ManifestError
from histohub.hub._licences import check_accepted


def register(subparsers) -> None:
    """Add the model sub-commands to the ``histohub`` parser."""
    parser = subparsers.add_parser("list", help="list the models of the manifests in use")
    parser.add_argument("--commercial", action="store_true",
                        help="only models whose licence allows commercial use")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as Markdown (the README's zoo table)")
    parser.set_defaults(func=_list)

    parser = subparsers.add_parser("info", help="describe a model: preprocessing, weights, "
                                                "sources, licence, citation")
    parser.add_argument("name", metavar="NAME")
    parser.set_defaults(func=_info)

    parser = subparsers.add_parser(
        "download", help="prefetch weights into the cache (HISTOHUB_HOME)",
        description="Fetch and verify the weights of each NAME into the cache. Copy the cache "
                    "folder to an offline machine, or serve its weights/ folder as "
                    "HISTOHUB_MIRROR.")
    parser.add_argument("names", nargs="+", metavar="NAME")
    parser.add_argument("--all-files", action="store_true",
                        help="fetch every alternative weights file (to fill a mirror), not "
                             "just the first that can be fetched")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--accept-licence", action="store_true",
                        help="accept the licence of each restricted (non-commercial or "
                             "gated) NAME; remembered in HISTOHUB_HOME")
    parser.set_defaults(func=_download)

    parser = subparsers.add_parser(
        "bundle", help="weights + manifest + licence terms in one folder, for offline sites",
        description="Fetch and verify each NAME, and write its weights, an extra manifest "
                    "(for models of HISTOHUB_MANIFEST files) and its licence terms into the "
                    "new folder OUT. Another machine uses OUT as HISTOHUB_MIRROR (and "
                    "OUT/manifest.json in HISTOHUB_MANIFEST); every copy is checked against "
                    "the sha256 recorded here on arrival.")
    parser.add_argument("items", nargs="+", metavar="NAME... OUT")
    parser.add_argument("--accept-licence", action="store_true",
                        help="accept the licences of restricted NAMEs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_bundle)

    parser = subparsers.add_parser(
        "pin", help="write the sha256 and size of a model's files into its manifest",
        description="For maintainers with network: fetch each weights file of NAME (a cached "
                    "copy is re-hashed in full) and write its sha256 and size into the "
                    "manifest that defines NAME.")
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--manifest", type=Path, metavar="PATH",
                        help="manifest file to update (default: the one defining NAME)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_pin)

    parser = subparsers.add_parser(
        "convert", help="turn a checkpoint into backbone-only safetensors",
        description="Read IN (safetensors, a torch state dict, a Lightning .ckpt, or a model "
                    "name) without executing anything, map its keys strictly onto the "
                    "architecture and write only the backbone to OUT.safetensors.")
    parser.add_argument("input", metavar="IN")
    parser.add_argument("output", type=Path, metavar="OUT.safetensors")
    parser.add_argument("--arch", help="architecture (default: the one whose keys fit)")
    parser.set_defaults(func=_convert)


# --------------------------------------------------------------------------- list / info


#: Parameters above which a model is listed as a GPU model (minutes per slide on a CPU).
GPU_PARAMS = 250_000_000


def _list(args: argparse.Namespace) -> int:
    header = ("NAME", "ARCH", "DIM", "INPUT", "MPP", "PARAMS", "RUNS ON", "COMMERCIAL",
              "GATED", "PINNED", "CACHED", "LICENCE")
    rows = []
    for name, entry in sorted(load_manifest().items()):
        if args.commercial and entry.licence.commercial is not True:
            continue
        pre, terms = entry.preprocessing, entry.licence
        rows.append((
            name + (" *" if entry.default else ""), entry.arch, str(entry.feature_dim),
            f"{pre.input_size}px", f"{pre.mpp:g}" if pre.mpp else "-",
            f"{entry.params / 1e6:.0f}M" if entry.params else "-",
            "GPU" if (entry.params or 0) > GPU_PARAMS else "CPU or GPU",
            {True: "yes", False: "no", None: "unknown"}[terms.commercial],
            "yes" if terms.gated else "no", _pinned(entry), _cached(entry), entry.license))
    if args.markdown:
        _print_markdown(header, rows)
        return 0
    rows.insert(0, header)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print("\n* default model.  `histohub info NAME` for details, `histohub download NAME` to "
          "prefetch. Models not commercial or gated load only after `--accept-licence`.")
    return 0


def _print_markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """The table without the cache columns (they describe this machine, not the model)."""
    keep = [i for i, h in enumerate(header) if h not in ("PINNED", "CACHED")]
    print("| " + " | ".join(header[i].capitalize() for i in keep) + " |")
    print("|" + "---|" * len(keep))
    for row in rows:
        print("| " + " | ".join(row[i].replace("|", "/") for i in keep) + " |")


def _pinned(entry) -> str:
    pinned = [f.sha256 is not None for f in entry.weights]
    return "yes" if all(pinned) else "partly" if any(pinned) else "no"


def _cached(entry) -> str:
    statuses = [cache_status(f) for f in entry.weights]
    if "verified" in statuses:
        return "yes"
    return "unverified" if "unverified" in statuses else "no"


def _info(args: argparse.Namespace) -> int:
    entry = get_entry(args.name)
    pre = entry.preprocessing
    print(entry.name + (" (default)" if entry.default else ""))
    _field("", entry.description)
    _field("architecture", f"{entry.arch}, {entry.feature_dim}-d features")
    mpp = f"{pre.mpp} um/px" if pre.mpp is not None else "microns per pixel not stated"
    _field("preprocessing", f"{pre.input_size} px ({pre.interpolation}) at {mpp}; "
                            f"mean {list(pre.mean)}, std {list(pre.std)}")
    if pre.mpp_note:
        _field("", pre.mpp_note)
    for index, file in enumerate(entry.weights, 1):
        status = cache_status(file)
        pin = (f"sha256 {file.sha256}, {file.size} bytes" if file.sha256
               else "sha256 not pinned (trusted on first download)")
        _field("weights" if index == 1 else "",
               f"{index}. {file.filename} ({file.format}); {pin}")
        for source in file.sources:
            _field("", f"   from {source.describe()}", wrap=False)
        _field("", f"   cached: {cached_path(file)} ({status})" if status else "   not cached",
               wrap=False)
    _field("licence", entry.license)
    _field("citation", entry.citation)
    _field("training data", entry.training_data)
    for key, value in entry.recipe.items():
        _field("recipe" if key == next(iter(entry.recipe)) else "", f"{key}: {value}")
    _field("metrics", json.dumps(entry.metrics) if entry.metrics else "(none measured yet)")
    _field("manifest", str(entry.manifest_path))
    return 0


def _field(label: str, text: str, *, width: int = 100, wrap: bool = True) -> None:
    """``  label         text``, the text wrapped under itself (URLs and paths kept whole)."""
    indent = " " * (len(text) - len(text.lstrip()))
    lines = (textwrap.wrap(text, width=width - 16, subsequent_indent=indent,
                           break_long_words=False, break_on_hyphens=False)
             if wrap else [text]) or [""]
    for i, line in enumerate(lines):
        print(f"  {(label if i == 0 else ''):<14}{line}".rstrip())


# --------------------------------------------------------------------------- download / pin


def _download(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.names:
        try:
            entry = get_entry(name)
            check_accepted(entry, accept_now=args.accept_licence)
            if args.all_files:
                fetched = [fetch_file(f, progress=not args.quiet, name=name)
                           for f in entry.weights]
            else:
                fetched = [fetch_weights(entry, progress=not args.quiet)]
        except HistohubError as error:
            print(f"histohub download: {name}: error: {error}", file=sys.stderr)
            failed += 1
            continue
        for item in fetched:
            print(f"{name}: {item.path} (sha256 {item.sha256})")
    return 2 if failed else 0


def _bundle(args: argparse.Namespace) -> int:
    from histohub.hub._bundle import bundle

    if len(args.items) < 2:
        print("histohub bundle: error: give at least one NAME and the folder OUT",
              file=sys.stderr)
        return 2
    *names, out = args.items
    folder = bundle(names, out, accept_licence=args.accept_licence, progress=not args.quiet)
    print(f"wrote {folder}: {len(names)} model(s). Elsewhere: HISTOHUB_MIRROR={folder}"
          + (f" HISTOHUB_MANIFEST={folder / 'manifest.json'}"
             if (folder / "manifest.json").exists() else ""))
    return 0


def _pin(args: argparse.Namespace) -> int:
    if args.manifest is not None:
        manifest = args.manifest.resolve()
        entries = read_manifest(manifest)
        if args.name not in entries:
            raise ManifestError(f"{args.name!r} is not defined in {manifest}")
        entry = entries[args.name]
    else:
        entry = get_entry(args.name)
        manifest = Path(entry.manifest_path).resolve()  # the real file, not a symlink to it
    failed, verified = 0, {}
    for file in entry.weights:
        try:
            fetched = fetch_file(file, progress=not args.quiet, name=args.name, rehash=True)
        except HistohubError as error:
            print(f"histohub pin: {file.filename}: error: {error}", file=sys.stderr)
            failed += 1
            continue
        size = fetched.path.stat().st_size
        new = (file.sha256, file.size) != (fetched.sha256, size)
        if new:
            verified[file.filename] = (fetched.sha256, size)
        state = "pinned" if new else "already pinned"
        print(f"{args.name}: {file.filename}: {state} sha256 {fetched.sha256}, {size} bytes")
    if verified:
        pin_weights(manifest, args.name, verified)
        print(f"updated {manifest}")
    return 2 if failed else 0


# --------------------------------------------------------------------------- convert


def _output_problem(output: Path) -> str | None:
    """Why ``output`` cannot be written, or None: checked before any work is done."""
    if output.suffix != ".safetensors":
        return f"OUT must end in .safetensors, got {output}"
    if output.is_dir():
        return f"OUT {output} is a folder; give the file to write, e.g. {output}/model.safetensors"
    existing = next(p for p in output.parents if p.exists())
    if not existing.is_dir():
        return f"cannot create {output}: {existing} is a file, not a folder"
    return None


def _convert(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError

    from histohub.hub._descriptor import describe_model
    from histohub.hub._pretrained import read_weights

    output: Path = args.output
    problem = _output_problem(output)
    if problem:
        print(f"histohub convert: error: {problem}", file=sys.stderr)
        return 2
    described = describe_model(args.input, arch=args.arch)
    if described.is_file and described.file.resolve() == output.resolve():
        print("histohub convert: error: IN and OUT are the same file", file=sys.stderr)
        return 2
    described, state, _ = read_weights(described)
    source, arch = Path(described.weights_path), described.arch
    metadata = {"format": "pt", "histohub_arch": arch, "source_file": source.name,
                "source_sha256": described.sha256}
    try:
        _save_safetensors(state, output, metadata)
    except (OSError, SafetensorError) as error:  # a full disk, no permission
        print(f"histohub convert: error: cannot write {output}: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output}: {arch} backbone, {len(state)} tensors, sha256 {sha256_file(output)}")
    return 0


def _save_safetensors(state: dict, output: Path, metadata: dict[str, str]) -> None:
    """Write ``state`` to ``output`` atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().contiguous().clone() for key, value in state.items()}
    with atomic_path(output) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
