#!/usr/bin/env bash
# The GPU suite in one command on a GPU host, five minutes at most (setup included), from a copy
# of this repository that includes .gpu_wheels/ (benchmarks/fetch_gpu_wheels.sh):
#
#   OUT=/tmp/gpu_suite bash benchmarks/run_gpu_suite.sh
#
# Installs the carried wheels (benchmarks/fetch_gpu_wheels.sh) into /tmp/dro_jax_site, runs
# benchmarks/gpu_suite.py from the source tree on the machine's own jax and torch, and writes
# $OUT/gpu_suite.json (rewritten after every row) and $OUT/gpu_suite.log. Extra arguments go to
# gpu_suite.py (e.g. --only dro_jax:dro_v:xl).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-/tmp/dro_jax_gpu_suite}
mkdir -p "$OUT"
SITE=/tmp/dro_jax_site
PYTHON=${PYTHON:-python3}
IMPORTS="import jax, flax.linen, optax, ml_collections; import dro_jax.train, dro_jax.decoding, dro_jax.export"

install() {
  rm -rf "$SITE" && mkdir -p "$SITE"
  [ "$#" -gt 0 ] || return 0
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" "$@"
}

{
  echo "== $("$PYTHON" --version) at $(command -v "$PYTHON")"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  export PYTHONPATH="$SITE:$PWD"
  # The pinned wheels first; if they do not import with this jax, the image's own packages
  # with ml_collections alone.
  install .gpu_wheels/*.whl
  if ! "$PYTHON" -c "$IMPORTS"; then
    echo "== the carried flax/optax/orbax do not import here: the image's, plus ml_collections"
    install .gpu_wheels/ml_collections-*.whl
    "$PYTHON" -c "$IMPORTS" || { echo "== the suite's imports fail"; exit 1; }
  fi
  "$PYTHON" -c "import jax, flax, optax, torch, transformers; print('== jax', jax.__version__, \
jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__)"
  budget=$(( 290 - ($(date +%s) - start) ))
  PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/gpu_suite.py --out "$OUT/gpu_suite.json" \
    --budget_s "$budget" "$@"
  echo "== exit $? after $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/gpu_suite.log"
