"""Compile time and step time of the engine's train step per loss on a T5 preset (tiny by default).

Each row is the step `train.run` trains with: the recipe `configs/<loss>.py` (its optimizer,
reference rule and loss settings), the state from the engine's init, the step jitted by
`train.compile_step` (shardings over the mesh, state donated), here fed one synthetic batch so
that only the step is measured; a loss with a reference scores it inside the step. Prints one
table row per loss: compile seconds (tracing included), median step milliseconds, and the loss
after the timed steps.

  python benchmarks/loss_steps.py                      # tiny T5, 1 layer, CPU: about 45 s
  python benchmarks/loss_steps.py --batch 16 --repeats 50 --microbatches 4
  python benchmarks/loss_steps.py --size small --losses dro,kto --mesh 1,-1,1   # on accelerators
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # JAX and the engine once the flags are parsed (--help answers at once)
  import ml_collections
  from jax.sharding import Mesh

  from dro_jax.models import t5 as t5_lib
  from dro_jax.state import TrainState

A_TOKEN, B_TOKEN = 3, 4  # the preference model's label tokens in the synthetic batch

# Row name -> (recipe, recipe arg). TR-DPO is DPO with the soft trust region (α = 0.6 every step).
ROWS: dict[str, tuple[str, str]] = {
    "sft": ("sft", ""), "dpo": ("dpo", ""), "tr_dpo": ("dpo", "tr=soft"), "ipo": ("ipo", ""),
    "kto": ("kto", ""), "dro": ("dro", ""), "dro:double_single": ("dro", "value=double_single"),
    "dro:single_multiple": ("dro", "value=single_multiple"),
    "dro:single_single": ("dro", "value=single_single"), "dro_p": ("dro_p", ""),
    "reward_model": ("reward_model", ""), "preference_model": ("preference_model", ""),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add = parser.add_argument
  add("--size", default="tiny", help="the recipes' size arg: tiny, small, base, large, xl, xxl")
  add("--family", default="t5_1_1", help="t5_1_1, flan_t5 or t5_1_0")
  add("--layers", type=int, default=None,
      help="encoder and decoder layers each; 0: the preset's. Default: 1 at size tiny (half the "
           "compile time of its 2, which keeps the default run under a minute on two CPU "
           "cores), else the preset's")
  add("--batch", type=int, default=8)
  add("--microbatches", type=int, default=1, help="config.num_microbatches")
  add("--mesh", default="-1,1,1", help="config.mesh_shape (data, fsdp, model)")
  add("--source_length", type=int, default=32)
  add("--target_length", type=int, default=32)
  add("--repeats", type=int, default=20)
  add("--losses", default=",".join(ROWS), help=f"comma-separated rows of {sorted(ROWS)}")
  args = parser.parse_args(argv)
  if args.layers is None:
    args.layers = 1 if args.size == "tiny" else 0
  return args


def make_batch(vocab_size: int, batch: int, source: int, target: int,
               seed: int = 0) -> dict[str, np.ndarray]:
  """Every key any loss reads: random tokens, one padded sequence and one zero-weight example.

  No `label`: KTO then takes desirable = reward above the batch mean, as on the demo feedback.
  """
  rng = np.random.default_rng(seed)

  def tokens(length: int) -> np.ndarray:
    array = rng.integers(5, vocab_size, size=(batch, length)).astype(np.int32)
    array[0, length // 2:] = 0  # one padded sequence
    return array

  arrays = {"encoder_input_tokens": tokens(source)}
  for prefix in ("", "chosen_", "rejected_"):
    targets = tokens(target)
    arrays[f"{prefix}decoder_target_tokens"] = targets
    arrays[f"{prefix}decoder_input_tokens"] = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    arrays[f"{prefix}decoder_loss_weights"] = (targets > 0).astype(np.float32)
  arrays["reward"] = rng.normal(size=batch).astype(np.float32)
  weights = np.ones(batch, np.float32)
  weights[-1] = 0.0  # one padding example
  arrays["example_weights"] = weights
  return arrays


def row_config(name: str, args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The row's recipe with the benchmark's batch, mesh and microbatches; no warm-up."""
  from dro_jax import configs
  recipe, extra = ROWS[name]
  config = configs.load(recipe, ",".join(
      part for part in (f"size={args.size}", f"family={args.family}", extra) if part))
  config.batch_size = args.batch
  config.num_microbatches = args.microbatches
  config.mesh_shape = tuple(int(part) for part in args.mesh.split(","))
  config.max_input_length, config.max_target_length = args.source_length, args.target_length
  config.optimizer.warmup_steps = 0  # a warm-up would make the first steps' updates zero
  if args.layers:
    config.model.num_encoder_layers = config.model.num_decoder_layers = args.layers
  if config.loss == "preference_model":
    config.preference.a_token, config.preference.b_token = A_TOKEN, B_TOKEN
  return config


