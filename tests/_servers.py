"""Loopback HTTP servers and manifest builders for the download tests (no internet).

``FileServer`` serves bytes by path, supports HTTP Range, and can misbehave on demand
(drop the connection half-way, answer 5xx, ignore Range, serve slowly or byte by byte,
announce a wrong Content-Length or none); it logs every request and how many body bytes
each GET got out before the client hung up. ``HubServer`` answers the Hugging Face Hub's
file endpoints (``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``) with the headers
``huggingface_hub.file_download.get_hf_file_metadata`` reads: ``X-Repo-Commit``,
``ETag`` and ``Content-Length``, plus ``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class _Faults:
    statuses: list[int] = field(default_factory=list)  # answered (in order) before serving
    drops: list[int] = field(default_factory=list)  # body bytes sent before dropping, per GET


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving ``files`` ({"/path": bytes})."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.requests: list[Request] = []
        self.ranges = True  # honour Range headers (206); False answers 200 with everything
        self.chunk_delay = 0.0  # seconds between chunks (to make downloads overlap, or trickle)
        self.step = 1 << 16  # body bytes per chunk
        self.lengths: dict[str, int | None] = {}  # announced Content-Length by path; None: omit
        self.sent: list[int] = []  # body bytes written per GET, in order
        self.faults = _Faults()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def gets(self, path: str | None = None) -> list[Request]:
        """The GET requests received (for ``path`` only, when given)."""
        return [r for r in self.requests if r.method == "GET" and path in (None, r.path)]

    def wait_sent(self, count: int = 1, timeout: float = 10.0) -> list[int]:
        """``sent`` once ``count`` GETs have finished writing (a server thread notices a
        client that hung up only when its next write fails)."""
        end = time.monotonic() + timeout
        while len(self.sent) < count and time.monotonic() < end:
            time.sleep(0.01)
        return list(self.sent)

    def fail_next(self, *statuses: int) -> None:
        """Answer the next requests with these HTTP statuses, in order."""
        self.faults.statuses.extend(statuses)

    def drop_next(self, *after_bytes: int) -> None:
        """Close the connection of the next GETs after this many body bytes each."""
        self.faults.drops.extend(after_bytes)

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ serving

    def _log(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(Request(handler.command, handler.path, dict(handler.headers)))

    def _take(self, queue: list[int]) -> int | None:
        with self._lock:
            return queue.pop(0) if queue else None

    def _lookup(self, path: str) -> tuple[bytes, dict[str, str]] | None:
        """(body, extra headers) for ``path``, or None for a 404."""
        data = self.files.get(path)
        return None if data is None else (data, {})

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, *, body: bool) -> None:
                server._log(self)
                status = server._take(server.faults.statuses)
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                found = server._lookup(self.path.split("?")[0])
                if found is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, extra = found
                start = _range_start(self.headers.get("Range")) if server.ranges else None
                if start is not None and start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if start is not None:
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                    data = data[start:]
                else:
                    self.send_response(200)
                length = server.lengths.get(self.path.split("?")[0], len(data))
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes" if server.ranges else "none")
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self._body(data, server._take(server.faults.drops))

            def _body(self, data: bytes, drop_after: int | None) -> None:
                limit = len(data) if drop_after is None else min(drop_after, len(data))
                step, sent = server.step, 0
                try:
                    for offset in range(0, limit, step):
                        self.wfile.write(data[offset:min(offset + step, limit)])
                        self.wfile.flush()
                        sent = min(offset + step, limit)
                        if server.chunk_delay:
                            time.sleep(server.chunk_delay)
                except (BrokenPipeError, ConnectionResetError):  # the client hung up
                    self.close_connection = True
                    return
                finally:
                    with server._lock:
                        server.sent.append(sent)
                if drop_after is not None:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True

        return Handler


class HubServer(FileServer):
    """Answers ``/{repo_id}/resolve/{revision}/{filename}`` like the Hugging Face Hub.

    ``add(repo_id, revision, filename, data, lfs=True)``; LFS files are announced with
    ``X-Linked-Etag`` (their sha256) and ``X-Linked-Size``, as the Hub does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.repo_files: dict[tuple[str, str, str], tuple[bytes, bool]] = {}

    def add(self, repo_id: str, revision: str, filename: str, data: bytes, *,
            lfs: bool = True) -> None:
        self.repo_files[(repo_id, revision, filename)] = (data, lfs)

    def _lookup(self, path: str):
        match = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if match is None or (match["repo"], match["rev"], match["file"]) not in self.repo_files:
            return None
        data, lfs = self.repo_files[(match["repo"], match["rev"], match["file"])]
        headers = {"X-Repo-Commit": match["rev"]}
        if lfs:
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                            "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{hashlib.sha1(data).hexdigest()}"'
        return data, headers


