"""Compile time and step time of one jitted train step per loss on a T5 preset (tiny by default).

Each step scores what its loss needs (policy with gradient; reference without; the value
network for DRO-V), takes the gradient, applies the optimizer (Adafactor, the project default;
the 1/τ policy-update scale for DRO) and the reference update, with the state donated.
Prints one table row per loss.

  python benchmarks/loss_steps.py                      # tiny T5, CPU
  python benchmarks/loss_steps.py --batch 16 --repeats 50
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dro_jax import losses, optim, reference, scoring
from dro_jax.models import t5 as t5_lib
from dro_jax.models import value as value_lib

A_TOKEN, B_TOKEN = 3, 4  # the preference model's label tokens


def make_batch(config: t5_lib.T5Config, batch: int, source: int, target: int,
               seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)

  def tokens(length: int) -> np.ndarray:
    array = rng.integers(2, config.vocab_size, size=(batch, length)).astype(np.int32)
    array[0, length // 2:] = 0  # one padded sequence
    return array

  def shift(t: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((batch, 1), np.int32), t[:, :-1]], axis=1)

  chosen, rejected = tokens(target), tokens(target)
  weights = np.ones(batch, np.float32)
  weights[-1] = 0.0  # one padding example
  arrays = {
      "encoder_input_tokens": tokens(source),
      "decoder_target_tokens": chosen, "decoder_input_tokens": shift(chosen),
      "chosen_decoder_target_tokens": chosen, "chosen_decoder_input_tokens": shift(chosen),
      "rejected_decoder_target_tokens": rejected,
      "rejected_decoder_input_tokens": shift(rejected),
      "reward": rng.normal(size=batch).astype(np.float32),
      "label": (rng.uniform(size=batch) > 0.5).astype(np.float32),
      "example_weights": weights,
  }
  return {k: jnp.asarray(v) for k, v in arrays.items()}


def _score(model, params, batch, suffix=""):
  return scoring.score(model, params, batch["encoder_input_tokens"],
                       batch[f"{suffix}decoder_input_tokens"],
                       batch[f"{suffix}decoder_target_tokens"])


def _mismatched(batch):
  """(x_i, y_{i+1 mod m}) for KTO's reference point."""
  return {**batch, "decoder_input_tokens": jnp.roll(batch["decoder_input_tokens"], -1, 0),
          "decoder_target_tokens": jnp.roll(batch["decoder_target_tokens"], -1, 0)}


def policy_loss_fn(name: str, model, value_fn) -> Callable:
  """loss(params, ref_params, batch) -> (scalar, metrics) for the policy losses."""

  def loss(params, ref_params, batch):
    weights = batch["example_weights"]
    ref_params = jax.lax.stop_gradient(ref_params)
    if name in ("dpo", "ipo", "tr_dpo"):
      policy = scoring.score_pairs(model, params["policy"], batch)
      ref = scoring.score_pairs(model, ref_params, batch)
      args = (policy["chosen_logps"], policy["rejected_logps"], ref["chosen_logps"],
              ref["rejected_logps"])
      if name == "ipo":
        per_example, metrics = losses.ipo_loss(
            *args, tau=0.1, chosen_lengths=policy["chosen_lengths"],
            rejected_lengths=policy["rejected_lengths"], weights=weights)
      else:
        per_example, metrics = losses.dpo_loss(*args, beta=0.1, weights=weights)
    elif name == "kto":
      policy = _score(model, params["policy"], batch)["logps"]
      ref = _score(model, ref_params, batch)["logps"]
      mismatched = _mismatched(batch)
      policy_kl = jax.lax.stop_gradient(_score(model, params["policy"], mismatched)["logps"])
      ref_kl = _score(model, ref_params, mismatched)["logps"]
      desirable = losses.above_mean_reward(batch["reward"], weights)
      per_example, metrics = losses.kto_loss(policy, ref, policy_kl, ref_kl, desirable, beta=0.1,
                                             weights=weights)
    elif name.startswith("dro"):
      policy = _score(model, params["policy"], batch)["logps"]
      ref = _score(model, ref_params, batch)["logps"]
      if name == "dro_p":
        per_example, metrics = losses.dro_p_loss(policy, ref, batch["reward"], tau=1.0,
                                                 weights=weights)
      else:
        values = value_fn(params["value"], params["policy"], batch["encoder_input_tokens"])
        per_example, metrics = losses.dro_loss(policy, ref, values, batch["reward"], tau=1.0,
                                               weights=weights)
    elif name == "sft":
      scores = _score(model, params["policy"], batch)
      per_example, metrics = losses.sft_loss(scores["token_logps"],
                                             batch["decoder_target_tokens"] > 0, weights=weights)
    else:
      raise ValueError(name)
    return losses.reduce_loss(per_example, weights), metrics

  return loss


