"""Every ``HISTOHUB_*`` setting, each read by one typed function of this module.

Settings are read from the environment when asked, not at import, so a change made in a
running process (or by a test) is seen by the next call. One parse rule per kind of value
(huggingface_hub's ``constants.py`` is the model, less its read-once-at-import):

- a **number** is a positive, finite decimal (``3600``, ``0.5``, ``4e9``);
- a **switch** is ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``, in any case;
- a **list** is split at its separator, blanks around items and empty items dropped;
- unset or empty (blanks only): the setting's default.

A value outside its kind raises ``OptionError`` in one line naming the setting, the value
and what it takes (exit code 2 from the command line), before anything is read or written.

The settings, their readers and defaults:

- ``HISTOHUB_HOME``: ``histohub_home()``; ``$XDG_CACHE_HOME/histohub``, else
  ``~/.cache/histohub``.
- ``HISTOHUB_MANIFEST``: ``manifest_files()``, a list split at ``os.pathsep``; none.
- ``HISTOHUB_MIRROR``: ``mirror()``; none.
- ``HISTOHUB_OFFLINE``: ``is_offline()``, a switch; off.
- ``HISTOHUB_ACCEPT_SHA256``: ``accepted_sha256s()``, ``FILENAME=SHA256`` pairs split at
  commas or blanks; none.
- ``HISTOHUB_ACCEPT_LICENCES``: ``accepted_licences()``, a list split at commas or blanks;
  none.
- ``HISTOHUB_MAX_DOWNLOAD_BYTES``: ``max_download_bytes()``, a number; 4 GiB.
- ``HISTOHUB_DOWNLOAD_TIMEOUT``: ``download_timeout()``, seconds; 3600.
- ``HISTOHUB_LOCK_TIMEOUT``: ``lock_timeout()``, seconds; the download timeout plus 60.
- ``HISTOHUB_MALLOPT``: ``mallopt_enabled()``, a switch; on.
- ``HISTOHUB_JPEG_TILES``: ``jpeg_tiles_enabled()``, a switch; on.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from histohub.errors import OptionError

DEFAULT_MAX_DOWNLOAD_BYTES = 4 << 30
DEFAULT_DOWNLOAD_TIMEOUT = 3600.0
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- parse rules


def _text(name: str) -> str:
    """The setting's value without surrounding blanks ("" when unset)."""
    return os.environ.get(name, "").strip()


def _bad(name: str, value: str, takes: str) -> OptionError:
    return OptionError(f"{name} takes {takes}, got {value!r}; fix or unset it")


def _number(name: str, default: float) -> float:
    """A positive, finite number, or ``default`` when unset."""
    value = _text(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (number > 0 and math.isfinite(number)):
        raise _bad(name, value, "a positive number")
    return number


def _switch(name: str, default: bool) -> bool:
    """On (1/true/yes/on) or off (0/false/no/off), any case; ``default`` when unset."""
    value = _text(name)
    if not value:
        return default
    if value.lower() in _ON:
        return True
    if value.lower() in _OFF:
        return False
    raise _bad(name, value, "1/true/yes/on or 0/false/no/off")


def _items(name: str, separator: str) -> list[str]:
    """The non-empty items of a list split at the regular expression ``separator``."""
    return [item.strip() for item in re.split(separator, _text(name)) if item.strip()]


# --------------------------------------------------------------------------- settings


def histohub_home() -> Path:
    """``HISTOHUB_HOME``, else ``$XDG_CACHE_HOME/histohub``, else ``~/.cache/histohub``."""
    home = _text("HISTOHUB_HOME")
    if home:
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "histohub"


def manifest_files() -> list[Path]:
    """``HISTOHUB_MANIFEST``: extra manifest files, ``os.pathsep``-separated, in order."""
    return [Path(item).expanduser()
            for item in _items("HISTOHUB_MANIFEST", re.escape(os.pathsep))]


def mirror() -> str | None:
    """``HISTOHUB_MIRROR``: a URL prefix, ``file://`` URL or folder to try first, or None."""
    return _text("HISTOHUB_MIRROR") or None


def is_offline() -> bool:
    """``HISTOHUB_OFFLINE``: True forbids every network access."""
    return _switch("HISTOHUB_OFFLINE", False)


def accepted_sha256s() -> frozenset[tuple[str, str]]:
    """``HISTOHUB_ACCEPT_SHA256``: ``(file name, sha256)`` pairs a maintainer accepted in
    place of reported hashes (``FILENAME=SHA256``, separated by commas or blanks): each holds
    for the file it names only, which alone loses its reported size check."""
    values = _items("HISTOHUB_ACCEPT_SHA256", r"[,\s]+")
    bad = [value for value in values
           if not re.fullmatch(r"[^=/\\]+=[0-9a-f]{64}", value)]
    if bad:
        raise _bad("HISTOHUB_ACCEPT_SHA256", bad[0], "FILENAME=SHA256 pairs (the file's name "
                   "and its full 64-hex lower-case sha256)")
    return frozenset(tuple(value.split("=")) for value in values)


def accepted_licences() -> frozenset[str]:
    """``HISTOHUB_ACCEPT_LICENCES``: model or licence names whose terms the user accepted
    (separated by commas or blanks; compared lower-cased)."""
    return frozenset(item.lower() for item in _items("HISTOHUB_ACCEPT_LICENCES", r"[,\s]+"))


def max_download_bytes() -> int:
    """``HISTOHUB_MAX_DOWNLOAD_BYTES``: the most a file of unknown size may have."""
    return int(_number("HISTOHUB_MAX_DOWNLOAD_BYTES", DEFAULT_MAX_DOWNLOAD_BYTES))


def download_timeout() -> float:
    """``HISTOHUB_DOWNLOAD_TIMEOUT``: seconds all sources of one file may take together."""
    return _number("HISTOHUB_DOWNLOAD_TIMEOUT", DEFAULT_DOWNLOAD_TIMEOUT)


def lock_timeout() -> float:
    """``HISTOHUB_LOCK_TIMEOUT``: seconds to wait for another process's download."""
    return _number("HISTOHUB_LOCK_TIMEOUT", download_timeout() + 60.0)


def mallopt_enabled() -> bool:
    """``HISTOHUB_MALLOPT``: whether ``tune_allocator`` may tune glibc malloc."""
    return _switch("HISTOHUB_MALLOPT", True)


def jpeg_tiles_enabled() -> bool:
    """``HISTOHUB_JPEG_TILES``: whether JPEG tiles are decoded straight from the file."""
    return _switch("HISTOHUB_JPEG_TILES", True)
