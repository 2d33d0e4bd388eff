"""``histohub extract``: finding slides, per-slide failures, summary, skip and resume."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from histohub.featurefile._layout import read_features
from histohub.cli._extract import find_slides, output_names, register
from wsi_factory import tissue_image, write_slide


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="histohub")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slides")
    (root / "nested" / "deeper").mkdir(parents=True)
    write_slide(root / "a.tif", tissue_image(448, 672, [(0, 0, 672, 448)], seed=1), levels=1)
    write_slide(root / "nested" / "deeper" / "b.tif",
                tissue_image(448, 448, [(0, 0, 448, 448)], seed=2), levels=1)
    write_slide(root / "nested" / "blank.tif", np.full((448, 448, 3), 244, np.uint8), levels=1)
    (root / "nested" / "notes.svs").write_text("this is not a slide")
    (root / "readme.md").write_text("ignored: not a slide extension")
    return root


def test_find_slides_from_folders_globs_and_lists(slides, tmp_path):
    found, problems = find_slides([str(slides)])
    names = sorted(p.name for p in found)
    assert names == ["a.tif", "b.tif", "blank.tif", "notes.svs"] and not problems

    found, problems = find_slides([str(slides / "**" / "b*.tif"), str(slides / "none*.svs")])
    assert sorted(p.name for p in found) == ["b.tif", "blank.tif"]
    assert len(problems) == 1 and "none*.svs" in problems[0]

    listing = tmp_path / "list.csv"
    listing.write_text(f"case,slide_path\n1,{slides / 'a.tif'}\n2,{slides / 'missing.tif'}\n")
    found, problems = find_slides([str(listing)])
    assert [p.name for p in found] == ["a.tif"] and "missing.tif" in problems[0]

    no_header = tmp_path / "plain.csv"
    no_header.write_text(f"{slides / 'a.tif'},x\n")
    assert [p.name for p in find_slides([str(no_header)])[0]] == ["a.tif"]

    text = slides / "list.txt"  # relative paths are relative to the list's folder
    text.write_text("# slides to run\na.tif\n\nnested/deeper/b.tif\n")
    found, _ = find_slides([str(text), str(slides / "a.tif")])  # duplicates removed
    assert [p.name for p in found] == ["a.tif", "b.tif"]
    text.unlink()


def test_output_names_disambiguate_equal_stems(tmp_path):
    one, two, three = tmp_path / "x" / "s.svs", tmp_path / "y" / "s.svs", tmp_path / "t.svs"
    names = output_names([one, two, three])
    assert names[three] == "t" and names[one] != names[two]
    assert names[one].startswith("s-") and len(set(names.values())) == 3


def test_extract_end_to_end(slides, resnet18_file, tmp_path, capsys, caplog):
    out = tmp_path / "features"
    argv = [str(slides), "--model", str(resnet18_file), "--out", str(out), "--batch-size", "4",
            "--preview", "--quiet"]
    code = run_cli(["extract", *argv])
    assert code == 1  # notes.svs is not a slide; the others went on
    report = capsys.readouterr().out
    assert "slides: 3 extracted, 0 already done, 1 failed, 1 without tissue (blank.tif)" in report
    assert "patches: 10 written (10 processed now), 0 unreadable tiles skipped" in report
    assert "patches/s" in report and "notes.svs" in report and "not a slide" in report
    assert "no patch has" in caplog.text  # the blank slide's warning
    a, b = read_features(out / "a.h5"), read_features(out / "b.h5")
    assert a["features"].shape == (6, 512) and b["features"].shape == (4, 512)
    assert read_features(out / "blank.h5")["features"].shape == (0, 512)
    assert a["attrs"]["model_name"] == "random_resnet18" and len(a["attrs"]["model_sha256"]) == 64
    assert {p.name for p in out.glob("*.png")} == {"a.png", "b.png", "blank.png"}
    assert not list(out.glob("*.partial"))

    code = run_cli(["extract", *argv])  # again: everything finished is skipped
    assert "slides: 0 extracted, 3 already done, 1 failed" in capsys.readouterr().out


def test_extract_exempts_what_imports_made_from_garbage_collection(slides, resnet18_file,
                                                                   tmp_path, capsys):
    """The run freezes the objects alive before its threads start: full collection passes
    over them stalled a run's threads for 0.1-0.2 s."""
    import gc

    before = gc.get_freeze_count()
    assert run_cli(["extract", str(slides / "a.tif"), "--model", str(resnet18_file), "--out",
                    str(tmp_path), "--batch-size", "4", "--quiet"]) == 0
    assert gc.get_freeze_count() > before


def test_missing_mpp_message_names_the_option(tcga_slide, resnet18_file, tmp_path, caplog,
                                              capsys):
    out = tmp_path / "o"
    assert run_cli(["extract", str(tcga_slide), "--model", str(resnet18_file), "--out", str(out),
                    "--quiet"]) == 1
    assert "--mpp" in caplog.text
    assert run_cli(["extract", str(tcga_slide), "--model", str(resnet18_file), "--out", str(out),
                    "--mpp", "0.25", "--max-patches", "3", "--mask", "otsu", "--quiet"]) == 0
    attrs = read_features(out / f"{tcga_slide.stem}.h5")["attrs"]
    assert attrs["mask_method"] == "otsu" and attrs["level"] == 1 and attrs["n_patches"] == 3


