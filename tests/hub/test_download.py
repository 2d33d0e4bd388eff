"""Download and cache (issue 2, part 4), against HTTP servers on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from _servers import fetch_in_subprocess, weights_file

import histohub
from histohub import _env
from histohub.hub import _cache, _fetch, _schema
from histohub.hub._registry import get_entry
from histohub.errors import (CheckpointError, ChecksumError, DownloadError, FingerprintError,
                             LockTimeoutError, OfflineError)

NAME = "test-model"
# Stands in for a checkpoint where only the bytes matter (starts like a torch zip file).
PAYLOAD = b"PK\x03\x04" + os.urandom(300_000)
OTHER = PAYLOAD[:-10] + b"other file"  # same size, other bytes


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry_with(make_manifest, *files: dict, name: str = NAME):
    make_manifest({name: list(files)})
    return get_entry(name)


def _cache_files() -> list[str]:
    """Names of every file anywhere under the weights cache."""
    folder = _cache.weights_dir()
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _range_start(request) -> int:
    value = request.headers["Range"]
    assert value.startswith("bytes=") and value.endswith("-"), value
    return int(value[len("bytes="):-1])


def _served(server, path: str, data: bytes) -> str:
    server.files[path] = data
    return server.url + path


# --------------------------------------------------------------------------- good downloads


def test_good_download_gives_torchvision_features(file_server, make_manifest, lightning_ckpt,
                                                  torchvision_features):
    data = lightning_ckpt.read_bytes()
    url = _served(file_server, "/tenpercent/tenpercent_resnet18.ckpt", data)
    entry = _entry_with(make_manifest, weights_file("tenpercent_resnet18.ckpt", [{"url": url}],
                                                    data=data, format="lightning"))

    model = histohub.load_pretrained(NAME, progress=False)

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), torchvision_features(x), rtol=0, atol=0)
    assert not model.training
    assert model.histohub_info.sha256 == hashlib.sha256(data).hexdigest()
    cached = _cache.cached_path(entry.weights[0])
    assert cached.parent.parent == _cache.weights_dir()
    assert Path(model.histohub_info.weights_path) == cached
    assert cached.read_bytes() == data
    assert len(file_server.gets()) == 1
    assert not [n for n in _cache_files() if n.endswith((".part", ".tmp"))]


def test_fallback_file_in_legacy_format_when_first_file_is_missing(
        file_server, make_manifest, legacy_ckpt, torchvision_features):
    """The first file 404s; the second (a 2020-era legacy-format Lightning file) loads."""
    data = legacy_ckpt.read_bytes()
    legacy = _served(file_server, "/1/_ckpt_epoch_9.ckpt", data)
    _entry_with(make_manifest,
                weights_file("native.ckpt", [{"url": file_server.url + "/missing/native.ckpt"}],
                             data=b"never served"),
                weights_file("_ckpt_epoch_9.ckpt", [{"url": legacy}], data=data,
                             format="lightning"))

    model = histohub.load_pretrained(NAME, progress=False)

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torchvision_features(x), rtol=0, atol=0)
    assert [r.path for r in file_server.gets()] == ["/missing/native.ckpt", "/1/_ckpt_epoch_9.ckpt"]


def test_lightning_file_with_attribute_dict_hyper_parameters(
        file_server, make_manifest, attribute_dict_ckpt, torchvision_features):
    data = attribute_dict_ckpt.read_bytes()
    url = _served(file_server, "/tenpercent/tenpercent_resnet18.ckpt", data)
    _entry_with(make_manifest, weights_file("tenpercent_resnet18.ckpt", [{"url": url}],
                                            data=data, format="lightning"))

    model = histohub.load_pretrained(NAME, progress=False)

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torchvision_features(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- integrity


def test_corrupted_download_raises_with_both_hashes_and_leaves_cache_clean(
        file_server, make_manifest):
    bad = bytearray(PAYLOAD)
    bad[1000] ^= 0xFF
    url = _served(file_server, "/w/model.bin", bytes(bad))
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))

    with pytest.raises(ChecksumError) as caught:
        _fetch.fetch_weights(entry, progress=False)

    message = str(caught.value)
    assert hashlib.sha256(PAYLOAD).hexdigest() in message
    assert hashlib.sha256(bytes(bad)).hexdigest() in message
    assert isinstance(caught.value, ValueError)
    assert [n for n in _cache_files() if not n.endswith(".lock")] == []


def test_valid_cache_hit_makes_no_request_and_does_not_rehash(file_server, make_manifest,
                                                              monkeypatch):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    first = _fetch.fetch_weights(entry, progress=False)
    requests_before = len(file_server.requests)

    def no_hashing(path, **kwargs):
        raise AssertionError("a warm cache hit must not re-hash the file")

    monkeypatch.setattr(_cache, "sha256_file", no_hashing)  # where cache hits hash
    second = _fetch.fetch_weights(entry, progress=False)

    assert second == first
    assert len(file_server.requests) == requests_before


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["changed", "mtime-restored"])
def test_corrupted_cache_file_is_detected_and_fetched_again(file_server, make_manifest,
                                                             keep_mtime):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    path = _fetch.fetch_weights(entry, progress=False).path
    stat = path.stat()
    with open(path, "r+b") as handle:  # same size, one byte changed in place
        handle.seek(5000)
        handle.write(bytes([PAYLOAD[5000] ^ 0xFF]))
    if keep_mtime:  # ctime still moves, so the record no longer matches
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    fetched = _fetch.fetch_weights(entry, progress=False)

    assert fetched.path.read_bytes() == PAYLOAD
    assert len(file_server.gets()) == 2


def test_truncated_cached_checkpoint_is_fetched_again_when_pinned(
        file_server, make_manifest, lightning_ckpt, torchvision_features):
    data = lightning_ckpt.read_bytes()
    url = _served(file_server, "/t/tenpercent_resnet18.ckpt", data)
    entry = _entry_with(make_manifest, weights_file("tenpercent_resnet18.ckpt", [{"url": url}],
                                                    data=data, format="lightning"))
    cached = _cache.cached_path(entry.weights[0])
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data[: len(data) // 2])

    model = histohub.load_pretrained(NAME, progress=False)

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torchvision_features(x), rtol=0, atol=0)
    assert cached.read_bytes() == data


def test_unpinned_truncated_checkpoint_gives_checkpoint_error_not_half_a_model(
        file_server, make_manifest, lightning_ckpt):
    """No hash to check against: the loader must still refuse the broken file clearly."""
    data = lightning_ckpt.read_bytes()
    url = _served(file_server, "/t/tenpercent_resnet18.ckpt", data[: len(data) // 3])
    _entry_with(make_manifest, weights_file("tenpercent_resnet18.ckpt", [{"url": url}],
                                            format="lightning"))

    with pytest.raises(CheckpointError, match="truncated"):
        histohub.load_pretrained(NAME, progress=False)


def test_unpinned_entry_records_hash_warns_once_and_rejects_tampering(
        file_server, make_manifest, caplog):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}]))
    digest = hashlib.sha256(PAYLOAD).hexdigest()

    with caplog.at_level(logging.WARNING, logger="histohub.hub._fetch"):
        first = _fetch.fetch_weights(entry, progress=False)
        _fetch.fetch_weights(entry, progress=False)
    warnings = [r for r in caplog.records if "no sha256 pinned" in r.getMessage()]
    assert len(warnings) == 1 and f"histohub pin {NAME}" in warnings[0].getMessage()
    record = json.loads((first.path.parent / "model.bin.json").read_text())
    assert (record["sha256"], record["size"], record["pinned"]) == (digest, len(PAYLOAD), False)

    # The cached copy is tampered with: detected against the record, fetched again.
    first.path.write_bytes(PAYLOAD[:-10] + b"tampered!!")
    assert _fetch.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    assert len(file_server.gets()) == 2

    # Upstream now serves other bytes: they do not match the first download's record.
    first.path.unlink()
    file_server.files["/w/model.bin"] = b"other bytes entirely"
    with pytest.raises(ChecksumError, match="recorded on first download") as caught:
        _fetch.fetch_weights(entry, progress=False)
    assert digest in str(caught.value)
    assert not first.path.exists()


def test_unpinned_download_that_is_not_a_checkpoint_is_not_trusted(file_server,
                                                                     make_manifest):
    page = b"<!DOCTYPE html><html>Please log in to the hospital proxy</html>"
    url = _served(file_server, "/w/model.bin", page)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}]))

    with pytest.raises(DownloadError, match="login page"):
        _fetch.fetch_weights(entry, progress=False)
    assert [n for n in _cache_files() if not n.endswith(".lock")] == []  # no record either

    file_server.files["/w/model.bin"] = PAYLOAD  # the real file later: accepted
    assert _fetch.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD


# --------------------------------------------------------------------------- offline


def test_offline_and_not_cached_says_how_to_prefetch(file_server, make_manifest, monkeypatch):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")

    with pytest.raises(OfflineError) as caught:
        _fetch.fetch_weights(entry, progress=False)

    message = str(caught.value)
    assert f"histohub download {NAME}" in message and "HISTOHUB_MIRROR" in message
    assert "model.bin" in message and str(_env.histohub_home()) in message
    assert isinstance(caught.value, FileNotFoundError)
    assert file_server.requests == []


def test_offline_uses_cache_and_local_mirror_folder(file_server, make_manifest, monkeypatch,
                                                    tmp_path):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "model.bin").write_bytes(PAYLOAD)
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")
    monkeypatch.setenv("HISTOHUB_MIRROR", str(mirror))

    assert _fetch.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    monkeypatch.delenv("HISTOHUB_MIRROR")
    assert _fetch.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    assert file_server.requests == []


# --------------------------------------------------------------------------- mirrors


def test_mirror_url_prefix_is_tried_before_upstream(file_server, make_manifest, monkeypatch):
    from _servers import FileServer

    url = _served(file_server, "/upstream/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    with FileServer({"/hospital/weights/model.bin": PAYLOAD}) as mirror:
        monkeypatch.setenv("HISTOHUB_MIRROR", mirror.url + "/hospital/weights/")
        fetched = _fetch.fetch_weights(entry, progress=False)
        assert [r.path for r in mirror.gets()] == ["/hospital/weights/model.bin"]
    assert fetched.path.read_bytes() == PAYLOAD
    assert file_server.requests == []


def test_mirror_folder_without_the_file_falls_back_to_upstream(file_server, make_manifest,
                                                               monkeypatch, tmp_path):
    url = _served(file_server, "/upstream/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    monkeypatch.setenv("HISTOHUB_MIRROR", str(tmp_path))  # exists, but holds no model.bin

    assert _fetch.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    assert len(file_server.gets()) == 1


# --------------------------------------------------------------------------- flaky networks


def test_interrupted_download_resumes_with_range(file_server, make_manifest):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    file_server.drop_next(len(PAYLOAD) // 2)

    fetched = _fetch.fetch_weights(entry, progress=False)

    assert fetched.path.read_bytes() == PAYLOAD
    first, second = file_server.gets()
    assert "Range" not in first.headers
    assert 0 < _range_start(second) <= len(PAYLOAD) // 2  # at most one read lost
    assert not [n for n in _cache_files() if n.endswith(".part")]


def test_interrupted_download_restarts_cleanly_without_range_support(file_server,
                                                                     make_manifest):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    file_server.ranges = False
    file_server.drop_next(len(PAYLOAD) // 3)

    fetched = _fetch.fetch_weights(entry, progress=False)

    assert fetched.path.read_bytes() == PAYLOAD
    assert 0 < _range_start(file_server.gets()[1]) <= len(PAYLOAD) // 3  # asked, got 200


def test_partial_file_is_kept_after_giving_up_and_resumed_next_time(file_server,
                                                                    make_manifest):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    file_server.drop_next(100_000, 0, 0)  # every try of the first call fails

    with pytest.raises(DownloadError, match="gave up after 3 tries"):
        _fetch.fetch_weights(entry, progress=False)
    assert [n for n in _cache_files() if n.endswith(".part")]

    assert _fetch.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    assert 0 < _range_start(file_server.gets()[-1]) <= 100_000


def test_transient_errors_are_retried_and_client_errors_are_not(file_server, make_manifest):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    file_server.fail_next(503, 429)
    assert _fetch.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    assert len(file_server.gets()) == 3

    missing = _entry_with(make_manifest, weights_file(
        "gone.bin", [{"url": file_server.url + "/gone.bin"}], data=PAYLOAD), name="gone")
    with pytest.raises(DownloadError, match="HTTP 404") as caught:
        _fetch.fetch_weights(missing, progress=False)
    assert len(file_server.gets("/gone.bin")) == 1
    assert "histohub download gone" in str(caught.value)


def test_every_failed_source_is_listed(file_server, make_manifest):
    entry = _entry_with(
        make_manifest,
        weights_file("a.bin", [{"url": file_server.url + "/a1.bin"},
                               {"url": file_server.url + "/a2.bin"}], data=PAYLOAD),
        weights_file("b.bin", [{"url": file_server.url + "/b.bin"}], data=PAYLOAD))
    file_server.fail_next(500, 500, 500)

    with pytest.raises(DownloadError) as caught:
        _fetch.fetch_weights(entry, progress=False)

    message = str(caught.value)
    for path in ("/a1.bin", "/a2.bin", "/b.bin"):
        assert file_server.url + path in message
    assert "HTTP 500" in message and "HTTP 404" in message


def test_two_processes_fetching_at_once_share_one_download(file_server, make_manifest):
    data = os.urandom(2_000_000)
    url = _served(file_server, "/w/big.bin", data)
    _entry_with(make_manifest, weights_file("big.bin", [{"url": url}], data=data))
    file_server.chunk_delay = 0.02  # ~0.6 s per download: the two fetches overlap
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=fetch_in_subprocess, args=(barrier, NAME, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0

    digest = hashlib.sha256(data).hexdigest()
    assert [o[1:] for o in outcomes] == [(digest, digest)] * 2
    assert outcomes[0][0] == outcomes[1][0]
    assert len(file_server.gets()) == 1


# --------------------------------------------------------------------------- Hugging Face

REVISION = "0123456789abcdef0123456789abcdef01234567"


def test_hugging_face_source_through_the_real_client(hub_server, make_manifest, monkeypatch):
    hub_server.add("histo/test-model", REVISION, "model.bin", PAYLOAD)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    source = {"repo_id": "histo/test-model", "filename": "model.bin", "revision": REVISION}
    entry = _entry_with(make_manifest, weights_file("model.bin", [source], data=PAYLOAD))

    fetched = _fetch.fetch_weights(entry, progress=False)

    assert fetched.path == _cache.cached_path(entry.weights[0])
    assert fetched.path.read_bytes() == PAYLOAD
    path = f"/histo/test-model/resolve/{REVISION}/model.bin"
    assert {(r.method, r.path) for r in hub_server.requests} == {("HEAD", path), ("GET", path)}

    # Offline, with only huggingface_hub's own cache left: no request, same file.
    fetched.path.unlink()
    hub_server.requests.clear()
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")
    assert _fetch.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    assert hub_server.requests == []


def test_hugging_face_file_with_wrong_hash_is_refused(hub_server, make_manifest, monkeypatch):
    hub_server.add("histo/test-model", REVISION, "model.bin", b"not the pinned bytes")
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    source = {"repo_id": "histo/test-model", "filename": "model.bin", "revision": REVISION}
    entry = _entry_with(make_manifest, weights_file("model.bin", [source], data=PAYLOAD))

    with pytest.raises(ChecksumError, match=hashlib.sha256(PAYLOAD).hexdigest()):
        _fetch.fetch_weights(entry, progress=False)
    assert not _cache.cached_path(entry.weights[0]).exists()


# --------------------------------------------------------------------------- cache identity


def test_an_extra_manifest_cannot_plant_weights_for_a_shipped_model(file_server, make_manifest,
                                                                    monkeypatch):
    """Issue 10, item 5: an entry reusing the shipped file name filled the shipped entry's
    cache slot, and offline ``resnet18-ssl`` then loaded those weights."""
    url = _served(file_server, "/planted/pytorchnative_tenpercent_resnet18.ckpt", PAYLOAD)
    planted = _entry_with(make_manifest, weights_file(
        "pytorchnative_tenpercent_resnet18.ckpt", [{"url": url}]))
    assert _fetch.fetch_weights(planted, progress=False).path.read_bytes() == PAYLOAD
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")

    with pytest.raises(OfflineError):
        _fetch.fetch_weights(get_entry("resnet18-ssl"), progress=False)


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
def test_two_entries_with_the_same_file_name_keep_their_own_bytes(file_server, make_manifest,
                                                                   monkeypatch, pinned):
    a_url = _served(file_server, "/a/model.bin", PAYLOAD)
    b_url = _served(file_server, "/b/model.bin", OTHER)
    make_manifest({"org-a": [weights_file("model.bin", [{"url": a_url}],
                                          data=PAYLOAD if pinned else None)],
                   "org-b": [weights_file("model.bin", [{"url": b_url}],
                                          data=OTHER if pinned else None)]})
    a = _fetch.fetch_weights(get_entry("org-a"), progress=False)
    b = _fetch.fetch_weights(get_entry("org-b"), progress=False)
    assert a.path != b.path and a.path.name == b.path.name == "model.bin"

    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")
    assert _fetch.fetch_weights(get_entry("org-a"), progress=False).path.read_bytes() == PAYLOAD
    assert _fetch.fetch_weights(get_entry("org-b"), progress=False).path.read_bytes() == OTHER
    assert len(file_server.gets()) == 2


def _legacy(data: bytes, source: str | None) -> Path:
    """A file in the flat cache layout of earlier versions (``weights/<filename>``)."""
    path = _cache.weights_dir() / "model.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if source is not None:
        path.with_name("model.bin.json").write_text(json.dumps(
            {"filename": "model.bin", "sha256": _sha(data), "size": len(data), "pinned": False,
             "source": source, "verified": {}}))
    return path


def test_flat_cache_of_earlier_versions_is_moved_in_when_it_verifies(file_server,
                                                                     make_manifest,
                                                                     monkeypatch):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")
    pinned = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    legacy = _legacy(PAYLOAD, source=None)

    fetched = _fetch.fetch_weights(pinned, progress=False)  # the manifest's hash matches

    assert fetched.path == _cache.cached_path(pinned.weights[0]) != legacy
    assert fetched.path.read_bytes() == PAYLOAD and not legacy.exists()

    v_url = file_server.url + "/v/model.bin"
    unpinned = _entry_with(make_manifest, weights_file("model.bin", [{"url": v_url}]),
                           name="unpinned")
    legacy = _legacy(OTHER, source=v_url)  # recorded as downloaded from this entry's source
    assert _fetch.fetch_weights(unpinned, progress=False).path.read_bytes() == OTHER
    assert not legacy.exists()

    other = _entry_with(make_manifest, weights_file(
        "model.bin", [{"url": file_server.url + "/elsewhere/model.bin"}]), name="other")
    legacy = _legacy(OTHER, source=v_url)  # another entry's download: no evidence for this one
    with pytest.raises(OfflineError):
        _fetch.fetch_weights(other, progress=False)
    assert legacy.read_bytes() == OTHER  # left for the entry it belongs to
    assert file_server.requests == []


# --------------------------------------------------------------------------- reported facts


def test_reported_sha256_verifies_the_very_first_download(file_server, make_manifest,
                                                          monkeypatch):
    """Issue 10, item 6: the first answer used to be pinned, whatever it was."""
    url = _served(file_server, "/w/model.bin", OTHER)
    reported = {"sha256": _sha(PAYLOAD), "size": len(PAYLOAD), "note": "an independent user"}
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}],
                                                    reported=reported))

    with pytest.raises(ChecksumError) as caught:
        _fetch.fetch_weights(entry, progress=False)

    message = str(caught.value)
    assert _sha(PAYLOAD) in message and "reported" in message
    assert "not verified by histohub" in message and "an independent user" in message
    assert f"HISTOHUB_ACCEPT_SHA256=model.bin={_sha(OTHER)}" in message
    assert [n for n in _cache_files() if not n.endswith((".lock", ".holder"))] == []

    # A maintainer who checked the new file another way accepts exactly that hash.
    monkeypatch.setenv("HISTOHUB_ACCEPT_SHA256", f"model.bin={_sha(OTHER)}")
    fetched = _fetch.fetch_weights(entry, progress=False)
    assert fetched.path.read_bytes() == OTHER
    record = json.loads(fetched.path.with_name("model.bin.json").read_text())
    assert record["expected_from"] == "accepted"
    monkeypatch.delenv("HISTOHUB_ACCEPT_SHA256")  # remembered by the cache record
    assert _fetch.fetch_weights(entry, progress=False).path.read_bytes() == OTHER
    assert len(file_server.gets()) == 2


def test_reported_sha256_that_matches_is_recorded_as_reported(file_server, make_manifest):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    reported = {"sha256": _sha(PAYLOAD), "size": len(PAYLOAD), "note": "an independent user"}
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}],
                                                    reported=reported))
    fetched = _fetch.fetch_weights(entry, progress=False)
    record = json.loads(fetched.path.with_name("model.bin.json").read_text())
    assert (record["sha256"], record["expected_from"]) == (_sha(PAYLOAD), "reported")


def test_fingerprint_catches_the_wrong_weights_after_loading(file_server, make_manifest,
                                                             lightning_ckpt, backbone_state):
    data = lightning_ckpt.read_bytes()
    url = _served(file_server, "/t/tenpercent_resnet18.ckpt", data)
    norm = float(torch.linalg.vector_norm(backbone_state["conv1.weight"]))
    upstream = {"tensor": "conv1.weight", "l2_norm": 12.58, "rtol": 0.02, "verified": False}
    _entry_with(make_manifest, weights_file("tenpercent_resnet18.ckpt", [{"url": url}],
                                            data=data, format="lightning",
                                            fingerprint=upstream))

    with pytest.raises(FingerprintError) as caught:
        histohub.load_pretrained(NAME, progress=False)

    message = str(caught.value)
    assert NAME in message and "conv1.weight" in message and "12.58" in message
    assert f"{norm:.2f}" in message and "reported" in message

    _entry_with(make_manifest, weights_file("tenpercent_resnet18.ckpt", [{"url": url}],
                                            data=data, format="lightning",
                                            fingerprint={**upstream, "l2_norm": norm}))
    assert histohub.load_pretrained(NAME, progress=False).histohub_info.sha256 == _sha(data)


# --------------------------------------------------------------------------- size limits


def test_announced_length_over_the_size_is_refused_before_the_body(file_server,
                                                                   make_manifest):
    """Issue 10, item 7: a server announcing more than the pinned size was read in full."""
    url = _served(file_server, "/w/model.bin", PAYLOAD + bytes(50_000_000))
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))

    with pytest.raises(DownloadError, match=rf"announces {len(PAYLOAD) + 50_000_000} bytes.*"
                                            rf"{len(PAYLOAD)}"):
        _fetch.fetch_weights(entry, progress=False)

    assert max(file_server.wait_sent()) < 25_000_000
    assert [n for n in _cache_files() if n.endswith(".part")] == []


def test_body_longer_than_the_size_stops_at_the_size(file_server, make_manifest):
    url = _served(file_server, "/w/model.bin", PAYLOAD + bytes(50_000_000))
    file_server.lengths["/w/model.bin"] = None  # no Content-Length: the body just goes on
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))

    with pytest.raises(DownloadError, match=rf"more than the expected {len(PAYLOAD)} bytes"):
        _fetch.fetch_weights(entry, progress=False)

    assert max(file_server.wait_sent()) < 25_000_000
    assert [n for n in _cache_files() if n.endswith(".part")] == []


def test_unknown_size_is_capped_and_nothing_is_recorded(file_server, make_manifest,
                                                        monkeypatch):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}]))
    monkeypatch.setenv("HISTOHUB_MAX_DOWNLOAD_BYTES", "100000")

    with pytest.raises(DownloadError, match="HISTOHUB_MAX_DOWNLOAD_BYTES"):
        _fetch.fetch_weights(entry, progress=False)
    assert [n for n in _cache_files() if not n.endswith((".lock", ".holder"))] == []


def test_oversized_file_in_a_mirror_folder_is_not_copied(make_manifest, monkeypatch,
                                                         tmp_path, file_server):
    entry = _entry_with(make_manifest, weights_file(
        "model.bin", [{"url": file_server.url + "/w/model.bin"}], data=PAYLOAD))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "model.bin").write_bytes(PAYLOAD + bytes(5_000_000))
    monkeypatch.setenv("HISTOHUB_MIRROR", str(mirror))
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")

    with pytest.raises(OfflineError, match=r"more than the expected \d+ bytes; not copied"):
        _fetch.fetch_weights(entry, progress=False)


# --------------------------------------------------------------------------- credentials


def test_credentials_in_urls_are_never_written_or_printed(file_server, make_manifest, caplog,
                                                          capsys):
    """Issue 10, item 8: ``user:password@`` in a source URL reached the cache record and logs."""
    base = file_server.url.replace("http://", "http://alice:s3cret@")
    file_server.files["/w/model.bin"] = PAYLOAD
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": base + "/w/model.bin"}],
                                                    data=PAYLOAD))
    file_server.fail_next(503)  # the retry is logged with the URL

    with caplog.at_level(logging.DEBUG, logger="histohub"):
        fetched = _fetch.fetch_weights(entry, progress=True)
        missing = _entry_with(make_manifest, weights_file(
            "gone.bin", [{"url": base + "/gone.bin"}], data=PAYLOAD), name="gone")
        with pytest.raises(DownloadError) as caught:
            _fetch.fetch_weights(missing, progress=True)

    record = fetched.path.with_name("model.bin.json").read_text()
    out, err = capsys.readouterr()
    assert "127.0.0.1" in record and "/gone.bin" in str(caught.value)
    for text in (record, str(caught.value), caplog.text, out, err):
        assert "s3cret" not in text and "alice" not in text
    assert file_server.gets()[-1].headers.get("Authorization")  # still used to log in


# --------------------------------------------------------------------------- deadlines, locks


def test_a_trickling_server_ends_at_the_download_deadline(file_server, make_manifest,
                                                          monkeypatch):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    file_server.step, file_server.chunk_delay = 100, 0.05  # 2 kB/s: 150 s for the file
    monkeypatch.setenv("HISTOHUB_DOWNLOAD_TIMEOUT", "1")

    start = time.monotonic()
    with pytest.raises(DownloadError, match="HISTOHUB_DOWNLOAD_TIMEOUT"):
        _fetch.fetch_weights(entry, progress=False)
    assert time.monotonic() - start < 10
    assert [n for n in _cache_files() if n.endswith(".part")]  # kept, resumed next time


def test_waiting_for_the_lock_is_bounded_and_names_the_holder(file_server, make_manifest,
                                                              monkeypatch):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    monkeypatch.setenv("HISTOHUB_LOCK_TIMEOUT", "0.5")
    path = _cache.cached_path(entry.weights[0])
    path.parent.mkdir(parents=True, exist_ok=True)

    held, release = threading.Event(), threading.Event()

    def holder() -> None:  # another process, as far as the lock can tell
        with _fetch._locked(path):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(30)
        with pytest.raises(LockTimeoutError,
                           match=rf"pid {os.getpid()} on {socket.gethostname()}.*"
                                 "HISTOHUB_LOCK_TIMEOUT"):
            _fetch.fetch_weights(entry, progress=False)
    finally:
        release.set()
        thread.join()
    assert file_server.requests == []
    assert _fetch.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD


# --------------------------------------------------------------------------- plain http


def test_plain_http_from_another_machine_needs_a_pinned_hash(make_manifest):
    """Anyone on the path can change an http:// download; only a hash makes that harmless
    (loopback addresses, as in these tests, never leave the machine)."""
    entry = _entry_with(make_manifest, weights_file(
        "model.bin", [{"url": "http://weights.example.invalid/model.bin"}]))
    with pytest.raises(DownloadError, match=r"plain http.*https.*pin"):
        _fetch.fetch_weights(entry, progress=False)


# --------------------------------------------------------------------------- names and paths


def test_a_local_file_named_like_a_model_means_the_file(file_server, make_manifest,
                                                        lightning_ckpt, monkeypatch,
                                                        tmp_path, caplog):
    _entry_with(make_manifest, weights_file(
        "model.bin", [{"url": file_server.url + "/w/model.bin"}], data=PAYLOAD))
    monkeypatch.chdir(tmp_path)
    shutil.copy(lightning_ckpt, tmp_path / NAME)

    with caplog.at_level(logging.WARNING, logger="histohub"):
        model = histohub.load_pretrained(NAME, progress=False)

    assert Path(model.histohub_info.weights_path).resolve() == (tmp_path / NAME).resolve()
    assert "loading the file" in caplog.text and NAME in caplog.text
    assert file_server.requests == []


# --------------------------------------------------------------------------- offline Hub


def test_offline_opens_no_connection_to_the_hugging_face_hub(hub_server, make_manifest,
                                                             monkeypatch):
    """Issue 10, item 9: HISTOHUB_OFFLINE=1 must switch huggingface_hub offline too."""
    from huggingface_hub import constants

    hub_server.add("histo/test-model", REVISION, "model.bin", PAYLOAD)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")
    source = {"repo_id": "histo/test-model", "filename": "model.bin", "revision": REVISION}
    entry = _entry_with(make_manifest, weights_file("model.bin", [source], data=PAYLOAD))
    import huggingface_hub

    real, seen = huggingface_hub.hf_hub_download, []

    def spy(*args, **kwargs):
        seen.append(constants.is_offline_mode())
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)

    with pytest.raises(OfflineError):
        _fetch.fetch_weights(entry, progress=False)

    assert hub_server.requests == []
    assert seen == [True] and constants.is_offline_mode() is False


def test_hub_announcing_more_than_the_size_is_not_downloaded(hub_server, make_manifest,
                                                             monkeypatch):
    hub_server.add("histo/test-model", REVISION, "model.bin", PAYLOAD + bytes(5_000_000))
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    source = {"repo_id": "histo/test-model", "filename": "model.bin", "revision": REVISION}
    entry = _entry_with(make_manifest, weights_file("model.bin", [source], data=PAYLOAD))

    with pytest.raises(DownloadError, match=rf"announces {len(PAYLOAD) + 5_000_000} bytes"):
        _fetch.fetch_weights(entry, progress=False)
    assert hub_server.gets() == []  # the file itself was never requested


def test_pin_after_accepting_another_file_records_it_as_verified(file_server, make_manifest,
                                                                 monkeypatch, capsys):
    """The maintainer's way out of a reported hash that no longer matches (module doc)."""
    from histohub.cli import main

    url = _served(file_server, "/w/model.bin", OTHER)
    reported = {"sha256": _sha(PAYLOAD), "size": len(PAYLOAD), "note": "an independent user"}
    manifest = make_manifest({NAME: [weights_file("model.bin", [{"url": url}],
                                                  reported=reported)]})
    assert main(["pin", "-q", NAME]) == 2  # refused: not the reported file
    assert "HISTOHUB_ACCEPT_SHA256" in capsys.readouterr().err

    monkeypatch.setenv("HISTOHUB_ACCEPT_SHA256", f"model.bin={_sha(OTHER)}")
    assert main(["pin", "-q", NAME]) == 0

    pinned = json.loads(manifest.read_text())["models"][NAME]["weights"][0]
    assert (pinned["sha256"], pinned["size"]) == (_sha(OTHER), len(OTHER))
    assert pinned["reported"] == reported  # what was reported stays on record
    monkeypatch.delenv("HISTOHUB_ACCEPT_SHA256")
    assert get_entry(NAME).weights[0].sha256_provenance == "verified"
    assert _fetch.fetch_weights(get_entry(NAME), progress=False).trust == "verified"


