"""Feedback data as seqio Tasks, feature converters, the resumable input pipeline, the demo task.

Modules: `readers` (JSONL / parquet / TFRecord records with file:line), `records` (validation, the
chat template), `adapters` (the published datasets), `tasks` (Task and Mixture registration),
`converters` (batch keys), `statistics` (counts and reward moments, cached), `pipeline` (per-host,
deterministic, resumable batches), `synthetic` (the demo task and its judge).

The names below are imported on first use, so `dro_jax.data.synthetic` (the judge) does not pull in
TensorFlow.

TensorFlow itself is imported quietly (TF_CPP_MIN_LOG_LEVEL=3 unless already set: a CPU-only
machine would otherwise log a failed CUDA probe as an error on every run) and never sees the GPUs,
which belong to JAX; see `_tensorflow`.
"""

import importlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # Before any module here imports TensorFlow.

_EXPORTS = {
    "DataError": "readers",
    "render_messages": "records",
    "load_vocabulary": "tasks",
    "register_single_trajectory_task": "tasks",
    "register_pairwise_task": "tasks",
    "register_mixture": "tasks",
    "check_vocabulary_fits": "tasks",
    "SingleTrajectoryFeatureConverter": "converters",
    "PairwiseFeatureConverter": "converters",
    "feature_converter": "converters",
    "dataset_statistics": "statistics",
    "input_pipeline": "pipeline",
    "DataIterator": "pipeline",
}


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + list(_EXPORTS))
