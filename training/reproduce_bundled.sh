#!/usr/bin/env bash
# Retrain histohub's bundled model (resnet18-ssl-mini) from ../shared/data with the same
# seed and thread count, check the retrained weights' sha256 against the shipped file's,
# and recompute the metrics its manifest entry records, compared against their spread:
#
#     bash training/reproduce_bundled.sh [RUN_FOLDER]      # default runs/resnet18-ssl-mini
#
# About 6 minutes of training on 2 idle cores (4 epochs, 2 threads as recorded) plus the
# benchmarks (grouped 5-fold cross-validation x 3 repeats on three datasets). An
# interrupted run continues from its last checkpoint when started again.
# Exit code: 0 when the weights match the shipped ones and every metric is within its
# recorded spread; 1 otherwise (the lines above the end say which).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/resnet18-ssl-mini}
name=resnet18-ssl-mini-rerun
export MKL_CBWR=AUTO     # MKL's reproducible code path (training/histohub_training/simclr/determinism.py)

if [ -f "$out/checkpoint.pt" ]; then
    python training/run_pretrain.py --resume --out "$out" --no-progress
else
    python training/run_pretrain.py --config cpu_resnet18 --out "$out" --no-progress
fi
python training/export.py "$out/checkpoint.pt" --name "$name" --out "$out/export" --half --force

weights=0
python - "$out/export/manifest.json" "$name" <<'EOF' || weights=1
import json, sys
import histohub
shipped = histohub.hub.read_manifest_json(histohub.hub.MANIFEST_PATH)["models"]["resnet18-ssl-mini"]
rerun = histohub.hub.read_manifest_json(sys.argv[1])["models"][sys.argv[2]]
a, b = shipped["weights"][0]["sha256"], rerun["weights"][0]["sha256"]
if a == b:
    print(f"weights: MATCH: the retrained weights are the shipped file, byte for byte "
          f"(sha256 {a})")
    sys.exit(0)
print(f"weights: DIFFERENT: shipped sha256 {a}, retrained {b}.")
was, now = shipped["recipe"].get("environment"), rerun["recipe"].get("environment")
print(f"  shipped run: {json.dumps(was)}\n  this run:    {json.dumps(now)}")
print("  Bit-identical weights need the same seed, thread count, CPU instruction set and "
      "torch version (training/README.md, 'Run to run'); the metrics below say whether "
      "the difference matters.")
sys.exit(1)
EOF

# the rerun alone (add --model random for the baseline: the card has it; it doubles the time)
for data in kather2016 idc-breast ebhi-seg; do
    HISTOHUB_MANIFEST="$out/export/manifest.json" python training/run_benchmark.py \
        --model "$name" --task linear --data "$data" --quiet \
        --out "$out/benchmarks" --record-manifest "$out/export/manifest.json" --record-name "$name"
done
metrics=0
python training/compare_metrics.py resnet18-ssl-mini "$out/export/manifest.json" "$name" \
    || metrics=$?
[ "$weights" -eq 0 ] && echo "weights: the shipped ones (sha256 match)" \
    || echo "weights: NOT the shipped ones (see above)"
[ "$metrics" -eq 0 ] && echo "metrics: every one within its recorded spread" \
    || echo "metrics: some moved by more than their recorded spread (see above)"
exit $(( weights || metrics ))
