"""``histohub export-hf NAME DIR`` and ``histohub push NAME REPO_ID``: the Hugging Face front door.

``export-hf`` writes timm's Hub layout (config.json, model.safetensors, README.md) so that
``timm.create_model("local-dir:DIR")`` or, once pushed, ``"hf-hub:REPO_ID"`` loads the
encoder with the right preprocessing; ``push`` uploads it with huggingface_hub.
"""

from __future__ import annotations

import argparse
import sys

from histohub.hub._export import export_hf, push


def register(subparsers) -> None:
    """Add the ``export-hf`` and ``push`` sub-commands."""
    export = subparsers.add_parser(
        "export-hf", help="write a model in timm's Hugging Face Hub layout",
        description="Write DIR/config.json, DIR/model.safetensors and DIR/README.md so that "
                    "timm.create_model('local-dir:DIR', pretrained=True) loads the encoder "
                    "with its preprocessing (mean, std, interpolation).")
    export.add_argument("model", metavar="NAME",
                        help="a model name (histohub list) or a local checkpoint path")
    export.add_argument("out_dir", metavar="DIR", help="directory to write (created)")
    export.add_argument("--arch", help="architecture of a local checkpoint (inferred if omitted)")
    export.add_argument("--repo-id", help="Hub repository named in the model card's usage")
    export.add_argument("--overwrite", action="store_true",
                        help="replace DIR if it exists and is not empty")
    export.set_defaults(func=_export)

    push = subparsers.add_parser(
        "push", help="upload a model in timm's layout to the Hugging Face Hub",
        description="Export NAME (or take a directory written by export-hf) and upload it "
                    "to the Hub repository REPO_ID, creating the repository if needed. "
                    "Needs network access and a token (HF_TOKEN or huggingface-cli login).")
    push.add_argument("model", metavar="NAME",
                      help="a model name, a local checkpoint, or an export-hf directory")
    push.add_argument("repo_id", metavar="REPO_ID", help="e.g. my-org/resnet18-ssl")
    push.add_argument("--arch", help="architecture of a local checkpoint (inferred if omitted)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--token", help="Hub token (default: huggingface_hub's own)")
    push.add_argument("--message", help="commit message")
    push.set_defaults(func=_push)


def _export(args: argparse.Namespace) -> int:
    try:
        out = export_hf(args.model, args.out_dir, arch=args.arch, repo_id=args.repo_id,
                        overwrite=args.overwrite)
    except OSError as error:  # an existing DIR, a disk that filled up
        print(f"histohub export-hf: error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _push(args: argparse.Namespace) -> int:
    try:
        commit = push(args.model, args.repo_id, private=args.private, token=args.token,
                      arch=args.arch, commit_message=args.message)
    except OSError as error:  # not an export directory; the Hub's HTTP and auth errors
        print(f"histohub push: error: {error}", file=sys.stderr)
        return 2
    print(getattr(commit, "commit_url", None) or commit)
    return 0
