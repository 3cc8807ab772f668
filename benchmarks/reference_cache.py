"""Steps/s of the tiny DRO-V train step with the reference scored in the step and with it cached.

Both steps see the same batch (the demo's lengths, 16 prompt and 12 response tokens); the cached
one gets `ref_logps` in the batch (as `reference_cache` looks them up) and a state without
reference parameters. The steps alternate in rounds, so background load hits both alike.

  python benchmarks/reference_cache.py                 # CPU, the tiny preset
  python benchmarks/reference_cache.py --batch 64 --rounds 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def make_batch(batch: int, source: int, target: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)

  def tokens(length: int) -> np.ndarray:
    lengths = rng.integers(2, length + 1, size=batch)
    array = rng.integers(2, 90, size=(batch, length)).astype(np.int32)
    array[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return array

  targets = tokens(target)
  return {"encoder_input_tokens": tokens(source), "decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
          "decoder_loss_weights": (targets > 0).astype(np.float32),
          "reward": rng.normal(size=batch).astype(np.float32),
          "example_weights": np.ones(batch, np.float32)}


def setup(config, with_reference: bool, batch: dict[str, np.ndarray]):
  """(step(), the batch it runs on): a jitted train step over the current state."""
  import jax

  from dro_jax import partitioning, scoring, step as step_lib, train
  mesh = partitioning.mesh_from_config(config)
  rules = partitioning.rules_from_config(config)
  model_config = step_lib.t5_config(config)
  abstract, shardings = train.state_layout(config, model_config, mesh, rules,
                                           with_reference=with_reference)
  state = train.build_state(config, model_config, mesh, rules, abstract, shardings)
  if not with_reference:  # The cache's values: the initial policy's log-prob sums.
    model = step_lib.make_objective(config).model
    batch = {**batch, "ref_logps": np.asarray(scoring.score(
        model, state.policy, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], batch["decoder_loss_weights"])["logps"], np.float32)}
  train_step, layout = train.compile_step(config, mesh, rules, shardings, batch)
  holder = {"state": state}

  def step() -> None:
    holder["state"], metrics = train_step(holder["state"], train.device_batch(batch, layout))
    jax.block_until_ready(metrics["loss"])

  return step


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=50, help="steps per round and variant")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--layers", type=int, default=None, help="layers per stack (default: tiny's)")
  args = parser.parse_args()
  import jax  # after the flags: --help answers before the heavy imports

  from dro_jax import configs
  config = configs.load("dro", "size=tiny")
  config.batch_size = args.batch
  if args.layers:
    config.model.num_encoder_layers = config.model.num_decoder_layers = args.layers
  batch = make_batch(args.batch, config.max_input_length, config.max_target_length)
  steps = {"in the step": setup(config, True, batch), "cached": setup(config, False, batch)}
  times = {name: [] for name in steps}
  for step in steps.values():  # compile and warm up
    step(), step()
  for _ in range(args.rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        step()
      times[name].append(args.steps / (time.perf_counter() - start))
  print(f"tiny DRO-V, batch {args.batch}, {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), steps/s (median of {args.rounds} rounds of {args.steps}):")
  for name, rates in times.items():
    print(f"  reference {name:12s} {np.median(rates):8.1f}   rounds: "
          + " ".join(f"{rate:.1f}" for rate in rates))
  print(f"  speed-up {np.median(times['cached']) / np.median(times['in the step']):.2f}x")


if __name__ == "__main__":
  main()
