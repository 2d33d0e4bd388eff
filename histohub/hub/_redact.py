"""Credentials never leave the process: the one redaction every printer and writer uses.

A source URL may hold ``user:password@`` (a private mirror); it is used to connect
(``histohub._download``) and nowhere else. What shows or stores a source takes
``Source.public_url`` / ``Source.describe()`` (``redact``ed); logs pass through
``RedactingFilter`` (installed on the command line's handlers); the command line's error
line and ``histohub export-hf``'s files (and so ``histohub push``'s upload) are redacted
as a whole before they are printed or written.

Torch-free and download-free: the manifest readers import it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#@\s]*@")


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it removed."""
    return _USERINFO.sub(r"\1", text)


def redact_all(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings) with every string ``redact``ed."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_all(key): redact_all(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_all(item) for item in value)
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` with control characters (a newline in a file name) escaped as ``\\n``,
    ``\\x1b``, ...: a name cannot start a fake log line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class RedactingFilter(logging.Filter):
    """A handler filter: the record's message, its arguments applied, is ``redact``ed and
    kept to one line (``one_line``; tracebacks are the formatter's, after it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = one_line(redact(message))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