@dataclasses.dataclass
class Row:
  """One loss's config, mesh and state layout: everything but the state itself."""
  config: ml_collections.ConfigDict
  model_config: t5_lib.T5Config
  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]
  abstract: TrainState  # of ShapeDtypeStructs
  shardings: TrainState  # of NamedShardings


def plan(name: str, args: argparse.Namespace) -> Row:
  from dro_jax import partitioning, step as step_lib, train
  config = row_config(name, args)
  model_config = step_lib.t5_config(config)
  mesh = partitioning.mesh_from_config(config)
  rules = partitioning.rules_from_config(config)
  partitioning.validate(mesh, batch_size=config.batch_size,
                        num_microbatches=config.num_microbatches,
                        num_heads=model_config.num_heads)
  abstract, shardings = train.state_layout(config, model_config, mesh, rules)
  return Row(config, model_config, mesh, rules, abstract, shardings)


def build(row: Row) -> TrainState:
  """The row's initial state from the engine's init function.

  On one device it runs op by op: each jitted init compiles its random initialisers afresh
  (about 2 s per row on a CPU, as long as the step), while op-by-op runs share the compiled ops
  across rows. On a mesh `train.build_state` places every leaf straight into its shards.
  """
  import jax

  from dro_jax import partitioning, train
  if row.mesh.size > 1:
    return train.build_state(row.config, row.model_config, row.mesh, row.rules, row.abstract,
                             row.shardings)
  init = train.make_init_fn(row.config, row.model_config)
  with partitioning.activate(row.mesh, row.rules):
    state = init(jax.random.PRNGKey(row.config.seed), None)
  return jax.device_put(state, row.shardings)


def measure(row: Row, state: TrainState, args: argparse.Namespace) -> dict[str, Any]:
  """Compile seconds (tracing included), median step milliseconds and the last loss of a row."""
  import jax

  from dro_jax import partitioning, train
  host_batch = make_batch(row.model_config.vocab_size, args.batch, args.source_length,
                          args.target_length)
  train_step, layout = train.compile_step(row.config, row.mesh, row.rules, row.shardings,
                                          host_batch)
  batch = train.device_batch(host_batch, layout)
  with partitioning.activate(row.mesh, row.rules):
    start = time.perf_counter()
    compiled = train_step.jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
  return {"compile_s": compile_s, "step_ms": float(np.median(times)) * 1e3,
          "loss": float(metrics["loss"]), "optimizer": row.config.optimizer.name,
          "params": sum(x.size for x in jax.tree.leaves(row.abstract.policy))}


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
  args = parse_args(argv)
  import jax
  names = [name for name in args.losses.split(",") if name]
  unknown = [name for name in names if name not in ROWS]
  if unknown:
    raise SystemExit(f"--losses: unknown rows {unknown}; choose from {sorted(ROWS)}")
  print(f"T5 {args.size} ({args.family}, layers: {args.layers or 'preset'}), batch {args.batch} "
        f"x ({args.source_length} -> {args.target_length}) in {args.microbatches} "
        f"microbatch(es), mesh {args.mesh}, {jax.devices()[0].platform} x {jax.device_count()}; "
        f"the engine's step, state donated")
  print(f"{'loss':<22}{'optimizer':>10}{'params':>11}{'compile s':>11}{'step ms':>10}"
        f"{f'loss@{args.repeats + 1}':>13}", flush=True)
  results = {}
  for name in names:
    row = plan(name, args)
    result = results[name] = measure(row, build(row), args)
    print(f"{name:<22}{result['optimizer']:>10}{result['params']:>11,}"
          f"{result['compile_s']:>11.2f}{result['step_ms']:>10.2f}{result['loss']:>13.4f}",
          flush=True)
  return results


if __name__ == "__main__":
  main()
