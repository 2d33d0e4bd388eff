"""The zoo's manifest entries, and licences enforced before any request."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import histohub
from histohub.hub._registry import load_manifest, reload_manifests
from histohub.cli import main
from histohub.errors import LicenceError
from histohub.hub._zoo_archs import parameter_count

SHIPPED = json.loads(Path(histohub.__file__).with_name("weights_manifest.json").read_text())
ZOO = sorted(n for n in SHIPPED["models"] if not n.startswith("resnet18"))


def test_the_zoo_holds_at_least_fifteen_encoders():
    assert len(ZOO) >= 15


@pytest.mark.parametrize("name", ZOO)
def test_zoo_entry_states_its_terms_and_sources(name):
    data, entry = SHIPPED["models"][name], load_manifest()[name]
    assert "commercial" in data and "gated" in data, "terms stated, not defaulted"
    assert entry.licence.url.startswith("https://")
    assert {"license", "sha256"} <= set(entry.facts), "where the facts came from"
    assert entry.citation and entry.preprocessing.mpp and entry.params
    assert entry.licence.restricted == (entry.licence.gated or entry.licence.commercial
                                        is not True)
    for file in entry.weights:
        assert file.sha256 is None and file.reported is None, "nothing unverified as pinned"
        for source in file.sources:
            if source.is_hf:
                assert source.revision is None or re.fullmatch(r"[0-9a-f]{40}", source.revision)
                assert source.revision_note, "a revision's provenance, or why there is none"
            else:
                assert source.url.startswith("https://github.com/") and "/releases/download/" \
                    in source.url


@pytest.mark.parametrize("name", [n for n in ZOO if not n.startswith("lunit-") or "vit" in n])
def test_zoo_parameter_count_is_the_architectures(name):
    entry = load_manifest()[name]
    assert entry.params == parameter_count(entry.arch)


def test_lunit_resnet50_parameter_count():
    from histohub.hub._archs import build_encoder

    with torch.device("meta"):
        model = build_encoder("resnet50")
    count = sum(math.prod(p.shape) for p in model.parameters())
    assert load_manifest()["lunit-bt-rn50"].params == count == 23_508_032


# --------------------------------------------------------------------------- enforcement


@pytest.fixture
def restricted_model(file_server, tmp_path, monkeypatch):
    """A non-commercial ResNet18 served on 127.0.0.1; returns the server."""
    from _servers import serve_non_commercial

    manifest = serve_non_commercial(file_server, tmp_path, "nc-model")
    monkeypatch.setenv("HISTOHUB_MANIFEST", str(manifest))
    reload_manifests()
    yield file_server
    reload_manifests()


def test_non_commercial_model_is_refused_before_any_request(restricted_model):
    with pytest.raises(LicenceError) as caught:
        histohub.load_pretrained("nc-model", progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "CC-BY-NC-4.0" in message and "non-commercial" in message
    assert "accept_licence=True" in message and "--accept-licence" in message
    assert "HISTOHUB_ACCEPT_LICENCES=nc-model" in message
    assert restricted_model.requests == []


def test_accepting_once_loads_it_and_is_remembered(restricted_model):
    model = histohub.load_pretrained("nc-model", accept_licence=True, progress=False)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    assert len(restricted_model.gets()) == 1
    histohub.load_pretrained("nc-model", progress=False)  # remembered in HISTOHUB_HOME


@pytest.mark.parametrize("setting", ["nc-model", "CC-BY-NC-4.0", "other, nc-model"])
def test_the_setting_accepts_by_name_or_licence(restricted_model, monkeypatch, setting):
    monkeypatch.setenv("HISTOHUB_ACCEPT_LICENCES", setting)
    histohub.load_pretrained("nc-model", progress=False)


def test_an_architecture_alone_needs_no_acceptance(restricted_model):
    histohub.load_pretrained("nc-model", pretrained=False)
    assert restricted_model.requests == []


def test_cli_download_refuses_then_accepts(restricted_model, capsys):
    assert main(["download", "nc-model", "-q"]) == 2
    assert "--accept-licence" in capsys.readouterr().err
    assert restricted_model.requests == []
    assert main(["download", "nc-model", "-q", "--accept-licence"]) == 0
    assert len(restricted_model.gets()) == 1


def test_list_shows_terms_and_filters_commercial(restricted_model, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    for column in ("DIM", "INPUT", "MPP", "COMMERCIAL", "GATED", "LICENCE"):
        assert column in header
    assert re.search(r"^uni .* no +yes .*CC-BY-NC-ND-4\.0$", out, re.M)
    assert main(["list", "--commercial"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line
              and not line.startswith("*")}
    assert "nc-model" not in listed and "uni" not in listed
    assert {"h-optimus-0", "resnet18-ssl-mini"} <= listed
