"""The slide pipeline: slides into HDF5 feature files; resume, skip, refuse, disk full."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from histohub.featurefile._layout import is_complete, partial_path, read_features
from histohub.slides._extract import extract_slide
from histohub.hub._transforms import normalize_batch
from test_features import Tiny, reference
from wsi_factory import corrupt_tile, tissue_image, write_slide

TESTS = Path(__file__).resolve().parents[1]  # tests/: the helpers a child process imports


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """1792 x 1344 px at 0.5 um/px, 2 levels: 8 x 6 = 48 patches of 224 px, 30 with tissue."""
    image = tissue_image(1344, 1792, [(0, 0, 1344, 1120)], seed=3)
    return write_slide(tmp_path_factory.mktemp("slides") / "s.tif", image, mpp=0.5, levels=2)


# --------------------------------------------------------------------------- slides

def test_slide_to_hdf5_layout_and_values(cmu_slide, tmp_path):
    """Real slide, random ResNet18: the file is self-describing and its features are the
    model's output on the patches at the stated coordinates."""
    from histohub import load_pretrained
    from histohub.slides._reader import PatchReader, open_slide
    from histohub.slides._tiling import tile_grid

    model = load_pretrained("resnet18-ssl", pretrained=False)
    out = tmp_path / "cmu.h5"
    result = extract_slide(model, cmu_slide, out, batch_size=4, max_patches=6, progress=False)
    assert result.n_patches == 6 and is_complete(out) and not partial_path(out).exists()
    data = read_features(out)
    features, coords, attrs = data["features"], data["coords"], data["attrs"]
    assert features.shape == (6, 512) and features.dtype == np.float32
    assert coords.shape == (6, 2) and coords.dtype == np.int64
    for key, value in {"model_name": "resnet18-ssl", "arch": "resnet18", "feature_dim": 512,
                       "level": 0, "patch_size": 224, "read_size": 224,
                       "patch_size_level0": 224, "target_mpp": 0.5, "slide_mpp": 0.499,
                       "slide_width": 2220, "slide_height": 2967, "mask_method": "contours",
                       "min_foreground": 0.5, "completed": True, "n_failed": 0}.items():
        assert attrs[key] == value, key
    assert attrs["slide_path"] == os.path.abspath(cmu_slide)  # as given, links not followed
    assert attrs["histohub_version"] and len(attrs["grid_sha256"]) == 64
    with open_slide(cmu_slide) as slide:
        grid = tile_grid(slide, target_mpp=0.5, method="contours")  # extraction's default
    np.testing.assert_array_equal(coords, grid.coords[:6])
    reader = PatchReader(grid)
    pixels = torch.from_numpy(np.stack([reader.read(i) for i in range(6)])).permute(0, 3, 1, 2)
    expected = reference(model, normalize_batch(pixels, "resnet18-ssl"))
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_worker_processes_give_the_same_file(slide, tmp_path):
    threaded = extract_slide(Tiny(), slide, tmp_path / "a.h5", batch_size=8, progress=False)
    workers = extract_slide(Tiny(), slide, tmp_path / "b.h5", batch_size=8, num_workers=1,
                            progress=False)
    a, b = read_features(threaded.output), read_features(workers.output)
    assert threaded.n_patches == 30
    np.testing.assert_array_equal(a["coords"], b["coords"])
    np.testing.assert_array_equal(a["features"], b["features"])


def test_resume_after_failure_equals_uninterrupted_run(slide, tmp_path):
    full = extract_slide(Tiny(), slide, tmp_path / "full.h5", batch_size=4, progress=False)

    out = tmp_path / "resumed.h5"
    with pytest.raises(RuntimeError, match="killed"):
        # call 1 probes the feature size, calls 2-4 write 3 batches, call 5 dies
        extract_slide(Tiny(fail_at=5), slide, out, batch_size=4, progress=False)
    assert not out.exists() and partial_path(out).exists()
    assert read_features(partial_path(out))["features"].shape[0] == 12
    model = Tiny()
    resumed = extract_slide(model, slide, out, batch_size=4, progress=False)
    assert resumed.resumed_at == 12 and resumed.patches_run == 30 - 12 and model.calls == 1 + 5
    a, b = read_features(full.output), read_features(out)
    np.testing.assert_array_equal(a["coords"], b["coords"])
    np.testing.assert_array_equal(a["features"], b["features"])
    assert b["attrs"]["completed"] and b["attrs"]["n_patches"] == 30


