"""``run_benchmark.py`` end to end on a small image folder: run JSON, tables, plots, the
feature cache reused by a second run, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from histohub_training.downstream import report
from histohub_training.downstream.cli import main

pytest.importorskip("sklearn")


@pytest.mark.slow
def test_cli_linear_run_writes_json_table_plot_and_reuses_cached_features(tmp_path, other_seed,
                                                                         class_tiles):
    data, out = class_tiles(tmp_path / "tiles", per_class=8), tmp_path / "out"
    argv = ["--model", "random", "--model", str(other_seed), "--task", "linear", "--data",
            str(data), "--group-pattern", r"(slide\d)_", "--input-size", "32",
            "--fractions", "50,100", "--repeats", "2", "--epochs", "3", "--out", str(out),
            "--quiet"]
    assert main(argv) == 0
    (run_file,) = (out / "runs").glob("linear_tiles_*.json")
    run = json.loads(run_file.read_text())
    assert [m["label"] for m in run["models"]] == ["random-resnet18", "other-seed"]
    assert run["models"][1]["sha256"] == hashlib.sha256(
        other_seed.read_bytes()).hexdigest()
    assert run["models"][0]["identity"].startswith("random:resnet18:seed=0")
    assert len(run["data_hash"]) == 64 and run["split"]["kind"] == "grouped stratified"
    assert run["environment"]["versions"]["torch"] == torch.__version__
    result = run["results"]["other-seed"]
    # 5 grouped folds x 2 repeats: ten runs per fraction, each image tested once per repeat
    assert set(result["summary"]) == {"0.5", "1"} and len(result["runs"]["0.5"]) == 10
    assert result["summary"]["1"]["macro_f1"]["n"] == 10 and run["split"]["n"] == 10
    assert sum(r["n_test"] for r in result["runs"]["1"]) == 2 * run["dataset"]["n_images"]
    assert result["runs"]["0.5"][0]["train_sha256"] != result["runs"]["0.5"][1]["train_sha256"]
    assert all(not t["features_cached"] for t in run["timings"].values())
    table = (out / "tables.md").read_text()
    assert "| R | Pretraining | tiles | Average |" in table
    assert "| 18 | Random |" in table and "Checkpoint (other-seed)" in table
    assert (out / "plots" / "linear_fractions.png").stat().st_size > 1000
    # the same sweep again: features come from the cache, the numbers are the same
    assert main(argv) == 0
    second = report.load_runs(out)[-1]
    assert all(t["features_cached"] for t in second["timings"].values())
    assert second["results"]["other-seed"]["summary"] == result["summary"]


def test_cli_bad_input_exits_with_a_message(tmp_path, capsys, class_tiles):
    assert main(["--model", "random", "--task", "linear", "--data",
                 str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "neither an existing path nor a preset" in capsys.readouterr().err
    class_tiles(tmp_path / "one", per_class=4)
    shutil.rmtree(tmp_path / "one" / "class1")
    assert main(["--model", "random", "--task", "linear", "--data", str(tmp_path / "one"),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "single class" in capsys.readouterr().err
    assert main(["--model", "random", "--task", "linear", "--data", str(tmp_path / "one"),
                 "--fractions", "0,50", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "percentages in (0, 100]" in capsys.readouterr().err
