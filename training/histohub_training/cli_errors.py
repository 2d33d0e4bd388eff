"""How training's scripts report a user's mistake: one ``error: ...`` line, exit code 2.

``run_pretrain.py``, ``run_benchmark.py`` and ``export.py`` share this, so a missing folder
or a bad value reads the same in each. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from histohub.errors import HistohubError

#: What a user's input can cause: histohub's own errors, a path that is missing (or already
#: holds a run), a value out of range. Messages say what to change.
USER_ERRORS = (HistohubError, FileNotFoundError, FileExistsError, ValueError)


def run_reporting_errors(run: Callable[..., int], *args: Any) -> int:
    """``run(*args)``; a :data:`USER_ERRORS` exception is printed as one line on stderr
    and gives exit code 2 (argparse's code for bad usage)."""
    try:
        return run(*args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