@pytest.mark.slow
def test_resume_after_sigkill(slide, tmp_path):
    """A real kill -9 between (or during) batch writes; the resumed file equals a clean run."""
    out = tmp_path / "killed.h5"
    script = textwrap.dedent(f"""
        import time
        from test_features import Tiny
        from histohub.slides._extract import extract_slide

        class Slow(Tiny):
            def forward(self, x):
                print(self.calls, flush=True)  # the parent counts batches
                time.sleep(0.05)
                return super().forward(x)

        extract_slide(Slow(), {str(slide)!r}, {str(out)!r}, batch_size=2, progress=False)
    """)
    # the child imports Tiny from this folder, as pytest's import path has it
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": path})
    try:
        for line in process.stdout:  # calls: a probe, then one per batch of 2
            if int(line) >= 6:
                break
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
        process.stdout.close()
    assert not out.exists()
    resumed = extract_slide(Tiny(), slide, out, batch_size=2, progress=False)
    full = extract_slide(Tiny(), slide, tmp_path / "full.h5", batch_size=2, progress=False)
    assert resumed.resumed_at < 30 and resumed.resumed_at % 2 == 0
    a, b = read_features(full.output), read_features(out)
    np.testing.assert_array_equal(a["coords"], b["coords"])
    np.testing.assert_array_equal(a["features"], b["features"])


def test_finished_slides_are_skipped_unless_overwrite(slide, tmp_path):
    out = tmp_path / "s.h5"
    extract_slide(Tiny(), slide, out, batch_size=16, progress=False)
    stamp = out.stat().st_mtime_ns
    model = Tiny()
    again = extract_slide(model, slide, out, batch_size=16, progress=False)
    assert again.skipped and again.n_patches == 30 and model.calls == 0
    assert out.stat().st_mtime_ns == stamp
    redone = extract_slide(model, slide, out, batch_size=16, overwrite=True, progress=False)
    assert not redone.skipped and model.calls == 1 + 2 and out.stat().st_mtime_ns != stamp


def test_partial_file_from_other_settings_is_started_over(slide, tmp_path, caplog):
    out = tmp_path / "s.h5"

    with pytest.raises(RuntimeError):
        extract_slide(Tiny(fail_at=3), slide, out, batch_size=8, progress=False)
    result = extract_slide(Tiny(), slide, out, batch_size=8, min_foreground=0.25,
                           progress=False)
    assert result.resumed_at == 0 and "starting over" in caplog.text
    assert read_features(out)["attrs"]["min_foreground"] == 0.25


@pytest.mark.parametrize("readers", [{}, {"num_workers": 1}])  # a thread; a process
def test_corrupt_tile_is_recorded_and_skipped(tmp_path, readers):
    image = tissue_image(1024, 1024, [(0, 0, 1024, 1024)], seed=4)
    path = write_slide(tmp_path / "c.tif", image, mpp=0.5, levels=2)
    corrupt_tile(path, level=0, x=600, y=100)  # tile x 512-767, y 0-255; the mask uses level 1
    result = extract_slide(Tiny(), path, tmp_path / "c.h5", batch_size=4, progress=False,
                           **readers)  # a worker reads 2 batches as one item (4 in all)
    data = read_features(result.output)
    failed = {tuple(c) for c in data["failed_coords"].tolist()}
    # patches of 224 px overlapping that tile: x in {448, 672}, y in {0, 224}
    assert failed == {(448, 0), (672, 0), (448, 224), (672, 224)}
    assert result.n_failed == 4 and result.n_patches == 16 - 4
    assert not failed & {tuple(c) for c in data["coords"].tolist()}
    assert data["attrs"]["n_failed"] == 4 and data["attrs"]["completed"]


