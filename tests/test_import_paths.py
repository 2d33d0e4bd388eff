"""Nothing in the repository edits ``sys.path``, not even in the code a test or a benchmark
hands to a child process: each module has one importable home. The package imports
itself; ``python benchmarks/<script>.py`` and ``python training/<script>.py`` find their
helpers beside them; pytest gets ``training/`` and ``benchmarks/`` from ``pythonpath`` in
pyproject.toml, and a child process from ``PYTHONPATH`` in its environment."""

from __future__ import annotations

import ast
import textwrap
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("histohub", "tests", "benchmarks", "training")
#: The checks themselves: their examples are what they forbid.
CHECKS = (Path(__file__).resolve(), REPO / "training" / "tests" / "test_training_imports.py")


def sources() -> list[Path]:
    """Every Python file of the repository (the package, tests, benchmarks, training and
    the top-level files), the checks aside."""
    found = sorted(REPO.glob("*.py"))
    for folder in FOLDERS:
        found += sorted(p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)
    return [p for p in found if p not in CHECKS]


def _code_in_string(node: ast.AST) -> ast.AST | None:
    """A string constant or f-string that parses as Python (a child process's ``-c``
    script): its tree, with ``_`` for each f-string field; else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    elif isinstance(node, ast.JoinedStr):
        text = "".join(part.value if isinstance(part, ast.Constant) else "_"
                       for part in node.values)
    else:
        return None
    with warnings.catch_warnings():  # prose parsed as code: invalid escapes and the like
        warnings.simplefilter("ignore")
        try:
            return ast.parse(textwrap.dedent(text))
        except (SyntaxError, ValueError):
            return None


def sys_path_uses(tree: ast.AST) -> list[int]:
    """Lines of ``tree`` that use ``sys.path`` (in code, or in code held in a string)."""
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr == "path"
                and isinstance(node.value, ast.Name) and node.value.id == "sys"):
            lines.append(node.lineno)
        elif (inner := _code_in_string(node)) is not None and sys_path_uses(inner):
            lines.append(node.lineno)
    return sorted(set(lines))


def test_no_file_edits_sys_path():
    files = sources()
    assert {"conftest.py", "hubconf.py"} <= {p.name for p in files}
    assert REPO / "benchmarks" / "bench_slides.py" in files
    found = [f"{p.relative_to(REPO)}:{line}" for p in files
             for line in sys_path_uses(ast.parse(p.read_text(encoding="utf-8"), str(p)))]
    assert found == []


@pytest.mark.parametrize("source, lines", [
    ("import sys\nsys.path.insert(0, 'x')\n", [2]),
    ("from sys import argv\nprint(argv)\n", []),
    ('script = """\n    import sys\n    sys.path.append(\'x\')\n"""\n', [1]),
    ('folder = "t"\nscript = f"""\n    import sys\n    sys.path.insert(0, {folder!r})\n"""\n',
     [2]),
    ('"""Docs may name ``sys.path``: prose is not code."""\n', []),
])
def test_the_check_sees_code_and_scripts_in_strings(source, lines):
    assert sys_path_uses(ast.parse(source)) == lines