def judge_loss_fn(name: str, model, reward_network) -> Callable:
  """Reward model (Bradley-Terry, encoder + head over prompt ‖ response) and pairwise judge."""

  def loss(params, ref_params, batch):
    del ref_params
    weights = batch["example_weights"]
    prompt = batch["encoder_input_tokens"]
    chosen = batch["chosen_decoder_target_tokens"]
    rejected = batch["rejected_decoder_target_tokens"]
    if name == "reward_model":
      both = jnp.concatenate([jnp.concatenate([prompt, chosen], 1),
                              jnp.concatenate([prompt, rejected], 1)], 0)
      rewards = reward_network.apply({"params": params["policy"]}, both)
      chosen_rewards, rejected_rewards = jnp.split(rewards, 2)
      per_example, metrics = losses.reward_model_loss(chosen_rewards, rejected_rewards,
                                                       weights=weights)
    else:
      first = jnp.concatenate([prompt, chosen, rejected], 1)
      swapped = jnp.concatenate([prompt, rejected, chosen], 1)
      inputs = jnp.concatenate([first, swapped], 0)
      start = jnp.zeros((inputs.shape[0], 1), jnp.int32)
      logits = model.apply({"params": params["policy"]}, inputs, start)[:, 0]
      label_logps = jax.nn.log_softmax(logits.astype(jnp.float32))[:, [A_TOKEN, B_TOKEN]]
      first_logps, swapped_logps = jnp.split(label_logps, 2)
      per_example, metrics = losses.preference_model_loss(first_logps, swapped_logps,
                                                          batch["label"], weights=weights)
    return losses.reduce_loss(per_example, weights), metrics

  return loss


def make_step(loss, optimizer, alpha: float, sync_every: int) -> Callable:
  def step(state, batch):
    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
        state["params"], state["ref"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    count = state["step"] + 1
    ref = state["ref"]
    if ref is not None:
      ref = reference.update(ref, params["policy"], count, alpha=alpha, sync_every=sync_every)
    metrics["grad_norm"] = optax.global_norm(grads)
    return {"params": params, "ref": ref, "opt_state": opt_state, "step": count}, metrics
  return step


def build(name: str, config: t5_lib.T5Config, policy_params: Any, rng: jax.Array):
  """(step, state) for one benchmark row."""
  model = t5_lib.T5(config)
  opt_config = optim.default_config()
  opt_config.warmup_steps = 0
  alpha, sync_every = 0.0, 1  # frozen reference
  value_fn, tau = None, None
  params = {"policy": jax.tree.map(jnp.copy, policy_params)}
  ref = reference.init(policy_params)
  if name.startswith("dro"):
    tau = 1.0
    if name != "dro_p":
      variant = name.split(":")[1] if ":" in name else "double_multiple"
      value_fn = value_lib.make_value_function(variant, config)
      params["value"] = value_fn.init(policy_params, rng)
  if name == "tr_dpo":
    alpha, sync_every = 0.6, 1
  if name in ("reward_model", "preference_model", "sft"):
    ref = None
  if name == "reward_model":
    opt_config.multiply_by_parameter_scale = False  # its head starts at zero (see optim.py)
    network = value_lib.EncoderValueNetwork(config)
    params = {"policy": value_lib.DoubleNetMultipleValues(config).init(policy_params, rng)}
    loss = judge_loss_fn(name, model, network)
  elif name == "preference_model":
    loss = judge_loss_fn(name, model, None)
  else:
    loss = policy_loss_fn(name.split(":")[0], model, value_fn)
  optimizer = optim.make_joint_optimizer(opt_config, tau=tau)
  state = {"params": params, "ref": ref, "opt_state": optimizer.init(params),
           "step": jnp.int32(0)}
  return make_step(loss, optimizer, alpha, sync_every), state


ROWS = ("sft", "dpo", "tr_dpo", "ipo", "kto", "dro", "dro:double_single", "dro:single_multiple",
        "dro:single_single", "dro_p", "reward_model", "preference_model")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--source_length", type=int, default=32)
  parser.add_argument("--target_length", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--losses", default=",".join(ROWS))
  args = parser.parse_args()

  config = t5_lib.get_config(args.preset)
  policy_params = t5_lib.init_params(config, jax.random.PRNGKey(0))
  batch = make_batch(config, args.batch, args.source_length, args.target_length)
  print(f"T5 {args.preset} ({sum(x.size for x in jax.tree.leaves(policy_params)):,} params), "
        f"batch {args.batch} x ({args.source_length} -> {args.target_length}), "
        f"{jax.devices()[0].platform} x {jax.device_count()}, Adafactor, state donated")
  print(f"{'loss':<22}{'compile s':>11}{'step ms':>10}{f'loss@{args.repeats + 1}':>13}")
  for name in args.losses.split(","):
    step, state = build(name, config, policy_params, jax.random.PRNGKey(1))
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
    print(f"{name:<22}{compile_s:>11.2f}{np.median(times) * 1e3:>10.2f}"
          f"{float(metrics['loss']):>13.4f}")


if __name__ == "__main__":
  main()
