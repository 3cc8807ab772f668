#!/usr/bin/env bash
# Downloads the pure-Python wheels benchmarks/run_gpu_suite.sh installs on the GPU machine into
# .gpu_wheels/ (ignored by git, carried by the device call). That machine has Python 3.12 with
# jax 0.11.2, torch and transformers but no ml_collections; flax, optax and orbax-checkpoint are
# pinned to the versions the suite is tested with here (flax 0.12.8 needs jax >= 0.10, optax
# 0.2.8 jax >= 0.5.3, orbax-checkpoint 0.12.8 jax >= 0.6), and the run falls back to the image's
# own when they do not import there.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then python=${PYTHON:-.venv/bin/python}; fi
mkdir -p .gpu_wheels
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py --dest .gpu_wheels \
  ml_collections==1.1.0 flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
ls -l .gpu_wheels
