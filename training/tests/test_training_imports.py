"""The contract between training/ and histohub: training imports histohub only through its
public names (``histohub.__all__`` and each wing's ``__all__``, never a ``_private``
module), and
nothing under training/ edits ``sys.path``: scripts run as ``python training/<script>.py``
import ``simclr``, ``downstream`` and ``cli_errors`` from their own folder, the tests get
the same root from pytest's ``pythonpath``. A refactor inside histohub cannot break training
silently, and there is one way to import each training module."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest


TRAINING = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for p in TRAINING.rglob("*.py") if "__pycache__" not in p.parts)


def _histohub_imports(tree: ast.AST) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every import of histohub or one of its modules."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names
                      if a.name.split(".")[0] == "histohub"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "histohub":
            found.append((node.lineno, node.module, [a.name for a in node.names]))
    return found


def _private_uses(source: str, label: str) -> list[str]:
    problems = []
    for line, module, names in _histohub_imports(ast.parse(source, label)):
        where = f"{label}:{line}"
        if any(part.startswith("_") for part in module.split(".")):
            problems.append(f"{where} imports the private module {module}")
            continue
        public = getattr(importlib.import_module(module), "__all__", None)
        if public is None:
            problems.append(f"{where} imports {module}, which states no public names")
            continue
        problems += [f"{where} imports {module}.{n}, which is not in {module}.__all__"
                     for n in names if n not in public]
    return problems


def _sys_path_uses(source: str, label: str) -> list[str]:
    return [f"{label}:{node.lineno}" for node in ast.walk(ast.parse(source, label))
            if isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys"]


def _sources() -> list[tuple[str, str]]:
    """``(text, path relative to the repository)`` of every Python file under training/."""
    return [(p.read_text(encoding="utf-8"), str(p.relative_to(TRAINING.parent)))
            for p in SOURCES]


def test_training_uses_only_public_histohub_names():
    assert SOURCES, TRAINING
    assert [p for source in _sources() for p in _private_uses(*source)] == []


def test_no_sys_path_edits_under_training():
    assert [p for source in _sources() for p in _sys_path_uses(*source)] == []


@pytest.mark.parametrize("source, problem", [
    ("from histohub.hub._registry import parse_entry", "private module histohub.hub._registry"),
    ("import histohub.hub._fetch", "private module histohub.hub._fetch"),
    ("from histohub import _manifest", "not in histohub.__all__"),
    ("from histohub.slides._reader import _level_for", "private module histohub.slides._reader"),
    ("from histohub.slides import _level_for", "not in histohub.slides.__all__"),
])
def test_the_checks_catch_what_they_forbid(source, problem):
    assert problem in " ".join(_private_uses(f"def f():\n    {source}\n", "x.py"))
    assert _sys_path_uses("import sys\nsys.path.insert(0, 'x')\n", "x.py") == ["x.py:2"]
    assert _private_uses("from histohub.hub import read_checkpoint\n", "x.py") == []