def test_nothing_to_do_is_an_error(tmp_path, caplog):
    assert run_cli(["extract", str(tmp_path / "nothing*.svs"), "--out", str(tmp_path / "o"),
                    "--quiet"]) == 1
    assert "no slides to process" in caplog.text


def test_wired_into_the_histohub_command(tmp_path, monkeypatch, caplog):
    import histohub.cli as cli

    if "histohub.cli._extract" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "histohub.cli._extract"])
    assert cli.main(["extract", str(tmp_path / "none.svs"), "--out", str(tmp_path)]) == 1
    assert "no such file" in caplog.text


# --------------------------------------------------------------------------- nothing lost

def histohub_main(argv: list[str], monkeypatch) -> int:
    import histohub.cli as cli

    if "histohub.cli._extract" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "histohub.cli._extract"])
    return cli.main(argv)


@pytest.mark.parametrize(("option", "value", "allowed"), [
    ("--batch-size", "0", "an integer in [1, "), ("--batch-size", "-1", "an integer in [1, "),
    ("--max-patches", "-5", "an integer in [1, "), ("--workers", "-1", "an integer in [0, "),
    ("--target-mpp", "0", "[0.05, 50]"), ("--target-mpp", "nan", "[0.05, 50]"),
    ("--target-mpp", "inf", "[0.05, 50]"), ("--mpp", "0", "[0.05, 50]"),
    ("--mpp", "-1", "[0.05, 50]"), ("--mpp", "nan", "[0.05, 50]"), ("--mpp", "inf", "[0.05, 50]"),
    ("--min-foreground", "-0.1", "[0, 1]"), ("--min-foreground", "2", "[0, 1]")])
def test_bad_numbers_are_one_line_errors_before_anything(slides, tmp_path, monkeypatch, capsys,
                                                         option, value, allowed):
    """The model name cannot load: the option error comes first; --out is not even made."""
    out = tmp_path / "out"
    code = histohub_main(["extract", str(slides / "a.tif"), "--model", "no-such-model",
                          "--out", str(out), "--quiet", option, value], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{option} {value}: must be" in err and allowed in err
    assert not out.exists()


def test_a_clam_file_in_out_is_kept_and_the_others_go_on(slides, resnet18_file, tmp_path, capsys,
                                                            caplog):
    import h5py

    out = tmp_path / "features"
    out.mkdir()
    with h5py.File(out / "a.h5", "w") as f:  # CLAM's layout
        f["features"] = np.ones((3, 1024), np.float32)
    before = (out / "a.h5").read_bytes()
    argv = [str(slides / "a.tif"), str(slides / "nested" / "deeper" / "b.tif"), "--model",
            str(resnet18_file), "--out", str(out), "--batch-size", "4", "--quiet"]
    assert run_cli(["extract", *argv]) == 1
    assert f"{out / 'a.h5'}" in caplog.text and "--overwrite" in caplog.text
    assert (out / "a.h5").read_bytes() == before
    assert read_features(out / "b.h5")["features"].shape == (4, 512)
    assert "1 extracted, 0 already done, 1 failed" in capsys.readouterr().out
    assert run_cli(["extract", *argv, "--overwrite"]) == 0
    assert read_features(out / "a.h5")["features"].shape == (6, 512)


def test_a_trial_then_the_full_run(slides, resnet18_file, tmp_path, capsys, caplog):
    out = tmp_path / "o"
    argv = [str(slides / "a.tif"), "--model", str(resnet18_file), "--out", str(out), "--quiet"]
    assert run_cli(["extract", *argv, "--max-patches", "2"]) == 0
    assert run_cli(["extract", *argv]) == 0
    assert read_features(out / "a.h5")["attrs"]["n_patches"] == 6
    assert "2 of 6" in caplog.text
    assert "slides: 1 extracted, 0 already done" in capsys.readouterr().out.splitlines()[-4]


@pytest.mark.slow
def test_disk_full_fails_that_slide_cleanly_and_a_rerun_works(slides, resnet18_file, tmp_path,
                                                                 small_disk):
    """In a subprocess, as a user runs it: one line per failure, no traceback, no crash."""
    import subprocess
    import sys

    (tmp_path / "in").mkdir()
    big = write_slide(tmp_path / "in" / "big.tif",
                      tissue_image(1120, 1792, [(0, 0, 1792, 1120)], seed=5), levels=2)
    small = slides / "nested" / "deeper" / "b.tif"
    command = [sys.executable, "-m", "histohub", "extract", str(big), str(small), "--model",
               str(resnet18_file), "--batch-size", "8", "--quiet", "--out"]
    roomy = tmp_path / "roomy"
    assert subprocess.run([*command, str(roomy)], capture_output=True).returncode == 0
    sizes = {p.name: p.stat().st_size for p in roomy.glob("*.h5")}
    assert sizes["big.h5"] > 2 * sizes["b.h5"]  # 40 patches vs 4: one fits, the other not
    disk = small_disk((sizes["big.h5"] + sizes["b.h5"]) // 2)
    done = subprocess.run([*command, str(disk)], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Segmentation" not in done.stderr
    assert f"no space left on device at {disk}" in done.stderr + done.stdout
    assert "1 extracted, 0 already done, 1 failed" in done.stdout
    assert sorted(p.name for p in disk.iterdir() if not p.name.startswith(".")) == ["b.h5"]
    small_disk.resize(disk, 4 * sum(sizes.values()))
    again = subprocess.run([*command, str(disk)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "1 extracted, 1 already done, 0 failed" in again.stdout
    assert read_features(disk / "big.h5")["attrs"]["n_patches"] == 40
