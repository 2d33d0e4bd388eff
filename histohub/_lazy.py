"""Public names served on first use, so that importing a wing does not import torch.

Each ``__init__`` of histohub and of its wings lists its public names in ``__all__``; the
ones whose modules import torch, torchvision or slide libraries are given here as
``name -> module`` and imported when first read (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, names: dict[str, str], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package that serves ``names`` lazily.

    Args:
        package: the package's ``__name__`` (for the error message).
        names: public name -> the module that defines it.
        namespace: the package's ``globals()``; a name read once is cached there.

    Returns:
        ``(__getattr__, __dir__)`` to assign in the package's ``__init__``.
    """
    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
