#!/usr/bin/env bash
# Retrain histohub's bundled model (resnet18-ssl-mini) from ../shared/data with the same
# seed, export it, and recompute the metrics its manifest entry records, side by side:
#
#     bash training/reproduce_bundled.sh [RUN_FOLDER]      # default runs/resnet18-ssl-mini
#
# About 3 minutes of training on 2 idle cores (4 epochs) plus a few minutes of
# benchmarks. An interrupted run continues from its last checkpoint when started again.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/resnet18-ssl-mini}
name=resnet18-ssl-mini-rerun

if [ -f "$out/checkpoint.pt" ]; then
    python training/run_pretrain.py --resume --out "$out" --no-progress
else
    python training/run_pretrain.py --config cpu_resnet18 --out "$out" --no-progress
fi
python training/export.py "$out/checkpoint.pt" --name "$name" --out "$out/export" --half --force
for data in kather2016 idc-breast ebhi-seg; do
    HISTOHUB_MANIFEST="$out/export/manifest.json" python training/run_benchmark.py \
        --model "$name" --model random --task linear --data "$data" --quiet \
        --out "$out/benchmarks" --record-manifest "$out/export/manifest.json" --record-name "$name"
done
python training/compare_metrics.py resnet18-ssl-mini "$out/export/manifest.json" "$name"