def test_nonfinite_features_kept_out_and_recorded(slide, tmp_path, caplog):
    class Poisoned(Tiny):
        def forward(self, x):
            out = super().forward(x)
            out[::5] = float("inf")
            return out

    result = extract_slide(Poisoned(), slide, tmp_path / "p.h5", batch_size=10, progress=False)
    data = read_features(result.output)
    assert result.n_nonfinite == 6 and len(data["nonfinite_coords"]) == 6
    assert np.isfinite(data["features"]).all() and len(data["features"]) == 24
    assert "NaN/inf" in caplog.text


def test_no_tissue_gives_an_empty_file_and_a_warning(tmp_path, caplog):
    blank = write_slide(tmp_path / "blank.tif", np.full((900, 900, 3), 244, np.uint8), levels=1)
    result = extract_slide(Tiny(), blank, tmp_path / "blank.h5", progress=False)
    assert result.n_patches == 0 and result.warnings and "no patch" in caplog.text
    data = read_features(result.output)
    assert data["features"].shape == (0, 6) and data["attrs"]["completed"]


def test_missing_mpp_needs_the_user(tcga_slide, tmp_path):
    from histohub.errors import SlideError

    with pytest.raises(SlideError, match="mpp"):
        extract_slide(Tiny(), tcga_slide, tmp_path / "t.h5", progress=False)
    result = extract_slide(Tiny(), tcga_slide, tmp_path / "t.h5", mpp=0.25, max_patches=5,
                           preview=tmp_path / "t.png", progress=False)
    assert result.n_patches == 5 and (tmp_path / "t.png").is_file()
    assert read_features(result.output)["attrs"]["mpp_source"] == "user"


# --------------------------------------------------------------------------- nothing lost

def clam_file(path: Path) -> bytes:
    """A feature file another tool wrote (CLAM's layout, no histohub attributes)."""
    import h5py

    with h5py.File(path, "w") as f:
        f["features"] = np.ones((5, 1024), np.float32)
        f["coords"] = np.zeros((5, 2), np.int64)
    return path.read_bytes()


def test_a_file_histohub_did_not_write_is_never_replaced(slide, tmp_path):
    from histohub.errors import OutputExistsError

    out = tmp_path / "s.h5"
    before = clam_file(out)
    with pytest.raises(OutputExistsError, match=r"not written by histohub.*--overwrite") as info:
        extract_slide(Tiny(), slide, out, progress=False)
    assert str(out) in str(info.value) and isinstance(info.value, FileExistsError)
    assert out.read_bytes() == before and not partial_path(out).exists()

    text = tmp_path / "t.h5"  # not even HDF5
    text.write_text("my notes")
    with pytest.raises(OutputExistsError, match="not written by histohub"):
        extract_slide(Tiny(), slide, text, progress=False)
    assert text.read_text() == "my notes"

    clam_file(partial_path(tmp_path / "u.h5"))  # someone else's HDF5 under the partial name
    with pytest.raises(OutputExistsError, match="not written by histohub"):
        extract_slide(Tiny(), slide, tmp_path / "u.h5", progress=False)

    replaced = extract_slide(Tiny(), slide, out, overwrite=True, progress=False)
    assert replaced.n_patches == 30 and is_complete(out)


def test_a_trial_run_is_not_taken_for_the_full_run(slide, tmp_path, caplog):
    from histohub.errors import OutputExistsError

    out = tmp_path / "s.h5"
    trial = extract_slide(Tiny(), slide, out, max_patches=3, progress=False)
    assert trial.n_patches == 3 and read_features(out)["attrs"]["truncated"]
    full = extract_slide(Tiny(), slide, out, batch_size=8, progress=False)
    assert not full.skipped and full.n_patches == 30 and "3 of 30" in caplog.text
    attrs = read_features(out)["attrs"]
    assert attrs["n_patches"] == 30 and not attrs["truncated"] and attrs["max_patches"] == 0

    again = extract_slide(Tiny(), slide, out, max_patches=100, progress=False)
    assert again.skipped and again.n_patches == 30  # asks for no fewer than the file holds
    with pytest.raises(OutputExistsError, match="30 patches.*max_patches=3"):
        extract_slide(Tiny(), slide, out, max_patches=3, progress=False)  # kept, not shrunk
    assert read_features(out)["attrs"]["n_patches"] == 30


