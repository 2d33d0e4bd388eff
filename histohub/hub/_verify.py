"""What a weights file must match, and the check of a copy against it.

What a file must match, strongest first: the manifest's ``sha256``/``size`` (verified by
``histohub pin``); a hash accepted with ``HISTOHUB_ACCEPT_SHA256`` and remembered in the
cache record; the manifest's ``reported`` sha256/size (published by others, not verified by
histohub: enforced the same way, and a mismatch says so); the hash recorded on the first
download (trust on first use, with a warning). A download whose hash differs from a
*reported* one is refused, since it may be a proxy's or mirror's answer or a changed
release; whoever has checked the new file by other means accepts exactly that file with
``HISTOHUB_ACCEPT_SHA256=<file name>=<its sha256>`` (comma-separated for several; each
holds for the file it names only), and a maintainer
then runs ``histohub pin NAME`` with the same setting to write it into the manifest as
verified. A file with no hash to check must at least be of its declared format before its
hash is trusted on first use (``check_looks_like``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from histohub._env import accepted_sha256s
from histohub.errors import DownloadError
from histohub.hub._schema import WeightsFile

#: Bytes read at a time when hashing or copying a file.
CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchedFile:
    """A verified local copy of one of an entry's weights files; ``trust`` says what it
    was verified against: ``"verified"``, ``"accepted"``, ``"reported"`` or ``"first use"``."""

    path: Path
    file: WeightsFile
    sha256: str
    trust: str = "first use"


def sha256_file(path: str | os.PathLike, *, chunk_size: int = CHUNK) -> str:
    """Full hex sha256 of a file, read in chunks (never whole into memory).

    Args:
        path: the file.
        chunk_size: bytes read at a time.

    Returns:
        The 64-hex lower-case sha256 of the file's bytes.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Expected:
    """What a copy of a file must be: ``sha256`` and ``size`` (None: anything), where they
    come from (``kind``), and hashes accepted instead by HISTOHUB_ACCEPT_SHA256."""

    sha256: str | None
    size: int | None
    kind: str  # "verified", "accepted", "reported", "first use" or "none"
    accepted: frozenset[str] = frozenset()

    def allows(self, digest: str, size: int) -> bool:
        if digest in self.accepted:
            return True
        return (self.sha256 in (None, digest)) and (self.size in (None, size))

    def trust(self, digest: str) -> str:
        """What a copy with ``digest`` that ``allows`` accepted is trusted as."""
        if digest in self.accepted and digest != self.sha256:
            return "accepted"
        return "first use" if self.kind == "none" else self.kind


def expected_for(file: WeightsFile, record: dict | None) -> Expected:
    """The strongest expectation for ``file``, given its cache record (see the module doc)."""
    if file.sha256 is not None:
        return Expected(file.sha256, file.size, "verified")
    accepted = frozenset(sha for name, sha in accepted_sha256s() if name == file.filename)
    size = None if accepted else file.expected_size  # an accepted file may differ in size
    if record is not None and record.get("expected_from") == "accepted":
        return Expected(record["sha256"], None, "accepted", accepted)
    if file.expected_sha256 is not None:
        return Expected(file.expected_sha256, size, "reported", accepted)
    if record is not None:
        return Expected(record["sha256"], size, "first use", accepted)
    return Expected(None, size, "none", accepted)


def mismatch(file: WeightsFile, expected: Expected, digest: str, size: int, *,
             record: Path, name: str | None = None) -> str | None:
    """Why (digest, size) is not ``file`` and what to do, or None when it is.

    ``record``: the file's cache record (named in the advice); ``name``: the model name.
    """
    if expected.allows(digest, size):
        return None
    want = f"sha256 {expected.sha256}" if expected.sha256 else "any sha256"
    if expected.size is not None:
        want += f", {expected.size} bytes"
    origin = {
        "verified": "verified by `histohub pin` (the manifest's sha256 and size)",
        "accepted": f"accepted earlier with HISTOHUB_ACCEPT_SHA256 and remembered in {record} "
                    "(delete that file to return to the manifest's values)",
        "reported": "reported, not verified by histohub: "
                    + (file.reported.note if file.reported else ""),
        "first use": f"the hash recorded on first download in {record} (delete that file if "
                     "the upstream file legitimately changed)",
        "none": "the size the manifest reports",
    }[expected.kind]
    text = f"expected {want} ({origin}); got sha256 {digest}, {size} bytes."
    if expected.kind == "reported":
        text += (" Either this copy is not the upstream file (a proxy's or a mirror's answer, "
                 "a changed release) or the report is wrong. If you have checked this file "
                 "by other means, accept exactly it with "
                 f"HISTOHUB_ACCEPT_SHA256={file.filename}={digest} "
                 "(remembered by the cache); maintainers then run `histohub pin "
                 f"{name or 'NAME'}` with that setting to record it as verified.")
    return text


def check_looks_like(file: WeightsFile, part: Path, label: str) -> None:
    """Refuse (and delete) a download that is not even of the declared format: an
    unpinned file would otherwise have an error page's hash recorded as its own."""
    from histohub.errors import CheckpointError
    from histohub.hub._checkpoint import sniff_format

    try:
        found = sniff_format(part)
    except CheckpointError:
        found = None
    if found != ("safetensors" if file.format == "safetensors" else "torch"):
        with open(part, "rb") as handle:
            head = handle.read(16)
        part.unlink(missing_ok=True)
        raise DownloadError(f"{file.filename} from {label} is not a {file.format} file "
                            f"(it starts with {head!r}: an error or login page?); deleted, "
                            "nothing recorded")
