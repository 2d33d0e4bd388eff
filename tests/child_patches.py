"""Patches that reach every Python process of a command under test (the command, the child
``histohub extract`` spawns, its DataLoader workers): a ``sitecustomize`` module on the
``PYTHONPATH`` of a subprocess, which each interpreter imports as it starts."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def patched_env(folder: Path, code: str) -> dict[str, str]:
    """The environment for a subprocess whose every interpreter runs ``code`` first."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code, encoding="utf-8")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), str(ROOT)]))