def test_done_means_same_slide_same_weights_same_tiling(slide, tmp_path):
    from histohub.errors import OutputExistsError

    out = tmp_path / "s.h5"
    extract_slide(Tiny(), slide, out, progress=False)
    before = out.read_bytes()

    moved = tmp_path / "elsewhere" / "s.tif"  # the same file, moved: still done
    moved.parent.mkdir()
    moved.write_bytes(slide.read_bytes())
    assert extract_slide(Tiny(), moved, out, progress=False).skipped

    (tmp_path / "other").mkdir()
    other = write_slide(tmp_path / "other" / "s.tif",  # another slide, the same name
                        tissue_image(1344, 1792, [(0, 0, 1792, 1344)], seed=9), levels=2)
    with pytest.raises(OutputExistsError, match="slide_fingerprint"):
        extract_slide(Tiny(), other, out, progress=False)
    retrained = Tiny()
    with torch.no_grad():
        retrained.conv.bias += 1
    with pytest.raises(OutputExistsError, match="model_fingerprint"):
        extract_slide(retrained, slide, out, progress=False)
    with pytest.raises(OutputExistsError, match="min_foreground"):
        extract_slide(Tiny(), slide, out, min_foreground=0.2, progress=False)
    with pytest.raises(OutputExistsError, match="mask_method"):
        extract_slide(Tiny(), slide, out, mask="otsu", progress=False)
    with pytest.raises(OutputExistsError, match="target_mpp"):
        extract_slide(Tiny(), slide, out, target_mpp=1.0, progress=False)
    assert out.read_bytes() == before  # nothing replaced

    redone = extract_slide(Tiny(), other, out, overwrite=True, progress=False)
    assert redone.n_patches == 48 and read_features(out)["attrs"]["slide_path"] == str(other)


