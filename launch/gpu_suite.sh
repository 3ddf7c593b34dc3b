#!/usr/bin/env bash
# The prepared GPU suite from a source tree, on an image that has JAX, torch, transformers and peft but not
# the project installed (never pip-install the project there: its pins would replace the image's jax).
#
#   launch/gpu_suite.sh OUT_DIR [--smoke] [--budget-s 470] [--only REGEX] ...   (args go to jaxtele.benchmarks.device)
#
# cp312 wheels carried in .whl/ (or $JAXTELE_WHEELS) are installed into a private folder ($JAXTELE_SITE,
# default /tmp/jaxtele_site) that goes on PYTHONPATH after the tree; wheels of packages the image must keep
# (jax, jaxlib, its CUDA plugins, torch, numpy) are refused, so the image's versions always win.
# PYTHON picks the interpreter (default python3).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
out=${1:?usage: $0 OUT_DIR [jaxtele.benchmarks.device options]}
shift
wheels=${JAXTELE_WHEELS:-$root/.whl}
site=${JAXTELE_SITE:-/tmp/jaxtele_site}
path="$root"
shopt -s nullglob
carried=("$wheels"/*.whl)
if ((${#carried[@]})); then
  keep=()
  for w in "${carried[@]}"; do
    case $(basename "$w") in
      jax-* | jaxlib-* | jax_cuda* | jax_plugins* | torch-* | numpy-*)
        echo "gpu_suite: not installing $(basename "$w"): the image's version must stay" >&2 ;;
      *) keep+=("$w") ;;
    esac
  done
  if ((${#keep[@]})); then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${keep[@]}"
    path="$root:$site"
  fi
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$root"
exec "$py" -m jaxtele.benchmarks.device --out "$out" "$@"
