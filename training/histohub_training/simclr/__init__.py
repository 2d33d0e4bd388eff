"""SimCLR pretraining as in Ciga, Xu & Martel (2022): loss, model, optimizers, augmentations,
data pool and the training loop. Entry points: ``training/run_pretrain.py`` and
``training/export.py``. This package imports histohub; histohub never imports it."""
