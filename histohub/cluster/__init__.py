"""Unsupervised clustering of extracted patch features (paper section 5.3, Figs. 5 and 6).

Ciga, Xu & Martel cluster 1.4 million ResNet18 features from 69 slides with mini-batch
K-means, choose the number of clusters with the elbow heuristic on the explained variance
(67.1% at k=2500, 83.3% at k=3000, 91% at k=5000), show the patches closest to each centre
(Fig. 5) and colour chosen clusters over whole slides (Fig. 6). This package does the same
for the HDF5 files ``histohub extract`` writes (the CLAM / TRIDENT layout, read through
``histohub.featurefile._layout``):

- ``features`` (N, D) float, ``coords`` (N, 2) integer level-0 x, y;
- attributes ``slide_path`` and ``patch_size_level0`` (patch side in level-0 pixels, on the
  root or on ``coords`` as TRIDENT writes it), used for the montage and the overlays (files
  without ``slide_path`` find their slide as ``slide_dir/<file stem>.*``);
- attribute ``model_name``: files from different encoders are refused (their feature
  spaces are unrelated).

>>> from histohub.cluster import (elbow, fit_kmeans, read_feature_files, save_clusters,
...                               write_montage, write_overlays)
>>> files = read_feature_files(["out/slide1.h5", "out/slide2.h5"])
>>> curve = elbow(files, range(2, 21))            # explained variance for k = 2..20
>>> result = fit_kmeans(files, curve.chosen_k)    # ClusterResult: labels (N,), centers (k, D)
>>> save_clusters(result, "clusters/")            # clusters.h5 + assignments.csv
>>> write_montage(result, "clusters/montage.png") # Fig. 5
>>> write_overlays(result, "clusters/overlays")   # Fig. 6, one PNG per slide

One module per job: ``store`` (feature files as one matrix, in memory or streamed),
``kmeans`` (k-means and the elbow), ``results`` (clusters.h5, assignments.csv, elbow.csv),
``figures`` (elbow plot, montage, overlays; slides through ``histohub.slides._reader``). The names
below are the public API; the exceptions live in ``histohub.errors``.
"""

from __future__ import annotations

from histohub.errors import ClusteringError, FeatureFileError
from histohub.cluster._figures import (DEFAULT_MONTAGE_ROWS, MAX_MONTAGE_PX, MAX_OVERLAY_COLOURS,
                                       MONTAGE_PATCH_PX, MontageLayout, blend_clusters,
                                       check_montage_size, default_clusters, montage_canvas,
                                       plot_elbow, write_montage, write_overlays)
from histohub.cluster._kmeans import (DEFAULT_BATCH_SIZE, DEFAULT_MAX_MEMORY_BYTES, MAX_SEED,
                                      ClusterResult, ElbowResult, choose_k, elbow, fit_kmeans)
from histohub.cluster._results import load_clusters, save_clusters, write_elbow_csv
from histohub.cluster._store import FeatureFile, read_feature_files

__all__ = [
    "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_MEMORY_BYTES", "DEFAULT_MONTAGE_ROWS", "MAX_MONTAGE_PX",
    "MAX_OVERLAY_COLOURS", "MAX_SEED", "MONTAGE_PATCH_PX", "ClusterResult", "ClusteringError",
    "ElbowResult", "FeatureFile", "FeatureFileError", "MontageLayout", "blend_clusters",
    "check_montage_size", "choose_k", "default_clusters", "elbow", "fit_kmeans",
    "load_clusters", "montage_canvas", "plot_elbow", "read_feature_files", "save_clusters",
    "write_elbow_csv", "write_montage", "write_overlays",
]
