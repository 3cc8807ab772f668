"""Optimizers from config: defaults, warm-up, clip -> optimizer -> 1/τ scale, per-network rates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dro_jax import optim


def _adamw_config(**changes):
  config = optim.default_config()
  config.name = "adamw"
  config.warmup_steps = 0
  config.learning_rate = 0.1
  config.update(changes)
  return config


def test_default_config_is_the_dro_papers_recipe():
  config = optim.default_config()
  assert config.name == "adafactor" and config.decay_rate == 0.8
  assert config.learning_rate == 1e-4 and config.warmup_steps == 150
  assert config.policy_update_scale == "inverse_tau"
  config.lock()
  with pytest.raises(AttributeError):
    config.learning_rat = 1.0  # a typo in --config.optimizer.x fails once locked


def test_linear_warmup_then_constant():
  schedule = optim.warmup_schedule(1e-4, 150)
  for step, expected in [(0, 0.0), (75, 5e-5), (150, 1e-4), (10_000, 1e-4)]:
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)
  assert float(optim.warmup_schedule(0.3, 0)(0)) == pytest.approx(0.3)


def test_resolve_update_scale():
  assert optim.resolve_update_scale("inverse_tau", 0.1) == pytest.approx(10.0)
  assert optim.resolve_update_scale("none", 0.1) == 1.0
  assert optim.resolve_update_scale("0.5", 0.1) == 0.5
  assert optim.resolve_update_scale("inverse_tau", None) == 1.0  # not a DRO loss
  with pytest.raises(ValueError, match="policy_update_scale"):
    optim.resolve_update_scale("half", 1.0)


def test_policy_update_scale_multiplies_the_update_not_the_gradient():
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.3, -1.0, 2e-3])}
  adam = optax.adam(0.1)
  scaled = optax.chain(optax.adam(0.1), optim.policy_update_scale(10.0))
  plain_update, _ = adam.update(grads, adam.init(params), params)
  scaled_update, state = scaled.update(grads, scaled.init(params), params)
  np.testing.assert_allclose(np.asarray(scaled_update["w"]), 10 * np.asarray(plain_update["w"]),
                             rtol=1e-6)
  # Why after the optimizer: the same factor on the gradient is normalised away by Adam.
  gradient_scaled, _ = adam.update(jax.tree.map(lambda g: 10 * g, grads), adam.init(params),
                                   params)
  np.testing.assert_allclose(np.asarray(gradient_scaled["w"]), np.asarray(plain_update["w"]),
                             rtol=1e-5)
  assert isinstance(state[1], optax.EmptyState)


def test_clip_on_the_raw_gradient_then_optimizer_then_scale():
  config = _adamw_config(grad_clip_norm=1.0, learning_rate=1.0)
  tau = 0.25
  optimizer = optim.make_optimizers(config, tau=tau)["policy"]
  params = {"w": jnp.zeros(4)}
  # A huge first gradient, then a small one: clipping changes Adam's second update.
  grads = [{"w": jnp.array([300.0, -400.0, 0.0, 0.0])}, {"w": jnp.array([0.1, 0.2, -0.3, 0.4])}]

  reference = optax.adamw(1.0, weight_decay=0.0)
  reference_state = reference.init(params)
  state = optimizer.init(params)
  first = None
  for g in grads:
    update, state = optimizer.update(g, state, params)
    first = update if first is None else first
    norm = float(jnp.linalg.norm(g["w"]))
    clipped = {"w": g["w"] * min(1.0, 1.0 / norm)}
    expected, reference_state = reference.update(clipped, reference_state, params)
    np.testing.assert_allclose(np.asarray(update["w"]), np.asarray(expected["w"]) / tau,
                               rtol=1e-5, atol=1e-7)
  # The scale acts after the clip: the update (lr·sign(g)/τ) is not limited to the clip norm.
  assert float(jnp.linalg.norm(first["w"])) > 1.0


def test_adafactor_default_and_scale_none():
  params = {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
  grads = jax.tree.map(lambda x: jnp.linspace(-1.0, 1.0, x.size).reshape(x.shape) + 0.1, params)
  config = optim.default_config()
  config.warmup_steps = 0
  scaled = optim.make_optimizers(config, tau=0.5)["policy"]
  config.policy_update_scale = "none"
  unscaled = optim.make_optimizers(config, tau=0.5)["policy"]
  a, _ = scaled.update(grads, scaled.init(params), params)
  b, _ = unscaled.update(grads, unscaled.init(params), params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.all(np.isfinite(np.asarray(x))) and float(jnp.max(jnp.abs(y))) > 0
    np.testing.assert_allclose(np.asarray(x), 2.0 * np.asarray(y), rtol=1e-6)


def _first_updates(optimizer, params, grads):
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  return updates


def test_per_network_learning_rates_and_the_scale_on_the_policy_only():
  config = _adamw_config(learning_rate=0.01, value_learning_rate=0.05)
  params = {"policy": {"w": jnp.ones(3)}, "value": {"head": jnp.ones(2)}}
  grads = {"policy": {"w": jnp.array([1.0, -1.0, 2.0])}, "value": {"head": jnp.array([3.0, -1.0])}}
  # Adam's first step is lr·sign(g).
  updates = _first_updates(optim.make_joint_optimizer(config, tau=0.5), params, grads)
  np.testing.assert_allclose(np.asarray(updates["policy"]["w"]), -0.01 / 0.5 * np.sign([1, -1, 2]),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(updates["value"]["head"]), -0.05 * np.sign([3, -1]),
                             rtol=1e-5)
  # Single-net value functions live with the policy: its learning rate and its scale.
  shared = _first_updates(optim.make_joint_optimizer(config, tau=0.5, value_with_policy=True),
                          params, grads)
  np.testing.assert_allclose(np.asarray(shared["value"]["head"]), -0.01 / 0.5 * np.sign([3, -1]),
                             rtol=1e-5)
  # Without a value network (DPO, KTO, DRO-P) the tree holds the policy only.
  policy_only = _first_updates(optim.make_joint_optimizer(config), {"policy": params["policy"]},
                               {"policy": grads["policy"]})
  np.testing.assert_allclose(np.asarray(policy_only["policy"]["w"]), -0.01 * np.sign([1, -1, 2]),
                             rtol=1e-5)


def test_learning_rate_schedules_per_network_and_unknown_names():
  config = optim.default_config()
  config.value_learning_rate = 5e-4
  assert float(optim.learning_rate(config, "policy")(150)) == pytest.approx(1e-4)
  assert float(optim.learning_rate(config, "value")(150)) == pytest.approx(5e-4)
  config.value_learning_rate = None
  assert float(optim.learning_rate(config, "value")(150)) == pytest.approx(1e-4)
  config.name = "sgd"
  with pytest.raises(ValueError, match="unknown optimizer"):
    optim.make_optimizer(config)


def test_zero_initialised_value_head_learns_under_default_adafactor():
  """Parameter-scaled Adafactor would move a zero parameter by ~1e-3·lr per step."""
  config = optim.default_config()
  config.warmup_steps = 0
  params = {"policy": {"w": jnp.zeros(3)}, "value": {"head": jnp.zeros(3)}}
  grads = {"policy": {"w": jnp.ones(3)}, "value": {"head": jnp.ones(3)}}
  updates = _first_updates(optim.make_joint_optimizer(config, tau=1.0), params, grads)
  assert float(jnp.max(jnp.abs(updates["value"]["head"]))) == pytest.approx(1e-4, rel=1e-3)
  assert float(jnp.max(jnp.abs(updates["policy"]["w"]))) == pytest.approx(1e-7, rel=1e-3)
