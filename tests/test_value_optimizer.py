"""config.dro.value_optimizer: which chain a single-net variant's value parameters take.

"value" (default): every variant's φ on the value chain, so single_single trains exactly as
double_single. "policy": the DRO paper's single-net ablation, φ on the POLICY's chain (its learning
rate, 1/τ, Adafactor's parameter-scaled step); the four variants train four different ways.
Double-net variants keep their own network and chain under either setting.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax import configs, initialization, optim, step as step_lib
from dro_jax.models import value as value_lib
from run_helpers import set_dotted

VARIANTS = ("double_multiple", "double_single", "single_multiple", "single_single")
B, SOURCE, TARGET = 8, 8, 6


def make_batch(seed: int) -> dict[str, jnp.ndarray]:
  """A DRO batch of random tokens with ragged padding and one zero-weight row."""
  rng = np.random.default_rng(seed)

  def tokens(length):
    lengths = rng.integers(2, length + 1, size=B)
    array = rng.integers(2, 90, size=(B, length)).astype(np.int32)
    array[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return array

  targets = tokens(TARGET)
  weights = np.ones(B, np.float32)
  weights[3] = 0.0
  return {"encoder_input_tokens": jnp.asarray(tokens(SOURCE)),
          "decoder_input_tokens": jnp.asarray(np.pad(targets, ((0, 0), (1, 0)))[:, :-1]),
          "decoder_target_tokens": jnp.asarray(targets),
          "decoder_loss_weights": jnp.asarray((targets > 0).astype(np.float32)),
          "reward": jnp.asarray(rng.normal(size=B).astype(np.float32)),
          "example_weights": jnp.asarray(weights)}


def dro_config(arg: str = "", **changes):
  """The dro recipe, tiny with one layer per stack; `changes` as dotted keys."""
  config = configs.load("dro", f"size=tiny{',' + arg if arg else ''}")
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 1e-2
  config.batch_size = B
  return set_dotted(config, changes)


# CPU compile time dominates these runs; XLA's backend optimisations do not pay for 3 steps.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def initial_policy():
  """One random tiny policy (one layer per stack) shared by every run of the session."""
  config = dro_config()
  model_config = step_lib.t5_config(config)
  return jax.jit(lambda rng: initialization.init_policy(config, model_config, rng))(
      jax.random.PRNGKey(0))


def init_state(config):
  """The run's initial state from the shared policy (its value, optimizer states, reference)."""
  model_config = step_lib.t5_config(config)
  return initialization.make_init_fn(config, model_config)(jax.random.PRNGKey(config.seed),
                                                           initial_policy())


def compile_step(config, state, batch):
  return jax.jit(step_lib.make_train_step(config)).lower(state, batch).compile(FAST_COMPILE)


def run(config, batches):
  """(final state, per-step metrics on the host) of the train step over `batches`."""
  state = init_state(config)
  train_step = compile_step(config, state, batches[0])
  history = []
  for batch in batches:
    state, metrics = train_step(state, batch)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


STEPS = 3


@functools.lru_cache(maxsize=None)
def trajectory(variant: str, value_optimizer: str):
  """3 DRO steps (τ = 0.5, Adafactor, lr 1e-2) on the same batches for every variant."""
  config = dro_config(f"value={variant},value_optimizer={value_optimizer},tau=0.5")
  return run(config, [make_batch(seed) for seed in range(STEPS)])