def _range_start(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes=(\d+)-", value or "")
    return int(match.group(1)) if match else None


def fetch_in_subprocess(barrier, name: str, results) -> None:
    """Worker for the two-processes test: wait for the sibling, then fetch ``name``.

    Runs in a spawned interpreter; the environment (HISTOHUB_HOME, HISTOHUB_MANIFEST)
    is inherited from the test.
    """
    from histohub.hub._fetch import fetch_weights
    from histohub.hub._registry import get_entry

    entry = get_entry(name)
    barrier.wait(timeout=60)
    fetched = fetch_weights(entry, progress=False)
    results.put((str(fetched.path), fetched.sha256, hashlib.sha256(
        fetched.path.read_bytes()).hexdigest()))


# --------------------------------------------------------------------------- manifests


def weights_file(filename: str, sources: list[dict], *, data: bytes | None = None,
                 format: str = "torch", reported: dict | None = None,
                 fingerprint: dict | None = None) -> dict:
    """A manifest ``weights`` item; pinned (sha256 + size of ``data``) when data is given;
    ``reported`` and ``fingerprint`` are added as given."""
    item = {
        "filename": filename, "format": format,
        "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
        "size": len(data) if data is not None else None,
        "sources": sources,
        "key_map": {"state_dict_key": "state_dict",
                    "strip_prefixes": ["model.resnet.", "model.", "resnet."],
                    "drop": ["^fc\\."]},
    }
    if reported is not None:
        item["reported"] = reported
    if fingerprint is not None:
        item["fingerprint"] = fingerprint
    return item


def model_entry(files: list[dict]) -> dict:
    return {
        "description": "A test ResNet18 with random weights.",
        "arch": "resnet18", "feature_dim": 512, "weights": files,
        "preprocessing": {"input_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                          "interpolation": "bilinear", "mpp": 0.5, "mpp_note": "test"},
        "license": "MIT", "citation": "Test citation (2024).", "recipe": {"method": "none"},
        "training_data": "none", "metrics": {},
    }


def serve_non_commercial(file_server, folder, name: str, *, seed: int = 0):
    """A non-commercial ResNet18 (CC-BY-NC-4.0, random weights of ``seed``, unpinned) served
    as ``{name}.pt`` by ``file_server``, in an extra manifest written to
    ``folder/{name}_manifest.json``, which is returned (set it as ``HISTOHUB_MANIFEST``)."""
    import json

    import torch
    from checkpoints import encoder_state

    weights = folder / f"{name}.pt"
    torch.save(encoder_state("resnet18", seed=seed), weights)
    file_server.files[f"/{name}.pt"] = weights.read_bytes()
    entry = model_entry([{
        "filename": f"{name}.pt", "format": "torch", "sha256": None, "size": None,
        "sources": [{"url": f"{file_server.url}/{name}.pt"}],
        "key_map": {"state_dict_key": None, "strip_prefixes": [], "drop": []}}])
    entry.update(license="CC-BY-NC-4.0", commercial=False, gated=False,
                 license_url="https://example.org/licence")
    manifest = folder / f"{name}_manifest.json"
    manifest.write_text(json.dumps({"schema_version": 1, "models": {name: entry}}))
    return manifest
