"""``histohub cluster`` (histohub/cli/cluster.py): the elbow, assignments and figures from
the command line, and one-line errors for careless inputs."""

from __future__ import annotations

import pytest

h5py = pytest.importorskip("h5py")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from feature_files import blobs, png, write_features  # noqa: E402


def run_cli(argv):
    import histohub.cli as cli

    if "histohub.cli._cluster" not in cli.COMMANDS:
        cli.COMMANDS.append("histohub.cli._cluster")
    return cli.main(["cluster", *argv])


def test_cli_elbow_assignments_and_figures(slide_features, tmp_path, capsys):
    out = tmp_path / "run"
    code = run_cli([str(slide_features.parent), "--k-range", "2:6", "--out", str(out),
                    "--clusters-to-show", "1,0", "--montage-size", "3", "--seed", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "explained variance" in printed
    chosen = int(printed.split("chosen k = ")[1].split(",")[0])
    with h5py.File(out / "clusters.h5") as handle:
        assert handle.attrs["k"] == chosen and handle.attrs["seed"] == 1
        for k, ev in zip(handle["elbow/k"][:], handle["elbow/explained_variance"][:]):
            assert f"{ev:.1%}" in printed.split(f"\n{k:>6}  ")[1].split("\n")[0]
    assert sorted(p.name for p in out.iterdir()) == [
        "assignments.csv", "clusters.h5", "elbow.csv", "elbow.png", "montage.png", "overlays"]
    assert png(out / "elbow.png").shape == (450, 700, 3)
    assert [p.name for p in (out / "overlays").iterdir()] == ["cmu.png"]
    code = run_cli([str(slide_features), "--k", "3", "--out", str(out), "--no-figures"])
    assert code == 0 and "k = 3: explained variance" in capsys.readouterr().out


def test_cli_errors(slide_features, tmp_path, capsys):
    with h5py.File(slide_features) as handle:
        n = len(handle["features"])
    assert run_cli([str(slide_features), "--k", str(n + 1), "--out", str(tmp_path)]) == 2
    assert f"impossible with {n} patches" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli([str(slide_features), "--k-range", "6:2", "--out", str(tmp_path)])
    assert "START:END" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli([str(slide_features), "--k", "3", "--k-range", "2:4", "--out", str(tmp_path)])
    assert run_cli([str(tmp_path / "nothing" / "*.h5"), "--k", "2", "--out", str(tmp_path)]) == 2
    assert "No feature files found" in capsys.readouterr().err


def test_cli_careless_inputs_are_one_line_errors(tmp_path, capsys):
    """Before, a missing file was a FileNotFoundError traceback, as were --max-memory
    nan/inf, --seed -1, --out naming a file, and a huge --montage-size (after allocating
    gigabytes); --slide-dir naming nothing and --min-explained 2 or -1 were accepted."""
    x, _ = blobs(2, 20, 4, seed=0)
    good = str(write_features(tmp_path / "good.h5", x))
    (tmp_path / "notes.txt").write_text("not hdf5")
    out = str(tmp_path / "out")
    for argv, says in [
        ([str(tmp_path / "missing.h5"), "--k", "2"], "missing.h5' does not exist"),
        ([str(tmp_path / "notes.txt"), "--k", "2"], "is not an HDF5 file"),
        ([good, "--k", "2", "--out", str(tmp_path / "notes.txt")], "notes.txt is a file"),
        ([good, "--k", "2", "--out", str(tmp_path / "notes.txt" / "sub")], "is a file"),
        ([good, "--k", "2", "--slide-dir", str(tmp_path / "nowhere")], "nowhere"),
        ([good, "--k", "2", "--montage-size", "100000"], "--montage-size"),
        ([good, "--k", "2", "--clusters-to-show", "1,2"], "ids [2] do not exist"),
    ]:
        code = run_cli([*argv, "--out", out] if "--out" not in argv else argv)
        err = capsys.readouterr().err
        assert code == 2 and says in err and err.count("\n") == 1, (argv, err)
    for option, value in [("--max-memory", "nan"), ("--max-memory", "inf"),
                          ("--max-memory", "-1"), ("--seed", "-1"), ("--seed", str(2 ** 32)),
                          ("--min-explained", "nan"), ("--min-explained", "2"),
                          ("--min-explained", "0"), ("--clusters-to-show", ","),
                          ("--clusters-to-show", "-1")]:
        k = ["--k-range", "2:4"] if option == "--min-explained" else ["--k", "2"]
        with pytest.raises(SystemExit) as caught:
            run_cli([good, *k, option, value, "--out", out])
        err = capsys.readouterr().err
        assert caught.value.code == 2 and f"argument {option}" in err, err
    assert not (tmp_path / "out").exists()
