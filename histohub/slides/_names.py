"""A slide is the name the user gave it, not the file a link leads to.

Cohorts are often linked into a project folder, and pseudonymised that way: links named by
study ID point at files named by the scanner or by patient. So outputs, logs, previews and
the ``slide_path`` / ``slide_name`` attributes of a feature file use the path the user gave,
made absolute without following links (``given_path``); the file behind it is identified
only by its content (``wsi.slide_fingerprint``, what "already done" compares), and its
resolved path is recorded only when asked (``resolved_path``, ``--record-resolved-path``).

- ``given_path(path)``: the path as given, absolute, links not followed.
- ``broken_link(path)``: a one-line message for a link that leads to no file, else None
  (it names the link, never its target, which may identify a patient).
- ``find_in_folder(folder, suffixes)``: slide files at any depth, linked folders followed
  (a link back to a folder above is reported, not followed), broken links reported.
- ``same_files(paths)``: the groups of given paths that are one file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def given_path(path: str | os.PathLike) -> Path:
    """``path`` made absolute without following links: a link keeps its own name and folder.

    ``..`` is removed by name (``os.path.abspath``) unless that would name another file than
    the one the system opens (``..`` after a linked folder); then it is kept.

    Args:
        path: a slide path as the user gave it (relative to the current folder, ``~``).

    Returns:
        The absolute path, whose ``name`` and ``stem`` are the ones the user gave.
    """
    raw = Path(os.fspath(path)).expanduser()
    lexical = Path(os.path.abspath(raw))
    if ".." in raw.parts and os.path.realpath(lexical) != os.path.realpath(raw):
        return raw.absolute()
    return lexical


def resolved_path(path: str | os.PathLike) -> str:
    """The file ``path`` leads to, every link followed (recorded only when asked for)."""
    return os.path.realpath(path)


def broken_link(path: str | os.PathLike) -> str | None:
    """A one-line message when ``path`` is a link that leads to no file (its target is
    missing, or links form a loop); None otherwise. The target is not named: it may be the
    identifying name the link hides."""
    if os.path.islink(path) and not os.path.exists(path):
        return (f"{path}: a symbolic link that leads to no file (its target is missing, or the "
                "links form a loop); fix or remove the link")
    return None


def find_in_folder(folder: Path, suffixes: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Files ending in one of ``suffixes`` (lower case) under ``folder``, at any depth.

    Linked folders are searched too (a folder linked into a project folder holds slides
    like any other), each by its given path; a link back to a folder above it is reported
    and not searched again (a warning). A broken link with a slide suffix is reported, never
    dropped.

    Args:
        folder: the folder the user gave.
        suffixes: file name endings to keep, lower case with the dot (``".svs"``).

    Returns:
        ``(files sorted by path, problems)``.
    """
    suffixes = tuple(suffixes)
    found: list[Path] = []
    problems: list[str] = []
    _walk(folder, suffixes, frozenset(), found, problems)
    return sorted(found), problems


def _walk(folder: Path, suffixes: tuple[str, ...], above: frozenset, found: list[Path],
          problems: list[str]) -> None:
    try:
        info = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as error:
        problems.append(f"{folder}: cannot be searched ({error.strerror or error})")
        return
    key = (info.st_dev, info.st_ino)
    if key in above:
        log.warning("%s: a link back to a folder above it; not searched again", folder)
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir():  # linked folders included
            _walk(path, suffixes, above | {key}, found, problems)
        elif path.suffix.lower() in suffixes:
            if entry.is_file():
                found.append(path)
            elif problem := broken_link(path):
                problems.append(problem)


def same_files(paths: Iterable[Path]) -> list[list[Path]]:
    """The groups (two or more, in the given order) of ``paths`` that are one file on disk,
    e.g. several links to one slide. Paths that cannot be read are left out."""
    groups: dict[tuple[int, int], list[Path]] = {}
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue
        groups.setdefault((info.st_dev, info.st_ino), []).append(path)
    return [group for group in groups.values() if len(group) > 1]


def slide_lines(results: Iterable) -> list[str]:
    """One line per slide done (``SlideResult``s without error): ``extracted`` or
    ``already done``, the given path and its output, for a run's summary."""
    return [f"{'already done' if r.skipped else 'extracted'}: {r.slide_path} -> {r.output}"
            for r in results]
