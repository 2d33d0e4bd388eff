"""histohub's version, in a module of its own: ``pyproject.toml`` reads it from here, and
modules that record it (feature files, exports) import it without touching ``histohub``."""

__version__ = "0.1.0"
