"""Download and cache (issue 2, part 4), against HTTP servers on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from _servers import fetch_in_subprocess, weights_file

import histohub
from histohub import _download
from histohub._manifest import get_entry
from histohub.errors import (CheckpointError, ChecksumError, DownloadError, OfflineError)

NAME = "test-model"
# Stands in for a checkpoint where only the bytes matter (starts like a torch zip file).
PAYLOAD = b"PK\x03\x04" + os.urandom(300_000)


def _entry_with(make_manifest, *files: dict, name: str = NAME):
    make_manifest({name: list(files)})
    return get_entry(name)


def _cache_files() -> list[str]:
    folder = _download.weights_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


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
    _entry_with(make_manifest, weights_file("tenpercent_resnet18.ckpt", [{"url": url}],
                                            data=data, format="lightning"))

    model = histohub.load_pretrained(NAME, progress=False)

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), torchvision_features(x), rtol=0, atol=0)
    assert not model.training
    assert model.histohub_info.sha256 == hashlib.sha256(data).hexdigest()
    cached = _download.weights_dir() / "tenpercent_resnet18.ckpt"
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
        _download.fetch_weights(entry, progress=False)

    message = str(caught.value)
    assert hashlib.sha256(PAYLOAD).hexdigest() in message
    assert hashlib.sha256(bytes(bad)).hexdigest() in message
    assert isinstance(caught.value, ValueError)
    assert [n for n in _cache_files() if not n.endswith(".lock")] == []


def test_valid_cache_hit_makes_no_request_and_does_not_rehash(file_server, make_manifest,
                                                              monkeypatch):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    first = _download.fetch_weights(entry, progress=False)
    requests_before = len(file_server.requests)

    def no_hashing(path, **kwargs):
        raise AssertionError("a warm cache hit must not re-hash the file")

    monkeypatch.setattr(_download, "sha256_file", no_hashing)
    second = _download.fetch_weights(entry, progress=False)

    assert second == first
    assert len(file_server.requests) == requests_before


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["changed", "mtime-restored"])
def test_corrupted_cache_file_is_detected_and_fetched_again(file_server, make_manifest,
                                                             keep_mtime):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    path = _download.fetch_weights(entry, progress=False).path
    stat = path.stat()
    with open(path, "r+b") as handle:  # same size, one byte changed in place
        handle.seek(5000)
        handle.write(bytes([PAYLOAD[5000] ^ 0xFF]))
    if keep_mtime:  # ctime still moves, so the record no longer matches
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    fetched = _download.fetch_weights(entry, progress=False)

    assert fetched.path.read_bytes() == PAYLOAD
    assert len(file_server.gets()) == 2


def test_truncated_cached_checkpoint_is_fetched_again_when_pinned(
        file_server, make_manifest, lightning_ckpt, torchvision_features):
    data = lightning_ckpt.read_bytes()
    url = _served(file_server, "/t/tenpercent_resnet18.ckpt", data)
    _entry_with(make_manifest, weights_file("tenpercent_resnet18.ckpt", [{"url": url}],
                                            data=data, format="lightning"))
    cached = _download.weights_dir() / "tenpercent_resnet18.ckpt"
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

    with caplog.at_level(logging.WARNING, logger="histohub._download"):
        first = _download.fetch_weights(entry, progress=False)
        _download.fetch_weights(entry, progress=False)
    warnings = [r for r in caplog.records if "no sha256 pinned" in r.getMessage()]
    assert len(warnings) == 1 and f"histohub pin {NAME}" in warnings[0].getMessage()
    record = json.loads((first.path.parent / "model.bin.json").read_text())
    assert (record["sha256"], record["size"], record["pinned"]) == (digest, len(PAYLOAD), False)

    # The cached copy is tampered with: detected against the record, fetched again.
    first.path.write_bytes(PAYLOAD[:-10] + b"tampered!!")
    assert _download.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    assert len(file_server.gets()) == 2

    # Upstream now serves other bytes: they do not match the first download's record.
    first.path.unlink()
    file_server.files["/w/model.bin"] = b"other bytes entirely"
    with pytest.raises(ChecksumError, match="recorded on first download") as caught:
        _download.fetch_weights(entry, progress=False)
    assert digest in str(caught.value)
    assert not first.path.exists()


def test_unpinned_download_that_is_not_a_checkpoint_is_not_trusted(file_server,
                                                                     make_manifest):
    page = b"<!DOCTYPE html><html>Please log in to the hospital proxy</html>"
    url = _served(file_server, "/w/model.bin", page)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}]))

    with pytest.raises(DownloadError, match="login page"):
        _download.fetch_weights(entry, progress=False)
    assert [n for n in _cache_files() if not n.endswith(".lock")] == []  # no record either

    file_server.files["/w/model.bin"] = PAYLOAD  # the real file later: accepted
    assert _download.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD


# --------------------------------------------------------------------------- offline


def test_offline_and_not_cached_says_how_to_prefetch(file_server, make_manifest, monkeypatch):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")

    with pytest.raises(OfflineError) as caught:
        _download.fetch_weights(entry, progress=False)

    message = str(caught.value)
    assert f"histohub download {NAME}" in message and "HISTOHUB_MIRROR" in message
    assert "model.bin" in message and str(_download.histohub_home()) in message
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

    assert _download.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    monkeypatch.delenv("HISTOHUB_MIRROR")
    assert _download.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    assert file_server.requests == []


# --------------------------------------------------------------------------- mirrors


def test_mirror_url_prefix_is_tried_before_upstream(file_server, make_manifest, monkeypatch):
    from _servers import FileServer

    url = _served(file_server, "/upstream/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    with FileServer({"/hospital/weights/model.bin": PAYLOAD}) as mirror:
        monkeypatch.setenv("HISTOHUB_MIRROR", mirror.url + "/hospital/weights/")
        fetched = _download.fetch_weights(entry, progress=False)
        assert [r.path for r in mirror.gets()] == ["/hospital/weights/model.bin"]
    assert fetched.path.read_bytes() == PAYLOAD
    assert file_server.requests == []


def test_mirror_folder_without_the_file_falls_back_to_upstream(file_server, make_manifest,
                                                               monkeypatch, tmp_path):
    url = _served(file_server, "/upstream/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    monkeypatch.setenv("HISTOHUB_MIRROR", str(tmp_path))  # exists, but holds no model.bin

    assert _download.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    assert len(file_server.gets()) == 1


# --------------------------------------------------------------------------- flaky networks


def test_interrupted_download_resumes_with_range(file_server, make_manifest):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    file_server.drop_next(len(PAYLOAD) // 2)

    fetched = _download.fetch_weights(entry, progress=False)

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

    fetched = _download.fetch_weights(entry, progress=False)

    assert fetched.path.read_bytes() == PAYLOAD
    assert 0 < _range_start(file_server.gets()[1]) <= len(PAYLOAD) // 3  # asked, got 200


def test_partial_file_is_kept_after_giving_up_and_resumed_next_time(file_server,
                                                                    make_manifest):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    file_server.drop_next(100_000, 0, 0)  # every try of the first call fails

    with pytest.raises(DownloadError, match="gave up after 3 tries"):
        _download.fetch_weights(entry, progress=False)
    assert [n for n in _cache_files() if n.endswith(".part")]

    assert _download.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    assert 0 < _range_start(file_server.gets()[-1]) <= 100_000


def test_transient_errors_are_retried_and_client_errors_are_not(file_server, make_manifest):
    url = _served(file_server, "/w/model.bin", PAYLOAD)
    entry = _entry_with(make_manifest, weights_file("model.bin", [{"url": url}], data=PAYLOAD))
    file_server.fail_next(503, 429)
    assert _download.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    assert len(file_server.gets()) == 3

    missing = _entry_with(make_manifest, weights_file(
        "gone.bin", [{"url": file_server.url + "/gone.bin"}], data=PAYLOAD), name="gone")
    with pytest.raises(DownloadError, match="HTTP 404") as caught:
        _download.fetch_weights(missing, progress=False)
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
        _download.fetch_weights(entry, progress=False)

    message = str(caught.value)
    for path in ("/a1.bin", "/a2.bin", "/b.bin"):
        assert file_server.url + path in message
    assert "HTTP 500" in message and "HTTP 404" in message


@pytest.mark.slow
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

    fetched = _download.fetch_weights(entry, progress=False)

    assert fetched.path == _download.weights_dir() / "model.bin"
    assert fetched.path.read_bytes() == PAYLOAD
    path = f"/histo/test-model/resolve/{REVISION}/model.bin"
    assert {(r.method, r.path) for r in hub_server.requests} == {("HEAD", path), ("GET", path)}

    # Offline, with only huggingface_hub's own cache left: no request, same file.
    fetched.path.unlink()
    hub_server.requests.clear()
    monkeypatch.setenv("HISTOHUB_OFFLINE", "1")
    assert _download.fetch_weights(entry, progress=False).path.read_bytes() == PAYLOAD
    assert hub_server.requests == []


def test_hugging_face_file_with_wrong_hash_is_refused(hub_server, make_manifest, monkeypatch):
    hub_server.add("histo/test-model", REVISION, "model.bin", b"not the pinned bytes")
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    source = {"repo_id": "histo/test-model", "filename": "model.bin", "revision": REVISION}
    entry = _entry_with(make_manifest, weights_file("model.bin", [source], data=PAYLOAD))

    with pytest.raises(ChecksumError, match=hashlib.sha256(PAYLOAD).hexdigest()):
        _download.fetch_weights(entry, progress=False)
    assert not (_download.weights_dir() / "model.bin").exists()