BAD_OPTIONS = [
    ({"batch_size": 0}, r"batch_size=0: must be an integer in \[1, \d+\]"),
    ({"batch_size": -1}, "batch_size=-1"),
    ({"batch_size": 2.5}, "batch_size=2.5"),
    ({"max_patches": -5}, r"max_patches=-5: must be None or an integer in \[1, 2147483647\]"),
    ({"max_patches": 0}, "max_patches=0"),
    ({"num_workers": -1}, r"num_workers=-1: must be an integer in \[0, \d+\]"),
    ({"target_mpp": 0.0}, r"target_mpp=0: must be None or a number in \[0.05, 50\]"),
    ({"target_mpp": float("nan")}, "target_mpp=nan"),
    ({"target_mpp": float("inf")}, "target_mpp=inf"),
    ({"mpp": 0.0}, "mpp=0"),
    ({"mpp": -1.0}, "mpp=-1"),
    ({"mpp": float("nan")}, "mpp=nan"),
    ({"mpp": float("inf")}, "mpp=inf"),
    ({"min_foreground": 1.5}, r"min_foreground=1.5: must be a number in \[0, 1\]"),
    ({"min_foreground": float("nan")}, "min_foreground=nan"),
    ({"mask": "edges"}, "mask='edges': must be one of 'contours', 'hsv', 'otsu'"),
    ({"amp": "int8"}, "amp='int8'"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_bad_options_are_refused_before_anything_runs(slide, tmp_path, options, message):
    """A name that cannot load: the option error must come first, and nothing is written."""
    from histohub.errors import OptionError

    with pytest.raises(OptionError, match=message) as info:
        extract_slide("no-such-model", slide, tmp_path / "out" / "s.h5", progress=False,
                      **options)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)
    assert not (tmp_path / "out").exists()


def test_tile_grid_rejects_nan_and_inf(slide):
    from histohub.errors import OptionError
    from histohub.slides._reader import open_slide
    from histohub.slides._tiling import tile_grid

    with open_slide(slide) as opened:
        for options in ({"target_mpp": float("nan")}, {"target_mpp": 0.5, "patch_size": 0},
                        {"target_mpp": 0.5, "min_foreground": float("nan")},
                        {"target_mpp": 0.5, "mpp_override": float("inf")}):
            with pytest.raises(OptionError):
                tile_grid(opened, **options)


def test_resuming_with_other_weights_starts_over(slide, tmp_path, caplog):
    """A partial file from model A is never completed with model B (same class, same name)."""
    out = tmp_path / "s.h5"
    with pytest.raises(RuntimeError, match="killed"):
        extract_slide(Tiny(fail_at=5), slide, out, batch_size=4, progress=False)
    other = Tiny()
    with torch.no_grad():
        other.conv.weight.mul_(-1)
    resumed = extract_slide(other, slide, out, batch_size=4, progress=False)
    assert resumed.resumed_at == 0 and "model_fingerprint" in caplog.text
    clean = extract_slide(other, slide, tmp_path / "clean.h5", batch_size=4, progress=False)
    np.testing.assert_array_equal(read_features(out)["features"],
                                  read_features(clean.output)["features"])
    assert read_features(out)["attrs"]["model_fingerprint"] == \
        read_features(clean.output)["attrs"]["model_fingerprint"]


class Wide(Tiny):
    """Tiny with 6000 features (24 kB a row): fills a small disk within a few batches."""

    def forward(self, x):
        return super().forward(x).repeat(1, 1000)


def test_disk_full_is_one_clear_error_and_a_rerun_just_works(slide, tmp_path, small_disk,
                                                              caplog):
    from histohub.errors import DiskFullError

    disk = small_disk(256 * 1024)
    out = disk / "s.h5"
    with pytest.raises(DiskFullError, match=f"no space left on device at {disk}") as info:
        extract_slide(Wide(), slide, out, batch_size=4, progress=False)
    assert isinstance(info.value, OSError) and "\n" not in str(info.value)
    assert not out.exists() and not partial_path(out).exists()  # the space is given back
    small_disk.resize(disk, 8 * 2**20)
    done = extract_slide(Wide(), slide, out, batch_size=4, progress=False)
    assert done.n_patches == 30 and is_complete(out)


def test_a_partial_file_that_cannot_be_resumed_is_discarded(slide, tmp_path, caplog):
    """What a full disk left behind before: chunks past the end of the file."""
    import h5py

    out = tmp_path / "s.h5"
    with pytest.raises(RuntimeError, match="killed"):
        extract_slide(Tiny(fail_at=5), slide, out, batch_size=4, progress=False)
    partial = partial_path(out)
    with h5py.File(partial, "r") as f:
        chunk = f["features"].id.get_chunk_info(0)
    with open(partial, "r+b") as f:  # cut the file where the chunk starts, as the full disk
        f.truncate(chunk.byte_offset)  # did, and record that end in the superblock (v0:
        assert f.read(9)[8] == 0       # end-of-file address at byte 40)
        f.seek(40)
        f.write(int(chunk.byte_offset).to_bytes(8, "little"))
    result = extract_slide(Tiny(), slide, out, batch_size=4, progress=False)
    assert result.resumed_at == 0 and result.n_patches == 30
    assert "cannot be resumed" in caplog.text and str(partial) in caplog.text

    broken = partial_path(tmp_path / "again.h5")  # killed while being created
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    assert extract_slide(Tiny(), slide, tmp_path / "again.h5", progress=False).n_patches == 30
    assert str(broken) in caplog.text


# --------------------------------------------------------------------------- cohorts

def test_a_cohort_gives_the_files_of_slide_by_slide_calls(slide, tmp_path, caplog):
    """One SlideExtractor over several slides (the next one prepared in the background):
    the same files as extract_slide slide by slide; a bad slide is reported, the rest go on."""
    from histohub.errors import SlideError
    from histohub.slides._extract import SlideExtractor, SlideJob, Tiling

    other = write_slide(tmp_path / "o.tif", tissue_image(896, 1120, [(0, 0, 1120, 672)],
                                                         seed=5), levels=1)
    (tmp_path / "bad.svs").write_text("not a slide")
    jobs = [SlideJob(slide, tmp_path / "many" / "s.h5"),
            SlideJob(tmp_path / "bad.svs", tmp_path / "many" / "bad.h5"),
            (other, tmp_path / "many" / "o.h5", tmp_path / "many" / "o.png")]
    model = Tiny()
    with SlideExtractor(model, batch_size=8, progress=False) as extractor:
        results = list(extractor.extract_many(jobs, tiling=Tiling(min_foreground=0.4)))
        again = list(extractor.extract_many(jobs[:1], tiling=Tiling(min_foreground=0.4)))
    assert [r.error is None for r in results] == [True, False, True]
    assert isinstance(results[1].error, SlideError) and "not a slide" in caplog.text
    assert (tmp_path / "many" / "o.png").is_file() and again[0].skipped
    for result in (results[0], results[2]):
        single = extract_slide(Tiny(), result.slide_path, tmp_path / "one" /
                               result.output.name, batch_size=8, min_foreground=0.4,
                               progress=False)
        a, b = read_features(result.output), read_features(single.output)
        np.testing.assert_array_equal(a["features"], b["features"])
        np.testing.assert_array_equal(a["coords"], b["coords"])
        assert result.n_patches == single.n_patches > 0


def test_compile_auto_compiles_once_for_a_big_enough_job(slide, tmp_path, monkeypatch):
    """compile='auto' on a CPU: nothing for a small job; once, for the whole cohort, when
    the slides together hold COMPILE_MIN_PATCHES; never again for the next slide."""
    import histohub.hub._runner as model_runner
    from histohub.slides._extract import SlideExtractor

    compiled = []

    def fake_compile(model, **options):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    jobs = [(slide, tmp_path / f"{i}.h5") for i in range(3)]
    extractor = SlideExtractor(Tiny(), batch_size=8, progress=False)
    list(extractor.extract_many(jobs[:1]))
    assert compiled == [] and extractor.runner.compiled is None  # 30 patches: not worth it
    monkeypatch.setattr(model_runner, "COMPILE_MIN_PATCHES", 60)  # 3 slides x 30 patches
    extractor = SlideExtractor(Tiny(), batch_size=8, progress=False)
    results = list(extractor.extract_many(jobs[1:] + [(slide, tmp_path / "3.h5")]))
    assert len(compiled) == 1 and extractor.runner.compiled is not None
    assert all(r.error is None and r.n_patches == 30 for r in results)
    assert extractor.runner.compile_mode == "auto"


def test_a_slide_finished_elsewhere_meanwhile_is_not_written_again(slide, tmp_path,
                                                                    monkeypatch):
    """Prepared as 'to do', then finished by another process before the lock is taken: the
    check under the lock finds it done."""
    import histohub.slides._extract as slide_features

    out = tmp_path / "s.h5"
    take_lock, stamps = slide_features.output_lock, []

    def another_process_first(path):
        if not stamps:  # "another process" finishes the slide just before our lock
            stamps.append(None)
            extract_slide(Tiny(), slide, out, batch_size=16, progress=False)
            stamps.append(out.stat().st_mtime_ns)
        return take_lock(path)

    monkeypatch.setattr(slide_features, "output_lock", another_process_first)
    model = Tiny()
    result = extract_slide(model, slide, out, batch_size=16, progress=False)
    assert result.skipped and result.patches_run == 0 and model.calls == 0
    assert out.stat().st_mtime_ns == stamps[-1]
