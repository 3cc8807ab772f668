"""Value functions: initialisation, masked pooling, float32 output, and where the gradients go."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax import losses, scoring
from dro_jax.models import t5 as t5_lib
from dro_jax.models import value as value_lib

TAU = 0.5
ALL = sorted(value_lib.VALUE_FUNCTIONS)


@pytest.fixture(scope="module")
def tiny():
  config = t5_lib.get_config("tiny")
  params = t5_lib.init_params(config, jax.random.PRNGKey(0))
  ref_params = t5_lib.init_params(config, jax.random.PRNGKey(1))
  return config, params, ref_params


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, 256, size=(3, 6)).astype(np.int32)
  inputs[1, 3:] = 0
  inputs[2, 5:] = 0
  targets = rng.integers(2, 256, size=(3, 5)).astype(np.int32)
  targets[0, 4:] = 0
  decoder_inputs = np.concatenate([np.zeros((3, 1), np.int32), targets[:, :-1]], 1)
  return {"encoder_input_tokens": jnp.asarray(inputs),
          "decoder_input_tokens": jnp.asarray(decoder_inputs),
          "decoder_target_tokens": jnp.asarray(targets),
          "reward": jnp.asarray([0.5, -1.0, 2.0], jnp.float32),
          "example_weights": jnp.asarray([1.0, 1.0, 0.0])}


def _nonzero_head(value_params, seed=3):
  """A trained-looking head: a zero head would block every gradient into the encoder."""
  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    if "head" in name or "'value'" in name:
      return jax.random.normal(jax.random.PRNGKey(seed), x.shape, x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(perturb, value_params)


def _dro_objective(value_fn, model, ref_params, batch, stop_value_gradient=False):
  def objective(policy_params, value_params):
    scores = scoring.score(model, policy_params, batch["encoder_input_tokens"],
                           batch["decoder_input_tokens"], batch["decoder_target_tokens"])
    ref = scoring.score(model, ref_params, batch["encoder_input_tokens"],
                        batch["decoder_input_tokens"], batch["decoder_target_tokens"])
    values = value_fn(value_params, policy_params, batch["encoder_input_tokens"])
    if stop_value_gradient:
      values = jax.lax.stop_gradient(values)
    loss, _ = losses.dro_loss(scores["logps"], ref["logps"], values, batch["reward"], tau=TAU,
                              weights=batch["example_weights"])
    return losses.reduce_loss(loss, batch["example_weights"])
  return objective


def _zero(tree):
  return all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(tree))


def _all_nonzero(tree):
  return all(bool(jnp.any(x != 0)) for x in jax.tree.leaves(tree))


def test_registry_and_flags(tiny):
  config, _, _ = tiny
  assert set(ALL) == {"double_multiple", "double_single", "single_multiple", "single_single"}
  for name in ALL:
    value_fn = value_lib.make_value_function(name, config)
    assert value_fn.trained_with_policy == name.startswith("single")
  with pytest.raises(ValueError, match="unknown value function"):
    value_lib.make_value_function("triple", config)


@pytest.mark.parametrize("name", ALL)
def test_init_is_zero_valued_float32_and_matches_abstract_params(tiny, batch, name):
  config, params, _ = tiny
  value_fn = value_lib.make_value_function(name, config)
  value_params = value_fn.init(params, jax.random.PRNGKey(2))
  values = jax.jit(value_fn)(value_params, params, batch["encoder_input_tokens"])
  assert values.shape == (3,) and values.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(values), 0.0)
  abstract = nn.unbox(value_fn.abstract_params())
  assert jax.tree.structure(abstract) == jax.tree.structure(value_params)
  for a, v in zip(jax.tree.leaves(abstract), jax.tree.leaves(value_params)):
    assert a.shape == v.shape and v.dtype == jnp.float32
  nn.get_partition_spec(value_fn.abstract_params())  # logical axes for sharded init


def test_double_net_encoder_starts_as_the_policy_encoder(tiny):
  config, params, _ = tiny
  value_fn = value_lib.make_value_function("double_multiple", config)
  value_params = value_fn.init(params, jax.random.PRNGKey(2))
  for key in ("token_embedder", "encoder"):
    jax.tree.map(np.testing.assert_array_equal, value_params[key], params[key])
    for v, p in zip(jax.tree.leaves(value_params[key]), jax.tree.leaves(params[key])):
      assert v.unsafe_buffer_pointer() != p.unsafe_buffer_pointer()  # a copy: donation-safe
  assert _zero(value_params["head"])


def test_masked_mean_pool_ignores_padding():
  rng = np.random.default_rng(4)
  encoded = rng.normal(size=(2, 4, 3)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)
  garbage = encoded.copy()
  garbage[~mask] = 1e6
  pooled = value_lib.masked_mean_pool(jnp.asarray(garbage), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(pooled[0]), encoded[0, :2].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(pooled[1]), 0.0)  # empty prompt: 0, not NaN
  head = {"kernel": jnp.asarray(rng.normal(size=(3, 1)), jnp.float32), "bias": jnp.ones(1)}
  values = value_lib.ValueHead().apply({"params": head}, jnp.asarray(garbage), mask)
  np.testing.assert_allclose(np.asarray(values[0]),
                             encoded[0, :2].mean(0) @ np.asarray(head["kernel"])[:, 0] + 1.0,
                             rtol=1e-5)


@pytest.mark.parametrize("name", ["double_multiple", "single_multiple"])
def test_values_do_not_depend_on_extra_padding(tiny, batch, name):
  config, params, _ = tiny
  value_fn = value_lib.make_value_function(name, config)
  value_params = _nonzero_head(value_fn.init(params, jax.random.PRNGKey(2)))
  tokens = batch["encoder_input_tokens"]
  padded = jnp.pad(tokens, ((0, 0), (0, 3)))
  values = jax.jit(value_fn)
  np.testing.assert_allclose(np.asarray(values(value_params, params, tokens)),
                             np.asarray(values(value_params, params, padded)), rtol=1e-5,
                             atol=1e-5)


def test_head_is_float32_with_a_bfloat16_encoder(tiny, batch):
  config, params, _ = tiny
  value_fn = value_lib.make_value_function("double_multiple", config.replace(dtype="bfloat16"))
  value_params = _nonzero_head(value_fn.init(params, jax.random.PRNGKey(2)))
  values = jax.jit(value_fn)(value_params, params, batch["encoder_input_tokens"])
  assert values.dtype == jnp.float32


@pytest.mark.parametrize("name", ["double_multiple", "double_single"])
def test_double_net_value_gradients_reach_only_the_value_params(tiny, batch, name):
  config, params, ref_params = tiny
  model = t5_lib.T5(config)
  value_fn = value_lib.make_value_function(name, config)
  value_params = _nonzero_head(value_fn.init(params, jax.random.PRNGKey(2)))
  tokens, weights = batch["encoder_input_tokens"], batch["example_weights"]

  @jax.jit
  def analyse(params, value_params):
    # The value term alone.
    value_term_grads = jax.grad(lambda p, v: jnp.sum(value_fn(v, p, tokens)),
                                argnums=(0, 1))(params, value_params)
    # The full loss's value gradient, and the paper's Eq. 7: mean[(V − r + τℓ)·∇V].
    grad_value = jax.grad(_dro_objective(value_fn, model, ref_params, batch),
                          argnums=1)(params, value_params)
    logratio = (scoring.score(model, params, tokens, batch["decoder_input_tokens"],
                              batch["decoder_target_tokens"])["logps"]
                - scoring.score(model, ref_params, tokens, batch["decoder_input_tokens"],
                                batch["decoder_target_tokens"])["logps"])
    values, vjp = jax.vjp(lambda v: value_fn(v, params, tokens), value_params)
    cotangent = (values - batch["reward"] + TAU * logratio) * weights / jnp.sum(weights)
    return value_term_grads, grad_value, vjp(cotangent)[0]

  (grad_policy, grad_value_term), grad_value, expected = analyse(params, value_params)
  assert _zero(grad_policy)  # no path from V to θ
  assert _all_nonzero(grad_value_term)  # a path to every value parameter
  jax.tree.map(lambda g, e: np.testing.assert_allclose(
      np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(e)))),
      grad_value, expected)


def test_single_net_shares_the_policy_encoder(tiny, batch):
  config, params, ref_params = tiny
  model = t5_lib.T5(config)
  value_fn = value_lib.make_value_function("single_multiple", config)
  value_params = _nonzero_head(value_fn.init(params, jax.random.PRNGKey(2)))
  tokens = batch["encoder_input_tokens"]

  grad_policy, grad_value = jax.jit(jax.grad(
      lambda p, v: jnp.sum(value_fn(v, p, tokens)), argnums=(0, 1)))(params, value_params)
  assert _all_nonzero(grad_value)
  assert _all_nonzero(grad_policy["encoder"])
  assert _all_nonzero(grad_policy["token_embedder"])  # the shared embedding feeds the encoder
  assert _zero(grad_policy["decoder"])

  # The encoder gets both gradients, the value term weighted: g(w) = g_policy + w·g_value.
  @jax.jit
  def policy_grads_jit(weight):
    weighted = value_lib.make_value_function("single_multiple", config, value_loss_weight=weight)
    return jax.grad(_dro_objective(weighted, model, ref_params, batch))(params, value_params)

  policy_grads = lambda weight: policy_grads_jit(jnp.float32(weight))

  g0, g_half, g1 = policy_grads(0.0), policy_grads(0.5), policy_grads(1.0)
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(
      np.asarray(b), 0.5 * (np.asarray(a) + np.asarray(c)), rtol=1e-4, atol=1e-7), g0, g_half, g1)
  difference = jax.tree.map(lambda a, c: c - a, g0, g1)
  assert _zero(difference["decoder"])
  assert float(jnp.max(jnp.abs(difference["encoder"]["layers_0"]["mlp"]["wo"]["kernel"]))) > 0

  # A caller that already has the encoder output gets the same values without a second pass.
  encode = jax.jit(lambda p: model.apply({"params": p}, tokens, method=t5_lib.T5.encode))
  np.testing.assert_allclose(
      np.asarray(value_fn.from_encoded(value_params, encode(params), tokens)),
      np.asarray(jax.jit(value_fn)(value_params, params, tokens)), rtol=1e-6)


def test_single_net_single_value_lives_with_the_policy(tiny, batch):
  config, params, _ = tiny
  value_fn = value_lib.make_value_function("single_single", config, value_loss_weight=0.25)
  value_params = {"value": jnp.float32(1.5)}
  tokens = batch["encoder_input_tokens"]
  np.testing.assert_array_equal(np.asarray(value_fn(value_params, params, tokens)), 1.5)
  grad_policy, grad_value = jax.grad(
      lambda p, v: jnp.sum(value_fn(v, p, tokens)), argnums=(0, 1))(params, value_params)
  assert _zero(grad_policy)
  assert float(grad_value["value"]) == pytest.approx(0.25 * 3)


def test_scale_gradient_is_exactly_the_identity_forward():
  x = jnp.array([0.1, 1e-8, 3.0, -7.25])
  np.testing.assert_array_equal(np.asarray(value_lib.scale_gradient(x, 0.3)), np.asarray(x))
  grad = jax.grad(lambda y: jnp.sum(value_lib.scale_gradient(y, 0.3) * 2.0))(x)
  np.testing.assert_allclose(np.asarray(grad), 0.6, rtol=1e-6)
