"""Issue 23, item 2: credentials in a source URL are used to connect, and never written
or printed: not by ``info``, ``list``, ``export-hf`` (config.json, card), ``push`` (what is
uploaded), logs, cache records or errors."""

from __future__ import annotations

import copy
import json
import logging

import pytest

import histohub
from histohub import cli
from histohub.hub._cache import weights_dir
from test_front_doors import fake_hub, frontdoor_server, frontdoor_weights  # noqa: F401

SECRETS = ("alice", "s3cret")
NAME = "secret-resnet18"


@pytest.fixture
def secret_model(tmp_path, monkeypatch, frontdoor_weights, frontdoor_server):  # noqa: F811
    """A manifest model whose only source URL holds ``alice:s3cret@``; and one whose file
    is missing there (its error names the URL)."""
    monkeypatch.setenv("HISTOHUB_HOME", str(tmp_path / "home"))
    _, path, sha256 = frontdoor_weights
    entry = copy.deepcopy(json.loads(histohub.hub.MANIFEST_PATH.read_text())["models"]
                          ["resnet18-ssl"])
    entry.update(description="Random weights behind a password (tests).", default=False)
    weights = {k: v for k, v in entry["weights"][0].items()
               if k not in ("reported", "fingerprint")}
    base = frontdoor_server.replace("http://", "http://alice:s3cret@")
    entry["weights"] = [{**weights, "sha256": sha256, "size": path.stat().st_size,
                         "sources": [{"url": f"{base}/{path.name}"}]}]
    gone = copy.deepcopy(entry)
    gone["weights"][0]["sources"] = [{"url": f"{base}/gone.ckpt"}]
    manifest = tmp_path / "secret.json"
    manifest.write_text(json.dumps({"schema_version": 1,
                                    "models": {NAME: entry, NAME + "-gone": gone}}))
    monkeypatch.setenv("HISTOHUB_MANIFEST", str(manifest))
    histohub.hub.reload_manifests()
    monkeypatch.setattr(cli, "COMMANDS", ["histohub.cli._models", "histohub.cli._hub"])
    yield NAME
    histohub.hub.reload_manifests()


def _clean(*texts: str | bytes) -> None:
    for text in texts:
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        for secret in SECRETS:
            assert secret not in text, text


def test_info_and_list_print_no_credentials(secret_model, capsys):
    assert cli.main(["info", secret_model]) == 0
    out, err = capsys.readouterr()
    assert "127.0.0.1" in out  # the source is shown, without its user:password@
    _clean(out, err)
    assert cli.main(["list"]) == 0
    _clean(*capsys.readouterr())


def test_export_hf_writes_no_credentials(secret_model, tmp_path, capsys, caplog):
    with caplog.at_level(logging.DEBUG, logger="histohub"):
        assert cli.main(["export-hf", secret_model, str(tmp_path / "export")]) == 0
    config = (tmp_path / "export" / "config.json").read_text()
    assert "127.0.0.1" in json.loads(config)["pretrained_cfg"]["origin_url"]
    _clean(config, (tmp_path / "export" / "README.md").read_text(), caplog.text,
           *capsys.readouterr())
    records = list(weights_dir().rglob("*.json"))
    assert records
    _clean(*(record.read_text() for record in records))


def test_push_uploads_no_credentials(secret_model, fake_hub, capsys):  # noqa: F811
    assert cli.main(["push", secret_model, "org/secret"]) == 0
    (_, upload) = fake_hub
    assert upload[2]["files"]
    _clean(*upload[2]["files"].values(), *capsys.readouterr())


def test_errors_name_the_source_without_credentials(secret_model, tmp_path, capsys, caplog):
    with caplog.at_level(logging.DEBUG, logger="histohub"):
        assert cli.main(["info", secret_model + "-gone"]) == 0
        assert cli.main(["export-hf", secret_model + "-gone", str(tmp_path / "x")]) == 2
    out, err = capsys.readouterr()
    assert "gone.ckpt" in err and err.startswith("histohub export-hf: error:")
    _clean(out, err, caplog.text)