# --------------------------------------------------------------------------- shipped in the package


def test_a_file_shipped_in_the_package_loads_offline_without_copying(
        make_manifest, monkeypatch, tmp_path, lightning_ckpt, torchvision_features):

    data = lightning_ckpt.read_bytes()
    (tmp_path / "pkg" / "weights").mkdir(parents=True)
    (tmp_path / "pkg" / "weights" / "bundled.ckpt").write_bytes(data)
    monkeypatch.setattr(_schema, "PACKAGE_DIR", tmp_path / "pkg")
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")
    _entry_with(make_manifest, weights_file("bundled.ckpt", [{"package": "weights/bundled.ckpt"}],
                                            data=data, format="lightning"))

    model = histohub.load_pretrained(NAME, progress=False)

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), torchvision_features(x), rtol=0, atol=0)
    assert Path(model.histohub_info.weights_path) == tmp_path / "pkg" / "weights" / "bundled.ckpt"
    assert _cache_files() == []   # served where it lies: nothing copied into the cache


def test_a_damaged_file_in_the_package_is_refused_and_a_missing_one_is_an_error(
        make_manifest, monkeypatch, tmp_path, lightning_ckpt):

    data = lightning_ckpt.read_bytes()
    shipped = tmp_path / "weights" / "bundled.ckpt"
    shipped.parent.mkdir()
    monkeypatch.setattr(_schema, "PACKAGE_DIR", tmp_path)
    _entry_with(make_manifest, weights_file("bundled.ckpt", [{"package": "weights/bundled.ckpt"}],
                                            data=data, format="lightning"))
    with pytest.raises(DownloadError, match="missing from this installation"):
        histohub.load_pretrained(NAME, progress=False)
    shipped.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ChecksumError, match="reinstall histohub"):
        histohub.load_pretrained(NAME, progress=False)


@pytest.mark.parametrize("source, pinned, message", [
    ({"package": "../outside.ckpt"}, True, "without '..'"),
    ({"package": "/abs/x.ckpt"}, True, "relative path"),
    ({"package": "w/x.ckpt", "url": "https://example.org/x"}, True, "alone"),
    ({"package": "weights/x.ckpt"}, False, "verified 'sha256' and 'size'"),
])
def test_package_sources_are_checked_when_the_manifest_is_read(make_manifest, source, pinned,
                                                               message):
    from histohub.errors import ManifestError

    with pytest.raises(ManifestError, match=message):
        _entry_with(make_manifest, weights_file("x.ckpt", [source],
                                                data=PAYLOAD if pinned else None))
