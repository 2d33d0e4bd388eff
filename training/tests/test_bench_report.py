"""Outputs: paper-style tables (rows per architecture, models that could not be run) and
metrics recorded in a manifest through ``--record-manifest``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from histohub_training.downstream import report
from histohub_training.downstream.cli import main

pytest.importorskip("sklearn")


def _manifest(path: Path) -> Path:
    from histohub.hub import MANIFEST_PATH

    data = json.loads(MANIFEST_PATH.read_text())
    entry = data["models"]["resnet18-ssl"]
    path.write_text(json.dumps({"schema_version": 1, "models": {"my-ssl": entry}}))
    return path


def test_record_manifest_writes_validated_metrics(tmp_path, other_seed, capsys, class_tiles):
    from histohub.hub import read_manifest

    manifest = _manifest(tmp_path / "manifest.json")
    data = class_tiles(tmp_path / "tiles", per_class=8)
    argv = ["--model", "random", "--model", str(other_seed), "--task", "clustering",
            "--data", str(data), "--input-size", "32", "--repeats", "2",
            "--out", str(tmp_path / "out"), "--record-manifest", str(manifest), "--quiet"]
    assert main(argv) == 2     # a checkpoint has no manifest name: say which entry
    assert "no model 'other-seed'" in capsys.readouterr().err
    assert main(argv + ["--record-name", "my-ssl"]) == 0
    run = report.load_runs(tmp_path / "out")[-1]
    recorded = read_manifest(manifest)["my-ssl"].metrics["clustering/tiles"]
    assert recorded["metric"] == "nmi" and recorded["repeats"] == 2
    assert recorded["model_sha256"] == run["models"][1]["sha256"]
    assert recorded["mean"] == run["results"]["other-seed"]["summary"]["1"]["nmi"]["mean"]
    assert read_manifest(manifest)["my-ssl"].preprocessing.mean == (0.5, 0.5, 0.5)


def test_table_lays_out_rows_per_architecture_with_unavailable_imagenet():
    def result(mean):
        stats = {"macro_f1": {"mean": mean, "std": 0.01, "n": 5}}
        return {"metric": "macro_f1", "higher_is_better": True, "runs": {},
                "summary": {"0.05": stats, "1": stats}}

    def run(dataset, means):
        models = [{"label": "random-resnet18", "kind": "random", "arch": "resnet18"},
                  {"label": "ssl", "kind": "self-supervised", "arch": "resnet18"},
                  {"label": "random-resnet50", "kind": "random", "arch": "resnet50"}]
        return {"task": "linear", "dataset": {"name": dataset}, "models": models,
                "results": {m["label"]: result(v) for m, v in zip(models, means)},
                "skipped": [{"spec": "imagenet:resnet18", "reason": "offline"}],
                "finished_utc": dataset}

    table = report.markdown_tables([run("a", [0.5, 0.7, 0.4]), run("b", [0.3, 0.5, 0.2])])
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[:5] == [
        "| R | Pretraining | a | b | Average |",
        "| 18 | Random | 50.0 ± 1.0 | 30.0 ± 1.0 | 40.0 |",
        "|  | ImageNet | n/a | n/a | n/a |",
        "|  | Self-supervised (ssl) | 70.0 ± 1.0 | 50.0 ± 1.0 | 60.0 |",
        "| 50 | Random | 40.0 ± 1.0 | 20.0 ± 1.0 | 30.0 |"]
    assert "`imagenet:resnet18` was not run: offline" in table
    assert "| ssl | 70.0 ± 1.0 | 70.0 ± 1.0 |" in table     # by label fraction
