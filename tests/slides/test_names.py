"""A slide is the name the user gave it (issue 25): links keep their own names in outputs,
logs, previews and feature-file attributes; no given slide is dropped from the summary."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from histohub.cli._extract import find_slides, register
from histohub.slides._names import broken_link, find_in_folder, given_path, same_files

h5py = pytest.importorskip("h5py")


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="histohub")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def all_attrs(path: Path) -> dict[str, object]:
    """Every attribute of the file, its groups and datasets, keyed ``object/name``."""
    found: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            for key, value in obj.attrs.items():
                found[f"{name}/{key}"] = value
        visit("", f)
        f.visititems(visit)
    return found


def as_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return " ".join(as_text(v) for v in value.ravel())
    return str(value)


@pytest.fixture
def linked(tmp_path, monkeypatch) -> Path:
    """``real/`` holds files; other folders link to them. The current folder is tmp_path."""
    (tmp_path / "real").mkdir()
    for name in ("a.svs", "b.svs"):
        (tmp_path / "real" / name).write_bytes(name.encode() * 100)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- the given path


def test_a_relative_link_keeps_its_name_and_folder(linked):
    (linked / "anon").mkdir()
    (linked / "anon" / "PSEUDO-001.svs").symlink_to(Path("..") / "real" / "a.svs")
    path = given_path("anon/PSEUDO-001.svs")
    assert path == linked / "anon" / "PSEUDO-001.svs" and path.is_absolute()
    assert path.stem == "PSEUDO-001" and path.is_file()


def test_an_absolute_link_and_a_chain_through_another_folder(linked):
    (linked / "hop").mkdir()
    (linked / "anon").mkdir()
    (linked / "hop" / "x.svs").symlink_to(linked / "real" / "a.svs")          # absolute
    (linked / "anon" / "P2.svs").symlink_to(Path("..") / "hop" / "x.svs")     # link -> link
    (linked / "anon" / "P3.svs").symlink_to("P2.svs")                         # chain of 3
    for name in ("P2", "P3"):
        path = given_path(f"anon/{name}.svs")
        assert path == linked / "anon" / f"{name}.svs"
        assert path.read_bytes() == (linked / "real" / "a.svs").read_bytes()


def test_dot_dot_after_a_linked_folder_names_the_file_the_system_opens(linked):
    (linked / "deep" / "er").mkdir(parents=True)
    (linked / "deep" / "er" / "a.svs").write_bytes(b"deep")
    (linked / "shortcut").symlink_to(linked / "deep" / "er")
    path = given_path("shortcut/../er/a.svs")   # the system reads deep/er/a.svs
    assert path.read_bytes() == b"deep" and path.name == "a.svs"
    assert given_path("real/../real/b.svs") == linked / "real" / "b.svs"  # plain folders


def test_a_broken_link_is_named_without_its_target(linked):
    (linked / "P9.svs").symlink_to(linked / "real" / "patient-smith.svs")
    message = broken_link("P9.svs")
    assert message.startswith("P9.svs: a symbolic link that leads to no file")
    assert "smith" not in message and "\n" not in message
    (linked / "loop1.svs").symlink_to("loop2.svs")
    (linked / "loop2.svs").symlink_to("loop1.svs")
    assert "loop" in broken_link("loop1.svs")
    assert broken_link("real/a.svs") is None and broken_link("absent.svs") is None


def test_same_files_groups_the_names_of_one_file(linked):
    names = [Path(f"s{i}.svs") for i in (1, 2, 3)]
    for name in names:
        name.symlink_to(linked / "real" / "a.svs")
    groups = same_files([*names, Path("real/b.svs"), Path("absent.svs")])
    assert groups == [names]


# --------------------------------------------------------------------------- finding slides


def test_links_to_one_file_are_three_slides_by_their_own_names(linked):
    (linked / "cohort").mkdir()
    for i in (1, 2, 3):
        (linked / "cohort" / f"s{i}.svs").symlink_to(linked / "real" / "a.svs")
    found, problems = find_slides(["cohort"])
    assert found == [linked / "cohort" / f"s{i}.svs" for i in (1, 2, 3)] and not problems
    # the same given path twice is one slide; a second name for one file is not
    found, _ = find_slides(["cohort", "cohort/s1.svs", str(linked / "cohort" / "s2.svs")])
    assert [p.name for p in found] == ["s1.svs", "s2.svs", "s3.svs"]


def test_a_linked_folder_is_searched_and_a_loop_is_not_followed(linked, caplog):
    (linked / "project").mkdir()
    (linked / "project" / "batch1").symlink_to(linked / "real")
    (linked / "project" / "batch1-again").symlink_to(linked / "real")
    (linked / "real" / "up").symlink_to(linked / "project")  # project/batch1/up -> project
    found, problems = find_in_folder(Path("project"), (".svs",))
    assert [str(p) for p in found] == ["project/batch1/a.svs", "project/batch1/b.svs",
                                       "project/batch1-again/a.svs", "project/batch1-again/b.svs"]
    assert not problems and "a link back to a folder above it" in caplog.text


def test_broken_links_are_reported_wherever_they_were_given(linked):
    (linked / "cohort").mkdir()
    (linked / "cohort" / "ok.svs").symlink_to(linked / "real" / "a.svs")
    (linked / "cohort" / "gone.svs").symlink_to(linked / "real" / "patient-smith.svs")
    (linked / "cohort" / "gone.txt").symlink_to(linked / "real" / "nothing.txt")  # not a slide
    listing = linked / "list.txt"
    listing.write_text("cohort/ok.svs\ncohort/gone.svs\n")
    for inputs in (["cohort"], ["cohort/gone.svs", "cohort/ok.svs"], [str(listing)]):
        found, problems = find_slides(inputs)
        assert [p.name for p in found] == ["ok.svs"], inputs
        assert len(problems) == 1 and "gone.svs: a symbolic link that leads to no file" \
            in problems[0], inputs
        assert "smith" not in problems[0]


# --------------------------------------------------------------------------- the two cases


@pytest.fixture
def real_slide(cmu_slide, tmp_path) -> Path:
    """The real slide, stored under a name that must not leak: real/a.svs."""
    (tmp_path / "real").mkdir()
    return Path(shutil.copy(cmu_slide, tmp_path / "real" / "a.svs"))


def test_a_pseudonymised_slide_leaves_no_trace_of_the_real_name(real_slide, resnet18_file,
                                                                 tmp_path, monkeypatch, capsys,
                                                                 caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "anon").mkdir()
    (tmp_path / "anon" / "PSEUDO-001.svs").symlink_to(Path("..") / "real" / "a.svs")
    code = run_cli(["extract", "anon/PSEUDO-001.svs", "--model", str(resnet18_file), "--out",
                    "out", "--max-patches", "2", "--batch-size", "2", "--preview", "--geojson",
                    "--quiet"])
    report = capsys.readouterr()
    assert code == 0, report
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["PSEUDO-001.geojson", "PSEUDO-001.h5", "PSEUDO-001.png"]  # no lock
    attrs = all_attrs(tmp_path / "out" / "PSEUDO-001.h5")
    assert attrs["/slide_name"] == "PSEUDO-001.svs"
    assert attrs["/slide_path"] == str(tmp_path / "anon" / "PSEUDO-001.svs")
    assert "/slide_resolved_path" not in attrs
    text = " ".join(as_text(v) for v in attrs.values())
    geojson = (tmp_path / "out" / "PSEUDO-001.geojson").read_text()
    for shown in (text, geojson, report.out, report.err, caplog.text):
        assert "a.svs" not in shown.replace("PSEUDO-001.svs", "")
        assert str(tmp_path / "real") not in shown
    assert "extracted: " in report.out and "PSEUDO-001.svs -> " in report.out

    # asked for: the resolved path is recorded, beside the given one
    assert run_cli(["extract", "anon/PSEUDO-001.svs", "--model", str(resnet18_file), "--out",
                    "out2", "--max-patches", "2", "--batch-size", "2", "--quiet",
                    "--record-resolved-path"]) == 0
    attrs = all_attrs(tmp_path / "out2" / "PSEUDO-001.h5")
    assert attrs["/slide_resolved_path"] == str(real_slide)
    assert attrs["/slide_name"] == "PSEUDO-001.svs"


def test_three_names_for_one_file_give_three_outputs_and_three_summary_lines(
        real_slide, resnet18_file, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for i in (1, 2, 3):
        (cohort / f"s{i}.svs").symlink_to(real_slide)
    (cohort / "s4.svs").symlink_to(tmp_path / "real" / "missing.svs")
    argv = ["extract", str(cohort), "--model", str(resnet18_file), "--out", str(tmp_path / "o"),
            "--max-patches", "2", "--batch-size", "2", "--quiet"]
    assert run_cli(argv) == 1   # s4 is a broken link
    report = capsys.readouterr().out
    assert "slides: 3 extracted, 0 already done, 1 failed" in report
    written = sorted(p.name for p in (tmp_path / "o").iterdir() if p.suffix == ".h5")
    assert written == ["s1.h5", "s2.h5", "s3.h5"]
    for i in (1, 2, 3):
        assert report.count(f"s{i}.svs") == 1
        assert f"extracted: {cohort / f's{i}.svs'} -> {tmp_path / 'o' / f's{i}.h5'}" in report
        assert all_attrs(tmp_path / "o" / f"s{i}.h5")["/slide_name"] == f"s{i}.svs"
    assert report.count("s4.svs") == 1 and "failed: " in report
    one_file = ", ".join(str(cohort / f"s{i}.svs") for i in (1, 2, 3))
    assert f"{one_file} are one file; each name gets its own output" in caplog.text

    assert run_cli(argv) == 1   # again: each name is already done, and said so once
    report = capsys.readouterr().out
    assert "slides: 0 extracted, 3 already done, 1 failed" in report
    for i in (1, 2, 3):
        assert report.count(f"already done: {cohort / f's{i}.svs'} -> ") == 1


def test_the_python_api_keeps_the_given_path(real_slide, resnet18_file, tmp_path, monkeypatch):
    from histohub.slides import SlideExtractor, SlideJob, Tiling, extract_slide

    monkeypatch.chdir(tmp_path)
    os.symlink(Path("real") / "a.svs", "P1.svs")
    result = extract_slide(resnet18_file, "P1.svs", "P1.h5", max_patches=1, progress=False)
    assert result.slide_path == Path("P1.svs")
    attrs = all_attrs(tmp_path / "P1.h5")
    assert attrs["/slide_path"] == str(tmp_path / "P1.svs") and "/slide_resolved_path" not in attrs
    with SlideExtractor(resnet18_file, progress=False) as extractor:  # asked for, per job
        jobs = [SlideJob(Path("P1.svs"), Path("P1r.h5"), record_resolved_path=True)]
        (result,) = extractor.extract_many(jobs, tiling=Tiling(max_patches=1))
    assert result.error is None
    attrs = all_attrs(tmp_path / "P1r.h5")
    assert attrs["/slide_resolved_path"] == str(real_slide)
    assert attrs["/slide_path"] == str(tmp_path / "P1.svs")


def test_a_pattern_matching_a_broken_link_reports_it(linked):
    (linked / "P1.svs").symlink_to(linked / "real" / "a.svs")
    (linked / "P2.svs").symlink_to(linked / "real" / "patient-smith.svs")
    found, problems = find_slides(["P*.svs"])
    assert found == [linked / "P1.svs"]
    assert problems == ["P2.svs: a symbolic link that leads to no file (its target is missing, "
                        "or the links form a loop); fix or remove the link"]


def test_a_resumed_file_is_named_by_the_call_that_resumes_it(tmp_path):
    """A partial file made by an older run (or with --record-resolved-path) keeps its
    features, but takes the names this call gives: no earlier name stays behind."""
    from histohub.featurefile._layout import IDENTITY_ATTRS
    from histohub.featurefile._writer import FeatureWriter

    identity = {key: 1 for key in IDENTITY_ATTRS}
    first = {**identity, "slide_path": "/data/real/a.svs", "slide_name": "a.svs",
             "slide_resolved_path": "/data/real/a.svs"}
    writer = FeatureWriter(tmp_path / "P1.h5", attrs=first, feature_dim=2)
    writer.append(np.ones((1, 2), np.float32), np.zeros((1, 2)), next_index=1)
    writer.close()
    now = {**identity, "slide_path": "/project/anon/P1.svs", "slide_name": "P1.svs"}
    writer = FeatureWriter(tmp_path / "P1.h5", attrs=now, feature_dim=2)
    assert writer.next_index == 1 and writer.n_patches == 1
    writer.finish()
    attrs = all_attrs(tmp_path / "P1.h5")
    assert attrs["/slide_path"] == "/project/anon/P1.svs" and attrs["/slide_name"] == "P1.svs"
    assert "/slide_resolved_path" not in attrs


def test_the_python_api_names_a_broken_link_without_its_target(tmp_path):
    from histohub.errors import SlideError
    from histohub.slides import open_slide

    link = tmp_path / "P7.svs"
    link.symlink_to(tmp_path / "patient-smith.svs")
    with pytest.raises(SlideError, match="P7.svs: a symbolic link that leads to no file") as info:
        open_slide(link)
    assert "smith" not in str(info.value)


def test_no_slide_code_follows_links_but_the_opt_in():
    """Slide paths are resolved in one place (``slides._names.resolved_path``, for
    ``--record-resolved-path``); the weights side (``hub/``, ``histohub pin``) may resolve
    its own files."""
    import histohub

    package = Path(histohub.__file__).parent
    allowed = {package / "slides" / "_names.py", package / "cli" / "_models.py"}
    offenders = []
    for source in package.rglob("*.py"):
        if source in allowed or (package / "hub") in source.parents:
            continue
        text = source.read_text(encoding="utf-8")
        offenders += [f"{source.relative_to(package)}: {word}"
                      for word in (".resolve(", "realpath(") if word in text]
    assert not offenders
