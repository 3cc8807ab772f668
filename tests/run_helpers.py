"""Small run configurations and readers shared by the driver, fault and evaluation tests."""

import json
import os


def shrink(config, demo_cache: str, steps: int = 3):
  """A recipe cut to a seconds-long CPU run: one layer per stack, batch 8, the shared data."""
  config.total_steps = steps
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1
  config.batch_size = 8
  config.eval_batches = 1
  config.data.cache_dir = demo_cache
  return config


def read_metrics(workdir) -> list[dict]:
  """One row per step, as every reader of metrics.jsonl takes them (replayed steps supersede)."""
  from dro_jax import files
  return files.metrics_rows(os.path.join(str(workdir), "metrics.jsonl"))


def raw_metrics(workdir) -> list[dict]:
  """Every line of metrics.jsonl as written (the file is only ever appended to)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
