"""The layering contract of docs/architecture.md, checked on the source tree.

Every import of every module under ``histohub/`` is read with ``ast``: module-level and
function-level ``import`` statements, the modules named by constant strings in
``importlib.import_module(...)`` and ``histohub.errors.require(...)`` (how histohub imports
optional dependencies), and any string that is a histohub module's name (the CLI's
command list, the package's lazy names; not the bare ``"histohub"``, which names a cache
folder and a user agent). Relative imports are resolved; imports under ``if TYPE_CHECKING:``
never run and are left out. A rule is broken when a module,
or any histohub module it imports in turn, imports a forbidden one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "histohub"

#: Each rule: every module of a wing (a package, and everything under it) -> what it must
#: never import, directly or through other histohub modules.
TRAINING = ("training", "histohub_training")
SLIDE_LIBRARIES = ("openslide", "tifffile", "imagecodecs", "h5py")
NETWORK = ("requests", "huggingface_hub", "urllib3", "filelock")
#: The download modules (fetching, cache, verification, sources, HTTP, Hugging Face). Not
#: ``_redact``: a pure function on text, which the schema's ``Source.describe()`` uses.
DOWNLOADS = ("histohub.hub._fetch", "histohub.hub._cache", "histohub.hub._verify",
             "histohub.hub._sources", "histohub.hub._http", "histohub.hub._hf")
ABOVE_THE_WINGS = ("histohub.cli",)
RULES = {
    # histohub never imports training/.
    "histohub": TRAINING,
    # Models never import slides: name -> weights -> encoder works without slide libraries.
    "histohub.hub": ("histohub.slides", "histohub.featurefile", "histohub.cluster",
                     "histohub._features", *ABOVE_THE_WINGS, *SLIDE_LIBRARIES),
    # The feature-file layout is read (by clustering, by other tools) without models or slides.
    "histohub.featurefile": ("histohub.hub", "histohub.slides", "histohub.cluster",
                             "histohub._features", *ABOVE_THE_WINGS, "torch"),
    "histohub.slides": ("histohub.cluster", *ABOVE_THE_WINGS),
    "histohub.cluster": ("histohub.hub", "histohub._features", *ABOVE_THE_WINGS, "torch"),
    # Every extraction option's rule, read by the command line's --help: no wing, no torch.
    "histohub._options": ("histohub.hub", "histohub.slides", "histohub.featurefile",
                          "histohub.cluster", "histohub._features", *ABOVE_THE_WINGS, "torch"),
    "histohub._features": ("histohub.cluster", "histohub.featurefile", *ABOVE_THE_WINGS),
    # The manifest and checkpoint readers never import download code: reading a manifest or a
    # checkpoint works offline and without network libraries.
    "histohub.hub._schema": (*DOWNLOADS, *NETWORK),
    "histohub.hub._parse": (*DOWNLOADS, *NETWORK),
    "histohub.hub._registry": (*DOWNLOADS, *NETWORK),
    "histohub.hub._checkpoint": (*DOWNLOADS, *NETWORK),
    # Name or file, and what is known of the model, is decided without fetching anything.
    "histohub.hub._descriptor": (*DOWNLOADS, *NETWORK),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return name
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:``: imports for type checkers only, never run."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
        and node.test.id == "TYPE_CHECKING"


@cache
def direct_imports(module: str) -> frozenset[str]:
    """Every module ``module`` names in an import (``from a import b``: ``a`` and ``a.b``)."""
    path = modules()[module]
    is_package = path.name == "__init__.py"
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block)
                   for statement in block.body for n in ast.walk(statement)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, module, is_package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "require", "__import__")):
            found.add(node.args[0].value)
        elif isinstance(node, ast.Constant) and node.value in modules() \
                and node.value != "histohub":  # the bare name is a folder, a user agent
            found.add(node.value)  # a module imported by name (CLI commands, lazy names)
    return frozenset(found)


def reachable(module: str) -> dict[str, str]:
    """Every module imported from ``module`` on, directly or through histohub modules:
    ``{imported: the histohub module that imports it}``."""
    seen: dict[str, str] = {}
    stack = [module]
    while stack:
        current = stack.pop()
        for name in direct_imports(current):
            if name in seen:
                continue
            seen[name] = current
            if name in modules():
                stack.append(name)
    return seen


def _forbidden(name: str, banned: tuple[str, ...]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in banned)


def test_the_scan_sees_function_level_and_optional_imports():
    """The contract is only as good as the scan: it must see what histohub really imports."""
    assert "histohub.hub._fetch" in direct_imports("histohub.hub._pretrained")
    assert "openslide" in direct_imports("histohub.slides._reader")  # require("openslide", ...)
    assert "torchvision" in direct_imports("histohub.hub._archs")  # inside build_encoder
    assert "histohub.cli._models" in direct_imports("histohub.cli")  # import_module(...)


@pytest.mark.parametrize("importer", sorted(RULES))
def test_layering(importer):
    banned = RULES[importer]
    scope = [m for m in modules() if m == importer or m.startswith(importer + ".")]
    broken = sorted(f"{name} (imported by {via})" for module in scope
                    for name, via in reachable(module).items() if _forbidden(name, banned))
    assert not broken, f"{importer} must not import {', '.join(banned)}: {'; '.join(broken)}"


def test_import_histohub_leaves_torch_unimported():
    """``import histohub`` reads the manifest only; torch comes with the first name that
    needs it (``histohub list`` and ``--help`` answer without it: benchmarks/bench_cli.py)."""
    code = ("import sys, histohub; histohub.list_models(); histohub.get_entry('resnet18-ssl'); "
            "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["extract", "--help"]])
def test_cli_answers_help_and_list_without_torch(argv):
    """The command line builds every subcommand's parser without importing torch."""
    code = ("import sys, contextlib, io\nfrom histohub.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(sys.argv[1:])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stderr


def _module_graph() -> dict[str, set[str]]:
    """Module -> the histohub modules (not packages) it imports, anywhere in its code."""
    names = {m for m, path in modules().items() if path.name != "__init__.py"}
    return {m: {n for n in direct_imports(m) if n in names and n != m} for m in names}


def test_no_import_cycle():
    """No module imports, directly or in turn, one that imports it (function-level imports
    included: a cycle hidden in a function is still a knot to untie when reading)."""
    graph = _module_graph()
    cycles = sorted({" -> ".join((m, *path)) for m in graph
                     for path in _paths_back(graph, m)})
    assert not cycles, cycles


def _paths_back(graph: dict[str, set[str]], start: str) -> list[tuple[str, ...]]:
    """Paths from ``start`` that lead back to it (one per first step, depth-first)."""
    found, seen = [], set()
    stack = [(start, ())]
    while stack:
        current, path = stack.pop()
        for nxt in graph[current]:
            if nxt == start:
                found.append((*path, nxt))
            elif nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, (*path, nxt)))
    return found


def test_no_module_is_longer_than_450_lines():
    long = {m: n for m, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 450}
    assert not long, long
