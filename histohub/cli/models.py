"""``histohub list | info | download | pin | convert``: the commands about models and weights."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from ..errors import HistohubError, KeyMappingError, ManifestError


def register(subparsers) -> None:
    """Add the model sub-commands to the ``histohub`` parser."""
    parser = subparsers.add_parser("list", help="list the models of the manifests in use")
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
    parser.set_defaults(func=_download)

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


def _list(args: argparse.Namespace) -> int:
    from .._manifest import load_manifest

    rows = [("NAME", "ARCH", "DIM", "PINNED", "CACHED", "LICENCE")]
    for name, entry in sorted(load_manifest().items()):
        rows.append((name + (" *" if entry.default else ""), entry.arch,
                     str(entry.feature_dim), _pinned(entry), _cached(entry), entry.license))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print("\n* default model.  `histohub info NAME` for details, `histohub download NAME` to "
          "prefetch.")
    return 0


def _pinned(entry) -> str:
    pinned = [f.sha256 is not None for f in entry.weights]
    return "yes" if all(pinned) else "partly" if any(pinned) else "no"


def _cached(entry) -> str:
    from .._download import cache_status

    statuses = [cache_status(f) for f in entry.weights]
    if "verified" in statuses:
        return "yes"
    return "unverified" if "unverified" in statuses else "no"


def _info(args: argparse.Namespace) -> int:
    from .._download import cache_status, cached_path
    from .._manifest import get_entry

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
    from .._download import fetch_file, fetch_weights
    from .._manifest import get_entry

    failed = 0
    for name in args.names:
        try:
            entry = get_entry(name)
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


def _pin(args: argparse.Namespace) -> int:
    from .. import _manifest
    from .._download import fetch_file

    if args.manifest is not None:
        manifest = args.manifest.resolve()
        entries = _manifest.read_manifest(manifest)
        if args.name not in entries:
            raise ManifestError(f"{args.name!r} is not defined in {manifest}")
        entry = entries[args.name]
    else:
        entry = _manifest.get_entry(args.name)
        manifest = Path(entry.manifest_path).resolve()  # the real file, not a symlink to it
    text = manifest.read_text(encoding="utf-8")
    data = json.loads(text)
    files = {f["filename"]: f for f in data["models"][args.name]["weights"]}
    failed = changed = 0
    for file in entry.weights:
        try:
            fetched = fetch_file(file, progress=not args.quiet, name=args.name, rehash=True)
        except HistohubError as error:
            print(f"histohub pin: {file.filename}: error: {error}", file=sys.stderr)
            failed += 1
            continue
        size = fetched.path.stat().st_size
        was = (files[file.filename]["sha256"], files[file.filename]["size"])
        files[file.filename]["sha256"], files[file.filename]["size"] = fetched.sha256, size
        changed += was != (fetched.sha256, size)
        state = "pinned" if was != (fetched.sha256, size) else "already pinned"
        print(f"{args.name}: {file.filename}: {state} sha256 {fetched.sha256}, {size} bytes")
    if changed:
        _write_text_atomically(manifest, json.dumps(data, indent=2,
                                                    ensure_ascii=text.isascii()) + "\n")
        _manifest._load_all.cache_clear()
        print(f"updated {manifest}")
    return 2 if failed else 0


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


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

    from .._checkpoint import DEFAULT_KEY_MAP, read_checkpoint
    from .._download import fetch_weights, sha256_file
    from .._manifest import load_manifest

    output: Path = args.output
    problem = _output_problem(output)
    if problem:
        print(f"histohub convert: error: {problem}", file=sys.stderr)
        return 2
    entries = load_manifest()
    if args.input in entries and not Path(args.input).exists():
        entry = entries[args.input]
        fetched = fetch_weights(entry)
        source, key_map, archs = fetched.path, fetched.file.key_map, [entry.arch]
        checkpoint = read_checkpoint(source, format=fetched.file.format)
    else:
        source, key_map = Path(args.input).expanduser(), DEFAULT_KEY_MAP
        if source.resolve() == output.resolve():
            print("histohub convert: error: IN and OUT are the same file", file=sys.stderr)
            return 2
        checkpoint = read_checkpoint(source)
        archs = None
    arch, state = _fit(checkpoint, key_map, args.arch, archs)
    metadata = {"format": "pt", "histohub_arch": arch, "source_file": source.name,
                "source_sha256": sha256_file(source)}
    try:
        _save_safetensors(state, output, metadata)
    except (OSError, SafetensorError) as error:  # a full disk, no permission
        print(f"histohub convert: error: cannot write {output}: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output}: {arch} backbone, {len(state)} tensors, sha256 {sha256_file(output)}")
    return 0


def _fit(checkpoint: dict, key_map, arch: str | None, archs: list[str] | None):
    """(arch, mapped backbone state) for the requested or the first fitting architecture."""
    import torch

    from .._checkpoint import map_state_dict
    from ..models import FEATURE_DIMS, build_encoder

    if arch is not None and archs is not None and arch not in archs:
        raise KeyMappingError(f"This model is a {archs[0]}; drop --arch {arch}")
    candidates = [arch] if arch else (archs or list(FEATURE_DIMS))
    errors = {}
    for candidate in candidates:
        if candidate not in FEATURE_DIMS:
            raise KeyMappingError(f"Unknown architecture {candidate!r}; choose one of "
                                  f"{sorted(FEATURE_DIMS)}")
        with torch.device("meta"):
            expected = {k: v.shape for k, v in build_encoder(candidate).state_dict().items()}
        try:
            return candidate, map_state_dict(checkpoint, key_map, expected)
        except KeyMappingError as error:
            errors[candidate] = error
    if len(candidates) == 1:
        raise errors[candidates[0]]
    raise KeyMappingError(f"The checkpoint fits none of {candidates}; pass --arch to see "
                          "which keys are missing or unexpected for the one you expect")


def _save_safetensors(state: dict, output: Path, metadata: dict[str, str]) -> None:
    """Write ``state`` to ``output`` through a temporary file and an atomic rename."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().contiguous().clone() for key, value in state.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
