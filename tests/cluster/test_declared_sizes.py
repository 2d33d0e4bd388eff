"""Issue 23, item 3: a feature file's declared shapes are checked against what the file
holds; a tiny .h5 declaring (1e9, 1e6) float32 is refused in one line, at once."""

from __future__ import annotations

import numpy as np
import pytest

from histohub.featurefile._layout import read_header
from histohub.errors import FeatureFileError

h5py = pytest.importorskip("h5py")


def _declared(path, rows: int, dim: int, *, chunks=True, compression=None) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("features", shape=(rows, dim), dtype="float32", chunks=chunks,
                         compression=compression)
        f.create_dataset("coords", shape=(rows, 2), dtype="int64", chunks=chunks,
                         compression=compression)


@pytest.mark.parametrize("chunks", [True, None])
def test_unwritten_huge_declaration_is_refused(tmp_path, chunks):
    path = tmp_path / "huge.h5"
    _declared(path, 10**9, 10**6, chunks=chunks or None)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(FeatureFileError, match=r"declares .*\(1000000000, 1000000\).* holds"):
        read_header(path)


def test_cluster_command_refuses_it_in_one_line(tmp_path, monkeypatch, capsys):
    from histohub import cli

    monkeypatch.setattr(cli, "COMMANDS", ["histohub.cli._cluster"])
    path = tmp_path / "huge.h5"
    _declared(path, 10**9, 10**6)
    assert cli.main(["cluster", str(path), "--k", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "huge.h5" in err


def test_real_files_pass_written_and_compressed(tmp_path):
    for compression in (None, "gzip"):
        path = tmp_path / f"real-{compression}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=np.zeros((1000, 64), np.float32),
                             compression=compression, chunks=(256, 64))
            f.create_dataset("coords", data=np.zeros((1000, 2), np.int64),
                             compression=compression)
        assert read_header(path)["n"] == 1000


def test_partly_written_declaration_is_refused(tmp_path):
    path = tmp_path / "part.h5"
    with h5py.File(path, "w") as f:
        features = f.create_dataset("features", shape=(100_000, 512), dtype="float32",
                                    chunks=(256, 512))
        features[:256] = 1.0
        f.create_dataset("coords", data=np.zeros((100_000, 2), np.int64))
    with pytest.raises(FeatureFileError, match="features"):
        read_header(path)
