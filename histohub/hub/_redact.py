"""Credentials in URLs, kept out of everything histohub writes or shows.

A source URL may carry credentials (``https://user:password@host/...``): they are used to
connect but never written to a cache record nor shown in a message, log line or progress
bar. Every label, record and message of the hub wing that names a URL passes through
``redact``, defined here once; so do ``Source.describe()`` / ``public_url``, ``export-hf``'s
files (and so ``push``'s upload), the command line's error line, and every log line the
command line writes (``RedactingFilter`` on its handlers, which also keeps each log record
to one line: a newline in a file name cannot forge log lines).
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
