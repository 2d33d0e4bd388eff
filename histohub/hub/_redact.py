"""Credentials in URLs, kept out of everything histohub writes or shows.

A source URL may carry credentials (``https://user:password@host/...``): they are used to
connect but never written to a cache record nor shown in a message, log line or progress
bar. Every label, record and message of the hub wing that names a URL passes through
``redact``, defined here once.
"""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#@\s]*@")


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it removed."""
    return _USERINFO.sub(r"\1", text)
