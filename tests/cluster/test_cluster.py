"""Clustering of extracted features (paper section 5.3, Figs. 5 and 6): k-means, the elbow,
saved assignments, the montage and the overlays, on synthetic blobs and on the real
CMU-1-Small-Region slide (features: colour statistics of each real 224 px patch)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from feature_files import PATCH, blobs, png, write_features  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from histohub import cluster  # noqa: E402
from histohub.cluster import ClusteringError, FeatureFileError  # noqa: E402
from histohub.cluster import _store as store  # noqa: E402


@pytest.fixture
def two_files(tmp_path):
    """Four blobs split unevenly over two files (70 + 130 rows)."""
    x, truth = blobs(4, 50, 8, seed=1)
    a = write_features(tmp_path / "a.h5", x[:70])
    b = write_features(tmp_path / "b.h5", x[70:])
    return [a, b], x, truth


# ------------------------------------------------------------------ k-means and the maths


def check_against_numpy(result, x):
    """Labels, distances, inertia and explained variance against a NumPy transcription."""
    d2 = ((x[:, None, :].astype(np.float64) - result.centers[None].astype(np.float64)) ** 2
          ).sum(-1)
    np.testing.assert_array_equal(result.labels, d2.argmin(1))
    np.testing.assert_allclose(result.distances, d2.min(1), rtol=1e-4, atol=1e-4)
    tss = ((x.astype(np.float64) - x.astype(np.float64).mean(0)) ** 2).sum()
    assert result.total_sum_of_squares == pytest.approx(tss, rel=1e-9)
    assert result.explained_variance == pytest.approx(1 - d2.min(1).sum() / tss, rel=1e-5)


def test_kmeans_recovers_separable_groups(two_files):
    paths, x, truth = two_files
    result = cluster.fit_kmeans(paths, 4, seed=0, progress=False)
    assert result.centers.shape == (4, 8)
    assert adjusted_rand_score(truth, result.labels) == 1.0
    assert result.explained_variance > 0.99
    check_against_numpy(result, x)
    # Rows keep their origin: file, index inside it, coordinates.
    np.testing.assert_array_equal(result.file_index, [0] * 70 + [1] * 130)
    np.testing.assert_array_equal(result.index, list(range(70)) + list(range(130)))
    np.testing.assert_array_equal(result.coords[70:, 0], np.arange(130) * PATCH)
    # Nearest patches: in their cluster, closest first.
    rows = result.nearest(2, 5)
    assert (result.labels[rows] == 2).all()
    assert np.all(np.diff(result.distances[rows]) >= 0)
    assert result.distances[rows[0]] == result.distances[result.labels == 2].min()


def test_streaming_matches_in_memory(two_files, monkeypatch):
    """Above the memory limit, features are streamed in blocks (partial_fit) and never
    loaded at once; the clustering and the statistics are the same."""
    paths, x, truth = two_files
    monkeypatch.setattr(store, "BLOCK_ROWS", 32)  # many blocks, straddling files
    loaded = []
    original = store.FeatureStore.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        loaded.append(self.array)

    monkeypatch.setattr(store.FeatureStore, "__init__", spy)
    streamed = cluster.fit_kmeans(paths, 4, seed=0, batch_size=16, max_memory_bytes=0,
                                  progress=False)
    assert loaded == [None]
    assert adjusted_rand_score(truth, streamed.labels) == 1.0
    check_against_numpy(streamed, x)
    in_memory = cluster.fit_kmeans(paths, 4, seed=0, progress=False)
    assert streamed.total_sum_of_squares == pytest.approx(in_memory.total_sum_of_squares,
                                                          rel=1e-12)


def test_seed_makes_runs_repeatable(two_files):
    paths, _, _ = two_files
    x, _ = blobs(3, 40, 5, seed=7, spread=3.0)  # overlapping: the seed matters
    path = write_features(paths[0].parent / "c.h5", x)
    first = cluster.fit_kmeans([path], 6, seed=3, progress=False)
    again = cluster.fit_kmeans([path], 6, seed=3, progress=False)
    np.testing.assert_array_equal(first.centers, again.centers)


def chord_distance_elbow(ks, ev):
    """Plain transcription: the point farthest (perpendicular distance) above the line
    through the first and last points, after scaling both axes to [0, 1]."""
    x = (np.asarray(ks, float) - ks[0]) / (ks[-1] - ks[0])
    y = (np.asarray(ev, float) - ev[0]) / (ev[-1] - ev[0])
    (x0, y0), (x1, y1) = (x[0], y[0]), (x[-1], y[-1])
    signed = ((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)) / math.hypot(x1 - x0, y1 - y0)
    return ks[int(np.argmax(signed))]


def test_choose_k_is_the_point_farthest_above_the_chord():
    assert cluster.choose_k([1, 2, 3, 4, 5], [0.0, 0.6, 0.8, 0.9, 1.0]) == 2
    assert cluster.choose_k([5, 1, 3], [1.0, 0.0, 0.9]) == 3  # order of input irrelevant
    rng = np.random.default_rng(0)
    for _ in range(200):
        ks = np.sort(rng.choice(np.arange(2, 200), size=rng.integers(3, 12), replace=False))
        ev = np.sort(rng.uniform(0, 1, size=len(ks)))
        ev[-1] += 0.01
        assert cluster.choose_k(ks, ev) == chord_distance_elbow(ks, ev)
    assert cluster.choose_k([2, 3, 4], [0.5, 0.5, 0.5]) == 2  # flat: the smallest k
    with pytest.raises(ClusteringError, match="at least three"):
        cluster.choose_k([2, 3], [0.1, 0.2])


def test_elbow_finds_the_number_of_blobs(tmp_path):
    x, truth = blobs(5, 60, 10, seed=2)
    path = write_features(tmp_path / "blobs.h5", x)
    curve = cluster.elbow([path], range(2, 11), seed=0, progress=False)
    assert curve.ks == tuple(range(2, 11))
    assert curve.chosen_k == 5
    assert np.all(np.diff(curve.explained_variance[:4]) > 0.05)  # clear gains up to 5
    assert curve.explained_variance[3] > 0.99
    result = curve.results[5]
    assert adjusted_rand_score(truth, result.labels) == 1.0
    assert result.explained_variance == pytest.approx(curve.explained_variance[3])
    target = cluster.elbow([path], range(2, 11, 2), min_explained=0.95, progress=False)
    assert target.chosen_k == 6  # 2, 4 < 95% <= 6
    with pytest.raises(ClusteringError, match="explains 100.0%"):
        cluster.elbow([path], [2, 3], min_explained=1.0, progress=False)


# ------------------------------------------------------------------ saving


def test_assignments_round_trip(two_files, tmp_path):
    paths, x, _ = two_files
    curve = cluster.elbow(paths, [2, 3, 4, 5], progress=False)
    result = curve.results[curve.chosen_k]
    out = tmp_path / "out"
    h5_path, csv_path = cluster.save_clusters(result, out, curve=curve)
    assert sorted(p.name for p in out.iterdir()) == ["assignments.csv", "clusters.h5"]
    loaded = cluster.load_clusters(h5_path)
    for name in ("centers", "labels", "distances", "file_index", "index", "coords"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(result, name))
    assert loaded.files == result.files
    assert loaded.explained_variance == pytest.approx(result.explained_variance)
    with h5py.File(h5_path) as handle:
        np.testing.assert_array_equal(handle["elbow/k"][:], [2, 3, 4, 5])
        assert handle["elbow"].attrs["chosen_k"] == curve.chosen_k
    with open(csv_path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 200
    assert rows[70] == {"file": str(paths[1]), "index": "0", "x": "0", "y": "0",
                        "cluster": str(result.labels[70]),
                        "distance": f"{result.distances[70]:.6g}"}
    np.testing.assert_array_equal([int(r["cluster"]) for r in rows], result.labels)


def test_failed_write_leaves_no_partial_file(two_files, tmp_path, monkeypatch):
    paths, _, _ = two_files
    result = cluster.fit_kmeans(paths, 2, progress=False)
    out = tmp_path / "out"
    cluster.save_clusters(result, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*_):
        raise OSError("disk full")

    monkeypatch.setattr(csv, "writer", full_disk)
    with pytest.raises(OSError, match="disk full"):
        cluster.save_clusters(cluster.fit_kmeans(paths, 3, progress=False), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old pair intact


# ------------------------------------------------------------------ bad input


def test_bad_inputs_give_clear_errors(tmp_path):
    good = write_features(tmp_path / "good.h5", np.ones((5, 4)))
    no_features = tmp_path / "nofeat.h5"
    with h5py.File(no_features, "w") as handle:
        handle["coords"] = np.zeros((5, 2), np.int64)
    with pytest.raises(FeatureFileError, match="no dataset 'features'.*holds: coords"):
        cluster.read_feature_files([no_features])
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(FeatureFileError, match="not an HDF5 file"):
        cluster.read_feature_files([text])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cluster.read_feature_files([tmp_path / "missing.h5"])
    wide = write_features(tmp_path / "wide.h5", np.ones((5, 6)))
    with pytest.raises(FeatureFileError, match="dimensions differ.*good.h5: D=4; wide.h5: D=6"):
        cluster.read_feature_files([good, wide])
    other = write_features(tmp_path / "other.h5", np.ones((5, 4)), model_name="imagenet")
    with pytest.raises(FeatureFileError, match="different models"):
        cluster.read_feature_files([good, other])
    short = write_features(tmp_path / "short.h5", np.ones((5, 4)), coords=np.zeros((4, 2)))
    with pytest.raises(FeatureFileError, match=r"'coords' must have shape \(5, 2\)"):
        cluster.read_feature_files([short])
    with pytest.raises(ClusteringError, match="k=9 clusters is impossible with 5 patches"):
        cluster.fit_kmeans([good], 9, progress=False)
    with pytest.raises(ClusteringError, match="k=6 clusters is impossible"):
        cluster.elbow([good], range(2, 7), progress=False)
    bad = np.random.default_rng(0).normal(size=(6, 4))
    bad[4, 1] = np.nan
    with pytest.raises(FeatureFileError, match="patch 4 .* NaN or infinite"):
        cluster.fit_kmeans([write_features(tmp_path / "nan.h5", bad)], 2, progress=False)


def test_empty_files_are_skipped(tmp_path, caplog):
    good = write_features(tmp_path / "good.h5", np.eye(4))
    empty = write_features(tmp_path / "empty.h5", np.zeros((0, 4)), coords=np.zeros((0, 2)))
    assert [f.path for f in cluster.read_feature_files([empty, good])] == [good]
    assert "no patches" in caplog.text
    with pytest.raises(FeatureFileError, match="No patches to cluster"):
        cluster.read_feature_files([empty])
    partial = write_features(tmp_path / "partial.h5", np.eye(4), completed=False)
    assert cluster.read_feature_files([partial])[0].n == 4
    assert "marked incomplete" in caplog.text


# ------------------------------------------------------------------ the real slide


def test_montage_shows_the_patches_nearest_each_centre(slide_features, cmu_slide, tmp_path):
    from histohub.slides._reader import open_slide

    result = cluster.fit_kmeans([slide_features], 3, seed=0, progress=False)
    canvas, layout = cluster.montage_canvas(result, [2, 0], n=3, patch_px=64)
    assert canvas.shape == (layout.top(2), layout.left(3) + layout.gap, 3)
    with open_slide(cmu_slide) as slide:
        for r, c in enumerate([2, 0]):
            for j, row in enumerate(result.nearest(c, 3)):
                x, y = result.coords[row]
                expected = np.asarray(Image.fromarray(slide.read_region(
                    (int(x), int(y)), 0, (PATCH, PATCH))).resize((64, 64), Image.BILINEAR))
                box = canvas[layout.top(r):layout.top(r) + 64,
                             layout.left(j):layout.left(j) + 64]
                np.testing.assert_array_equal(box, expected)
    path = cluster.write_montage(result, tmp_path / "montage.png", n=4, patch_px=64)
    full, layout = cluster.montage_canvas(result, [0, 1, 2], n=4, patch_px=64)
    image = png(path)
    assert abs(image.shape[0] - (full.shape[0] + 45)) <= 1
    assert abs(image.shape[1] - (full.shape[1] + 190)) <= 1
    assert image.std() > 30 and len(np.unique(image.reshape(-1, 3), axis=0)) > 1000


def test_overlay_colours_the_chosen_clusters(slide_features, tmp_path):
    result = cluster.fit_kmeans([slide_features], 3, seed=0, progress=False)
    # blend_clusters: covered pixels are (1 - alpha) thumb + alpha colour, others untouched.
    thumb = np.full((50, 60, 3), 200, np.uint8)
    coords, labels = np.array([[0, 0], [100, 100], [300, 0]]), np.array([1, 0, 1])
    out = cluster.blend_clusters(thumb, coords, labels, patch_size_level0=100,
                                 scale=(0.1, 0.1), colours={1: (1.0, 0.0, 0.0)}, alpha=0.5)
    red = (0.5 * 200 / 255 + 0.5, 0.5 * 200 / 255, 0.5 * 200 / 255)
    np.testing.assert_allclose(out[0:10, 0:10], np.broadcast_to(red, (10, 10, 3)), rtol=1e-6)
    np.testing.assert_allclose(out[0:10, 30:40], np.broadcast_to(red, (10, 10, 3)), rtol=1e-6)
    np.testing.assert_allclose(out[10:20, 10:20], 200 / 255, rtol=1e-6)  # cluster 0 not shown
    assert np.isclose(out, 200 / 255).sum() == 50 * 60 * 3 - 2 * 100 * 3
    # The figure: one PNG per feature file, both panels, non-trivial.
    written = cluster.write_overlays(result, tmp_path / "overlays", clusters=[1, 2],
                                     thumbnail_px=400)
    assert written == [tmp_path / "overlays" / "cmu.png"]
    image = png(written[0])
    assert image.shape[0] == 620 and 500 < image.shape[1] < 1700
    assert image.std() > 30
    with pytest.raises(ClusteringError, match=r"Cluster ids \[7\] do not exist"):
        cluster.write_overlays(result, tmp_path / "overlays", clusters=[1, 7])


def test_missing_slide_is_grey_not_fatal(slide_features, tmp_path, caplog):
    moved = write_features(tmp_path / "moved.h5", np.random.default_rng(0).normal(size=(4, 6)),
                           slide_path=str(tmp_path / "gone.svs"), patch_size_level0=PATCH)
    result = cluster.fit_kmeans([moved], 2, progress=False)
    canvas, layout = cluster.montage_canvas(result, [0], n=1, patch_px=16)
    assert (canvas[layout.top(0):layout.top(0) + 16, layout.left(0):layout.left(0) + 16]
            == 200).all()
    assert "not found" in caplog.text
    assert cluster.write_overlays(result, tmp_path / "ov") == []


def test_slide_found_through_slide_dir(slide_features, cmu_slide, tmp_path):
    """Files from CLAM/TRIDENT carry no slide path: `slide_dir/<file stem>.*` is used."""
    with h5py.File(slide_features) as handle:
        features, coords = handle["features"][:], handle["coords"][:]
    stem = Path(cmu_slide).stem
    clam = write_features(tmp_path / f"{stem}.h5", features, coords)
    with h5py.File(clam, "a") as handle:
        handle["coords"].attrs["patch_size_level0"] = PATCH  # where TRIDENT keeps it
    info = cluster.read_feature_files([clam])[0]
    assert info.slide_path is None and info.patch_size_level0 == PATCH
    result = cluster.fit_kmeans([info], 3, progress=False)
    written = cluster.write_overlays(result, tmp_path / "ov", slide_dir=Path(cmu_slide).parent,
                                     thumbnail_px=200)
    assert [p.name for p in written] == [f"{stem}.png"]


def test_malformed_feature_files_are_feature_file_errors(tmp_path):
    group = tmp_path / "group.h5"
    with h5py.File(group, "w") as handle:
        handle.create_group("features")
        handle["coords"] = np.zeros((3, 2), np.int64)
    with pytest.raises(FeatureFileError, match="'features' must be a dataset"):
        cluster.read_feature_files([group])
    no_dim = write_features(tmp_path / "nodim.h5", np.zeros((3, 0)))
    with pytest.raises(FeatureFileError, match="no features per patch"):
        cluster.read_feature_files([no_dim])
    text_coords = write_features(tmp_path / "text.h5", np.ones((3, 2)))
    with h5py.File(text_coords, "a") as handle:
        del handle["coords"]
        handle["coords"] = np.array([["a", "b"]] * 3, dtype="S1")
    with pytest.raises(FeatureFileError, match="'coords' must be numbers"):
        cluster.read_feature_files([text_coords])
    with pytest.raises(FileNotFoundError, match="is a folder"):
        cluster.read_feature_files([tmp_path])


def test_api_options_are_checked_before_any_work(two_files, tmp_path):
    paths, _, _ = two_files
    for options, says in [({"seed": -1}, "seed"), ({"batch_size": 0}, "batch_size"),
                          ({"passes": 0}, "passes"), ({"max_memory_bytes": -1}, "max_memory"),
                          ({"threads": 0}, "threads")]:
        with pytest.raises(ClusteringError, match=says):
            cluster.fit_kmeans(paths, 2, progress=False, **options)
        with pytest.raises(ClusteringError, match=says):
            cluster.elbow(paths, range(2, 5), progress=False, **options)
    for value in (float("nan"), 0.0, 1.5):
        with pytest.raises(ClusteringError, match="min_explained"):
            cluster.elbow(paths, range(2, 5), min_explained=value, progress=False)
    result = cluster.fit_kmeans(paths, 2, progress=False)
    with pytest.raises(ClusteringError, match="at least 1"):
        cluster.montage_canvas(result, [0], n=0)
    with pytest.raises(ClusteringError, match="px"):
        cluster.montage_canvas(result, [0], n=100_000)
