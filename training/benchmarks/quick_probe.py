#!/usr/bin/env python
"""A quick, converged linear probe of pretraining checkpoints against random weights.

    PYTHONPATH=training python training/benchmarks/quick_probe.py runs/cpu/checkpoint.pt [more.pt] \\
        [bundled:resnet18-ssl-mini] [--random-seeds 0 1] [--size 64] [--split grouped|random]

What chose the CPU recipe (training/README.md): frozen 512-d features of the shared sets
(Kather 2016 tiles, 8 classes; EBHI-Seg images, 6 classes; 1,500 IDC patches, 2 classes),
each image resized to ``--size`` px, mean = std = 0.5; standardised; scikit-learn's
L-BFGS logistic regression; macro F1 (x100). ``--split grouped`` (the default) predicts every
image from a classifier that never saw its source (Kather: the source image
``CRC-Prim-HE-NN``; EBHI: the case number; IDC: the patient; the groups and folds of
``run_benchmark.py``), by 5-fold stratified group cross-validation, mean over ``--splits``
shuffles of the folds: tiles of one source image
are near-duplicates, so random splits reward memorising a source. ``--split random``:
stratified random 50/50 splits, mean over ``--splits`` (the splits the recipe table's
first runs used). Cheaper than ``run_benchmark.py`` (no label fractions, no validation
part) and steadier on a few sources (every image is tested once per shuffle, where the
benchmark tests one split), for comparing runs; the manifest records ``run_benchmark.py``.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

from histohub_training.simclr.model import SimCLRModel

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def probe_sets(data: Path, idc_count: int = 1500
               ) -> dict[str, tuple[list[Path], list[str], list[str]]]:
    """name -> (image paths, class labels, source groups): the presets of
    ``run_benchmark.py`` (``downstream.datasets.PRESETS``), grouped as it groups them
    (Kather: source image; EBHI: case number; IDC: patient), IDC cut to ``idc_count``."""
    from histohub_training.downstream import datasets as ds

    sets = {}
    for name, preset in (("kather", "kather2016"), ("ebhi", "ebhi-seg"), ("idc", "idc-breast")):
        dataset = ds.for_classification(ds.load_dataset(preset, root=data))
        keep = range(len(dataset))
        if name == "idc":
            keep = sorted(random.Random(0).sample(range(len(dataset)), idc_count))
        sets[name] = ([Path(dataset.paths[i]) for i in keep],
                      [dataset.classes[dataset.labels[i]] for i in keep],
                      [str(dataset.groups[i]) for i in keep])
    return sets


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size): shorter side resized, centre crop."""
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            scale = size / min(w, h)
            image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                                 Image.Resampling.BILINEAR)
            left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
            arrays.append(np.asarray(image.crop((left, top, left + size, top + size))))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.inference_mode()
def features(backbone: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    backbone.eval()
    out = [backbone(((images[i:i + 256].float() / 255 - 0.5) / 0.5).contiguous(
        memory_format=torch.channels_last)) for i in range(0, len(images), 256)]
    return torch.cat(out).numpy()


def _fit_predict(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray
                 ) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[train])
    classifier = LogisticRegression(max_iter=3000).fit(scaler.transform(x[train]), y[train])
    return classifier.predict(scaler.transform(x[test]))


def macro_f1(x: np.ndarray, y: np.ndarray, splits: int, groups: np.ndarray | None = None
             ) -> tuple[float, float]:
    """Mean and sd (ddof 1) of macro F1 (x100) over the shuffles / splits: out-of-fold
    over 5 group folds per shuffle when ``groups`` are given (the benchmark's folds,
    ``histohub_training.downstream.splits.cross_validation_splits``; each fold's classifier
    trains on the other four), else over stratified random 50/50 splits."""
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedShuffleSplit

    from histohub_training.downstream.splits import cross_validation_splits

    scores = []
    if groups is None:
        for train, test in StratifiedShuffleSplit(splits, test_size=0.5,
                                                  random_state=0).split(x, y):
            scores.append(f1_score(y[test], _fit_predict(x, y, train, test), average="macro"))
        return _mean_sd(scores)
    classes, codes = np.unique(y, return_inverse=True)
    folds = cross_validation_splits(codes, groups, folds=5, repeats=splits, seed=0)
    for shuffle in range(splits):
        predicted = np.empty_like(y)
        for split in folds[shuffle * 5:(shuffle + 1) * 5]:
            train = np.concatenate([split.train, split.val])
            predicted[split.test] = _fit_predict(x, y, train, split.test)
        scores.append(f1_score(y, predicted, average="macro"))
    return _mean_sd(scores)


def _mean_sd(scores: list[float]) -> tuple[float, float]:
    values = 100 * np.asarray(scores)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def backbone_of(spec: str) -> torch.nn.Module:
    """``random:SEED``, ``bundled:NAME`` (a histohub model) or a run_pretrain.py checkpoint
    (read as data)."""
    if spec.startswith("bundled:"):
        import histohub

        return histohub.load_pretrained(spec.split(":", 1)[1]).float().to(
            memory_format=torch.channels_last)
    model = SimCLRModel("resnet18")
    if spec.startswith("random:"):
        torch.manual_seed(int(spec.split(":")[1]))
        model = SimCLRModel("resnet18")
    else:
        state = torch.load(spec, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
    return model.backbone.to(memory_format=torch.channels_last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--split", choices=["grouped", "random"], default="grouped")
    parser.add_argument("--splits", type=int, default=None,
                        help="shuffles of the group folds (default 3) or random splits "
                             "(default 10)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--sets", nargs="*", choices=["kather", "ebhi", "idc"],
                        default=["kather", "ebhi", "idc"])
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"error: {args.data} not found (give --data)", file=sys.stderr)
        return 2
    splits = args.splits or (3 if args.split == "grouped" else 10)
    sets = {name: (load_images(paths, args.size), np.array(labels),
                   np.array(groups) if args.split == "grouped" else None)
            for name, (paths, labels, groups) in probe_sets(args.data).items()
            if name in args.sets}
    print(f"macro F1 x 100, mean ± sd over {splits} "
          + ("shuffles of 5 grouped folds" if args.split == "grouped" else "random splits"))
    print(f"{'model':<40} " + " ".join(f"{n:>11}" for n in sets))
    for spec in [f"random:{s}" for s in args.random_seeds] + args.checkpoints:
        backbone = backbone_of(spec)
        scores = [macro_f1(features(backbone, x), y, splits, groups)
                  for x, y, groups in sets.values()]
        print(f"{spec[-40:]:<40} " + " ".join(f"{m:>5.1f} ± {sd:>3.1f}" for m, sd in scores),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
