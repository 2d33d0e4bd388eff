"""Downstream benchmarks of the paper (section 4.2, Tables 1-2 and D.7-D.8, Figs. 3-4).

One job per module:

- ``datasets``: image folders, CSV files, image/mask pairs and the presets of ``../shared/data``
- ``images``: decoding and resizing images and masks into uint8 tensors
- ``splits``: stratified (and grouped) 50/25/25 splits, label fractions x repeats
- ``encoders``: ``random`` / ``imagenet`` / manifest name / checkpoint -> an encoder and its identity
- ``features``: frozen pre-activation features, computed once per model and cached on disk
- ``linear``: a linear layer on frozen features (classification or L1 regression)
- ``finetune``: all layers trained
- ``segmentation``: a UNet whose encoder is the pretrained ResNet
- ``selection``: test metrics at the best validation epoch (shared by every protocol)
- ``protocols``: the five tasks, every model on one dataset with one fixed split
- ``metrics``: macro F1, accuracy, balanced accuracy, per-class F1, L1, clustering quality
- ``report``: run JSON, paper-style Markdown tables, fraction plots, manifest ``metrics``
- ``cli``: ``training/run_benchmark.py``

Nothing under ``histohub/`` imports this package.
"""
