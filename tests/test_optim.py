"""Optimizers from config: defaults, warm-up, clip -> optimizer -> 1/τ scale, per-network rates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dro_jax import optim
from dro_jax.models import t5 as t5_lib
from dro_jax.models import value as value_lib


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


# ----------------------------------------------------------------------------------------------
# Value parameters of every DRO-V variant learn on the value chain by default (issue 8, item 3).

STEPS = 1000  # the measurement: 1000 steps at lr 1e-4 toward V = 1


def _paper_config():
  config = optim.default_config()
  config.warmup_steps = 0
  return config


def _value_params(name: str, copied_scale: float = 1.0):
  """A variant's zero-valued φ; double_multiple copies a stand-in policy encoder."""
  config = t5_lib.get_config("tiny")
  policy = {"token_embedder": {"embedding": jnp.full((8, config.emb_dim), copied_scale)},
            "encoder": {"layers_0": {"kernel": jnp.full((config.emb_dim, 4), copied_scale)},
                        "encoder_norm": {"scale": jnp.full((config.emb_dim,), copied_scale)}}}
  value_fn = value_lib.make_value_function(name, config)
  return value_fn.init(policy, jax.random.PRNGKey(0)), config.emb_dim


def _prediction(value_params, emb_dim: int):
  """V for one prompt: the scalar, or the zero-initialised head on fixed encoder features."""
  if "value" in value_params:
    return value_params["value"]
  encoded = jnp.full((1, 4, emb_dim), 0.1)
  return value_lib.ValueHead().apply({"params": value_params["head"]}, encoded,
                                     jnp.ones((1, 4)))[0]


def _trained_value(optimizer, params, predict, steps: int = STEPS) -> float:
  """V after `steps` steps of (V - 1)² under `optimizer`, as one compiled scan."""

  def step(carry, _):
    params, state = carry
    grads = jax.grad(lambda p: (predict(p) - 1.0) ** 2)(params)
    updates, state = optimizer.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)), None,
                                                  length=steps))(params)
  return float(predict(params))


@pytest.mark.parametrize("name", sorted(value_lib.VALUE_FUNCTIONS))
def test_every_variants_value_learns_on_the_value_chain_not_the_policys(name):
  value_params, emb_dim = _value_params(name)
  optimizers = optim.make_optimizers(_paper_config(), tau=1.0)
  # Absolute steps: each step moves a zero-initialised leaf by ~lr, so V reaches ~0.1 and more.
  learned = _trained_value(optimizers["value"], value_params,
                           lambda p: _prediction(p, emb_dim))
  assert learned > 0.05
  # On the policy's chain the step is ~1e-3·lr: V stays ~1e-4. Single-net variants were there.
  stuck = _trained_value(optimizers["policy"], value_params, lambda p: _prediction(p, emb_dim))
  assert abs(stuck) < 0.01
  # The joint tree routes φ to the value chain whatever the variant.
  policy = {"w": jnp.zeros(3)}
  joint = _trained_value(optim.make_joint_optimizer(_paper_config(), tau=1.0),
                         {"policy": policy, "value": value_params},
                         lambda p: _prediction(p["value"], emb_dim) + jnp.sum(p["policy"]["w"]))
  assert joint > 0.05


def test_joint_optimizer_puts_the_value_on_the_policy_chain_only_when_asked():
  """The default is the value chain; `value_chain="policy"` (dro.value_optimizer="policy",
  single-net variants only: tests/test_value_optimizer.py) is the one explicit route."""
  with pytest.raises(TypeError):
    kwargs = {"value_with_policy": True}  # no implicit flag
    optim.make_joint_optimizer(_paper_config(), tau=1.0, **kwargs)
  value_params, emb_dim = _value_params("single_single")
  tree = {"policy": {"w": jnp.zeros(3)}, "value": value_params}
  predict = lambda p: _prediction(p["value"], emb_dim) + jnp.sum(p["policy"]["w"])
  on_policy = _trained_value(optim.make_joint_optimizer(_paper_config(), tau=1.0,
                                                        value_chain="policy"), tree, predict,
                             steps=100)
  on_value = _trained_value(optim.make_joint_optimizer(_paper_config(), tau=1.0), tree, predict,
                            steps=100)
  assert on_value > 100 * on_policy > 0  # θ's w is zero too: both move by ~1e-3·lr on θ's chain


def test_copied_encoder_takes_relative_steps_and_the_head_absolute_ones():
  """The copied encoder is at the policy's scale: absolute steps would be ~RMS(θ) too large."""
  rms = 3.0
  value_params, _ = _value_params("double_multiple", copied_scale=rms)
  grads = jax.tree.map(jnp.ones_like, value_params)
  config = _paper_config()
  lr = config.learning_rate

  def check(updates):
    for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
      expected = lr if "head" in jax.tree_util.keystr(path) else rms * lr  # Adafactor's 1st step
      np.testing.assert_allclose(np.asarray(update), -expected, rtol=1e-3,
                                 err_msg=jax.tree_util.keystr(path))

  check(_first_updates(optim.make_optimizers(config, tau=0.5)["value"], value_params, grads))
  joint = _first_updates(optim.make_joint_optimizer(config, tau=0.5),
                         {"policy": {"w": jnp.ones(3)}, "value": value_params},
                         {"policy": {"w": jnp.ones(3)}, "value": grads})
  check(joint["value"])
  # Both settings relative: the whole value tree is parameter-scaled, the head included.
  config.value_multiply_by_parameter_scale = True
  updates = _first_updates(optim.make_optimizers(config)["value"], value_params, grads)
  assert float(jnp.max(jnp.abs(updates["head"]["bias"]))) == pytest.approx(1e-3 * lr, rel=1e-3)
