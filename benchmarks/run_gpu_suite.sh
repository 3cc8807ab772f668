#!/usr/bin/env bash
# The GPU suite in one device call: 480 s in all, setup included (BUDGET_S to change it), from a
# copy of this repository that includes .gpu_wheels/ (benchmarks/fetch_gpu_wheels.sh):
#
#   OUT=/tmp/gpu_suite bash benchmarks/run_gpu_suite.sh
#
# Installs the carried wheels into /tmp/dro_jax_site, runs benchmarks/gpu_suite.py's plan from
# the source tree on the machine's own jax and torch (each row in its own worker, in the plan's
# order, a row started only when its estimate fits what is left), with a persistent XLA
# compilation cache on the machine's local disk, and writes $OUT/gpu_suite.json (rewritten after
# every phase of every row) and $OUT/gpu_suite.log. Extra arguments go to gpu_suite.py (e.g.
# --only dro_jax:dro_v:xl).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-/tmp/dro_jax_gpu_suite}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
SITE=/tmp/dro_jax_site
PYTHON=${PYTHON:-python3}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/dro_jax_xla_cache}
IMPORTS="import jax, flax.linen, optax, ml_collections; import dro_jax.train, dro_jax.decoding"

install() {
  rm -rf "$SITE" && mkdir -p "$SITE"
  [ "$#" -gt 0 ] && [ -e "$1" ] || return 0
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" "$@"
}

{
  echo "== $("$PYTHON" --version) at $(command -v "$PYTHON"), budget ${BUDGET_S} s"
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
  budget=$(( BUDGET_S - ($(date +%s) - start) ))
  echo "== setup $(( $(date +%s) - start )) s; ${budget} s for the plan"
  PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/gpu_suite.py --out "$OUT/gpu_suite.json" \
    --budget_s "$budget" --xla_cache "$JAX_COMPILATION_CACHE_DIR" "$@"
  echo "== exit $? after $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/gpu_suite.log"
