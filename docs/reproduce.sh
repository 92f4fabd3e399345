#!/usr/bin/env bash
# Rebuild every shipped artifact and every result in the README after the built-in model changes,
# in dependency order: the model, then what is trained or calibrated on it, then the result grids.
# About 75 minutes on the project's 2-core CPU (training 42; artifacts 8 and grids 15 when run two at a time).
# Usage: bash docs/reproduce.sh [--skip-model]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
CK=evals/checkpoint

if [ "${1:-}" != "--skip-model" ]; then
  vlmprune train-builtin --output "$CK" --threads 2
fi

# artifacts trained or calibrated on the model
vlmprune train-gates --output "$CK/dyvte-gates" --steps 200 --batch-size 16 --width 512 --lr 1e-3 --threads 1 --no-resume
python -m vlmprune.calibrate --presets
vlmprune train-slowfast --model builtin --data builtin --output "$CK/slowfast-hybrid" --no-resume --steps 400 --batch-size 8 --threads 1
rm -rf evals/checkpoint-train-state/flash-draft
vlmprune train-draft --output "$CK/flash-draft" --state-dir evals/checkpoint-train-state/flash-draft \
  --samples 320 --steps 1500 --k 2 --latents 16 --threads 1

# the README's tables and plots
vlmprune-eval --threads 2 --output results/default
cp results/default/accuracy_vs_flops.png docs/accuracy_vs_flops.png
cp results/default/results.json docs/builtin_results.json
vlmprune-eval --task image_mc,video_mc --method fastervlm,random --ratio 0.75,0.9 --positions original --threads 2 --output results/positions
python -c "from vlmprune.evals import builtin, analysis; m, p = builtin.load_builtin(); analysis.save_heatmaps(m, p, 'docs/cls_attention.png')"
vlmprune-eval --method none,dyvte --exit-layer 1,2,3,4 --gates "$CK/dyvte-gates" --threads 2 --output docs/results/dyvte
vlmprune-eval --task image_mc,video_mc --method none,dyvte --exit-layer 2,3 --gates "$CK/dyvte-gates" --batch-size 1 --limit 100 --threads 2 --output docs/results/dyvte_b1
vlmprune-eval --method none,dymu,fastervlm,pool --ratio 0.35,0.66,0.82 --threads 2 --output docs/results/dymu
python - <<'PY'
import json
from vlmprune.evals import analysis, builtin
m, p = builtin.load_builtin()
counts = analysis.dymu_tokens_by_objects(m, p)
json.dump(counts, open("docs/results/dymu_tokens_by_objects.json", "w"))
analysis.save_dymu_plot(counts, "docs/dymu_tokens_by_objects.png")
PY
vlmprune-eval --task video_mc,video_caption --method none,slowfast,fastervlm,pool --ratio 0.94 --threads 2 --output docs/results/slowfast
OMP_NUM_THREADS=1 vlmprune bench-flash --prompts 12 --repeats 3 --depth 4 --output docs/results/bench_flash.json
vlmprune-eval --task image_short,video_caption --method none,flash,fastervlm+flash --ratio 0.9 --batch-size 1 --output docs/results/flash
python examples/make_notebooks.py
