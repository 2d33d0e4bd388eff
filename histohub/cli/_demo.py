"""``histohub demo-slide PATH``: a small synthetic slide to try ``histohub extract`` on.

A new machine has no slides; this writes one (4,096 x 3,072 px at 0.5 um/px, three sections
of H&E-coloured texture, about 4 MB) so that the README's main job runs right after the
install. It is not tissue: point ``histohub extract`` at your own slides for features.
"""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> None:
    """Add the ``demo-slide`` sub-command."""
    demo = subparsers.add_parser(
        "demo-slide", help="write a small synthetic slide to try 'histohub extract' on",
        description="Write a synthetic pyramidal TIFF (three H&E-coloured sections on glass, "
                    "0.5 um/px) to PATH. It shows the pipeline working; it is not tissue.")
    demo.add_argument("path", metavar="PATH", help="file to write, e.g. demo.tiff")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from histohub.errors import require

    require("tifffile", extra="wsi", purpose="writing a slide")
    from histohub.files import atomic_path
    from histohub.slides._synthetic import write_demo_slide

    if os.path.lexists(args.path):
        print(f"histohub demo-slide: error: {args.path} exists; give a new file name",
              file=sys.stderr)
        return 2
    with atomic_path(args.path) as part:
        write_demo_slide(part)
    print(args.path)
    return 0
