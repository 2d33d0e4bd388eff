"""histohub.files: atomic writes leave the old file or the new one, never a mix or litter."""

from __future__ import annotations

import os

import pytest

from histohub.files import atomic_path, write_bytes_atomic, write_text_atomic


def test_writes_new_file_and_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    write_text_atomic(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert os.listdir(target.parent) == ["out.txt"]


def test_replaces_keeping_permissions(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    target.chmod(0o640)
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o640


def test_failure_keeps_old_file_and_removes_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_writer_that_writes_nothing_leaves_target_alone(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        with atomic_path(target):
            pass  # the temporary file was never created: nothing to rename
    assert target.read_bytes() == b"old"
