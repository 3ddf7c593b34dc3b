#!/usr/bin/env bash
# The analog experiment of docs/experiments/lora_saturation_analog.md, end to end on one CPU machine.
# Each step is skipped when its output exists, so running this again resumes (the sweep resumes its point).
#   nohup nice -n 5 launch/analog_cpu.sh > analog.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA=${DATA:-../shared/data}
R=runs/analog
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
stamp start
[ -f $R/data/stats.json ] || python -m jaxtele.data.analog --data "$DATA" --out $R/data
stamp data done
[ -f $R/base/export/hf/model.safetensors ] || python -m jaxtele.train --config configs/experiments/lora_saturation_analog.py:base
stamp base done
python -m jaxtele.sweep --config configs/experiments/lora_saturation_analog_sweep.py
stamp sweep done
python -m jaxtele.eval.saturation post --sweep $R/sweep
stamp post done
python -m jaxtele.eval.saturation report --sweep $R/sweep --out docs/experiments/lora_saturation_analog
stamp report done