def _same(a, b) -> bool:
  """Bitwise equality of two trees (of the same structure)."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _same_run(a, b) -> bool:
  (state_a, history_a), (state_b, history_b) = a, b
  losses_equal = [float(m["loss"]) for m in history_a] == [float(m["loss"]) for m in history_b]
  return losses_equal and _same(state_a.policy, state_b.policy)


def test_value_chain_by_variant_and_setting():
  for variant in VARIANTS:
    single = value_lib.VALUE_FUNCTIONS[variant].trained_with_policy
    assert step_lib.value_chain(dro_config(f"value={variant}")) == "value"
    expected = "policy" if single else "value"  # double nets keep their own chain
    assert step_lib.value_chain(dro_config(f"value={variant},value_optimizer=policy")) == expected
  assert dro_config().dro.value_optimizer == "value"
  # Losses without a learned value never read the setting.
  assert step_lib.value_chain(configs.load("kto", "size=tiny")) == "value"
  with pytest.raises(ValueError, match="value_optimizer"):
    dro_config("value_optimizer=both")
  with pytest.raises(ValueError, match="value_optimizer"):
    step_lib.value_chain(dro_config(**{"dro.value_optimizer": "both"}))


def test_policy_setting_moves_a_single_net_scalar_by_the_policys_step():
  """Adafactor's first step on a zero scalar: lr on the value chain; on the policy chain
  max(RMS(φ), 1e-3)·lr scaled by 1/τ."""
  config = optim.default_config()
  config.warmup_steps = 0
  lr, tau = config.learning_rate, 0.5
  params = {"value": jnp.zeros((), jnp.float32)}
  grads = {"value": jnp.ones((), jnp.float32)}
  steps = {}
  for chain in ("value", "policy"):
    optimizer = optim.make_optimizers(config, tau=tau, value_chain=chain)["value"]
    update, _ = optimizer.update(grads, optimizer.init(params), params)
    steps[chain] = float(update["value"])
  assert steps["value"] == pytest.approx(-lr, rel=1e-3)
  assert steps["policy"] == pytest.approx(-1e-3 * lr / tau, rel=1e-3)
  with pytest.raises(ValueError, match="chain"):
    optim.make_optimizers(config, value_chain="both")


def test_joint_optimizer_clips_theta_and_phi_together_on_the_policy_chain():
  config = optim.default_config()
  config.update({"name": "adamw", "warmup_steps": 0, "learning_rate": 1.0,
                 "value_learning_rate": 0.25, "grad_clip_norm": 1.0})
  params = {"policy": {"w": jnp.zeros(2)}, "value": {"value": jnp.zeros(())}}
  grads = {"policy": {"w": jnp.array([3.0, 0.0])}, "value": {"value": jnp.array(4.0)}}
  # Adam's first step is lr·sign(g) whatever the clip: compare the moments instead.
  for chain, expected_mu_value in (("value", 0.1 * 1.0), ("policy", 0.1 * 4.0 / 5.0)):
    optimizer = optim.make_joint_optimizer(config, tau=0.5, value_chain=chain)
    updates, state = optimizer.update(grads, optimizer.init(params), params)
    mus = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
           if ".mu" in jax.tree_util.keystr(path) and "value" in jax.tree_util.keystr(path)]
    assert float(sum(jnp.sum(m) for m in mus)) == pytest.approx(expected_mu_value, rel=1e-5)
    # The value's step: the value rate on its own chain, the policy's lr/τ on the policy's.
    expected = -0.25 if chain == "value" else -1.0 / 0.5
    assert float(updates["value"]["value"]) == pytest.approx(expected, rel=1e-5)


def test_policy_setting_gives_four_distinct_trajectories():
  runs = {variant: trajectory(variant, "policy") for variant in VARIANTS}
  for i, a in enumerate(VARIANTS):
    for b in VARIANTS[i + 1:]:
      assert not _same_run(runs[a], runs[b]), f"{a} and {b} trained identically"
  # The single-net scalar takes the policy's parameter-scaled step: ~1e-3·lr/τ, not lr.
  scalar = abs(float(runs["single_single"][0].value["value"]))
  double_scalar = abs(float(runs["double_single"][0].value["value"]))
  assert 0 < scalar < 1e-3 * double_scalar * 10
  for _, history in runs.values():
    assert all(np.isfinite(m["loss"]) for m in history)


def test_value_setting_merges_only_the_two_scalar_variants():
  runs = {variant: trajectory(variant, "value") for variant in VARIANTS}
  # One zero-initialised scalar on the value chain with exactly ∂L/∂φ (value_loss_weight 1):
  # the same algorithm, bitwise.
  assert _same_run(runs["single_single"], runs["double_single"])
  assert _same(runs["single_single"][0].value, runs["double_single"][0].value)
  distinct = ("double_multiple", "double_single", "single_multiple")
  for i, a in enumerate(distinct):
    for b in distinct[i + 1:]:
      assert not _same_run(runs[a], runs[b]), f"{a} and {b} trained identically"
  # Double-net variants keep their own chain under either setting.
  for variant in ("double_multiple", "double_single"):
    assert _same_run(runs[variant], trajectory(variant, "policy"))
    assert _same(runs[variant][0].value, trajectory(variant, "policy")[0].value)
