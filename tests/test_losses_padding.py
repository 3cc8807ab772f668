"""Padding rows may hold garbage: NaN or inf there must not reach the loss nor its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax import losses

B = 6
WEIGHTS = jnp.array([1.0, 0.0, 1.0, 2.0, 0.0, 1.0])
PADDING = np.asarray(WEIGHTS) == 0


def _arrays(garbage: float, count: int, seed: int = 0, trailing: tuple[int, ...] = ()):
  rng = np.random.default_rng(seed)
  arrays = []
  for _ in range(count):
    x = rng.normal(size=(B,) + trailing).astype(np.float32) - 3.0
    x[PADDING] = garbage
    arrays.append(jnp.asarray(x))
  return arrays


def _loss_fns():
  desirable = jnp.array([True, False, True, False, True, False])
  rewards_label = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
  return {
      "dpo": (4, lambda a: losses.dpo_loss(*a, beta=0.5, label_smoothing=0.1, weights=WEIGHTS)),
      "ipo": (4, lambda a: losses.ipo_loss(*a, tau=0.1, chosen_lengths=jnp.full((B,), 3.0),
                                           rejected_lengths=jnp.full((B,), 2.0),
                                           weights=WEIGHTS)),
      "kto": (4, lambda a: losses.kto_loss(*a, desirable, beta=1.0, weights=WEIGHTS)),
      "dro": (4, lambda a: losses.dro_loss(*a, tau=1.0, weights=WEIGHTS)),
      "dro_p": (3, lambda a: losses.dro_p_loss(*a, tau=0.5, weights=WEIGHTS)),
      "reward_model": (2, lambda a: losses.reward_model_loss(*a, weights=WEIGHTS)),
      "preference_model": (2, lambda a: losses.preference_model_loss(
          *[x[:, None] * jnp.ones((1, 2)) for x in a], rewards_label, weights=WEIGHTS)),
  }


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", sorted(_loss_fns()))
def test_gradients_are_finite_and_ignore_padding_rows(name, garbage):
  count, fn = _loss_fns()[name]

  def scalar(arrays):
    loss_B, _ = fn(arrays)
    return losses.reduce_loss(loss_B, WEIGHTS)

  dirty = _arrays(garbage, count)
  clean = _arrays(0.0, count)
  value, grads = jax.value_and_grad(scalar)(dirty)
  clean_value, clean_grads = jax.value_and_grad(scalar)(clean)
  assert np.isfinite(float(value))
  np.testing.assert_allclose(value, clean_value, rtol=1e-6)
  for grad, clean_grad in zip(grads, clean_grads):
    assert np.all(np.isfinite(grad)), (name, grad)
    np.testing.assert_allclose(grad, clean_grad, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(grad)[PADDING], 0.0)
  _, metrics = fn(dirty)
  for key, metric in metrics.items():
    assert np.isfinite(float(metric)), (name, key)


@pytest.mark.parametrize("garbage", [np.nan, np.inf])
def test_sft_gradients_ignore_padding_rows(garbage):
  token_logps = np.full((B, 4), -1.5, np.float32)
  token_logps[PADDING] = garbage
  loss_weights = jnp.ones((B, 4))

  def scalar(t):
    loss_B, _ = losses.sft_loss(t, loss_weights, weights=WEIGHTS)
    return losses.reduce_loss(loss_B, WEIGHTS)

  grad = jax.grad(scalar)(jnp.asarray(token_logps))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(grad)[PADDING], 0.0)


def test_mismatched_partners_pair_real_rows_only():
  weights = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
  partners = np.asarray(losses.mismatched_partners(weights))
  # Real rows 0, 2, 3, 6 pair cyclically with the next real row; padding rows map to themselves.
  np.testing.assert_array_equal(partners, [2, 1, 3, 6, 4, 5, 0, 7])
  assert np.asarray(losses.mismatched_partners(jnp.ones(3))).tolist() == [1, 2, 0]
  assert np.asarray(losses.mismatched_partners(jnp.array([0.0, 1.0, 0.0]))).tolist() == [0, 1, 2]
  assert np.asarray(losses.mismatched_partners(jnp.zeros(2))).tolist() == [0, 1]


def test_mismatched_batch_gathers_responses_or_uses_data_level_partners():
  batch = {"encoder_input_tokens": jnp.arange(4)[:, None] + 10,
           "decoder_target_tokens": jnp.arange(4)[:, None] + 20,
           "decoder_input_tokens": jnp.arange(4)[:, None] + 30,
           "example_weights": jnp.array([1.0, 1.0, 0.0, 1.0])}
  mismatched = losses.mismatched_batch(batch)
  np.testing.assert_array_equal(mismatched["encoder_input_tokens"][:, 0], [10, 11, 12, 13])
  np.testing.assert_array_equal(mismatched["decoder_target_tokens"][:, 0], [21, 23, 22, 20])
  batch["kl_decoder_target_tokens"] = batch["decoder_target_tokens"] + 100
  batch["kl_decoder_input_tokens"] = batch["decoder_input_tokens"] + 100
  data_level = losses.mismatched_batch(batch)
  np.testing.assert_array_equal(data_level["decoder_target_tokens"][:, 0], [120, 121, 122, 123])


def test_statistics_given_by_the_caller_equal_the_batch_ones():
  policy, ref, kl_policy, kl_ref = _arrays(0.0, 4, seed=3)
  rewards = jnp.linspace(-1.0, 1.0, B)
  desirable = losses.above_mean_reward(rewards, WEIGHTS)
  z0 = losses.kto_reference_point(kl_policy + 1.0, kl_ref, WEIGHTS)
  own, _ = losses.kto_loss(policy, ref, kl_policy + 1.0, kl_ref, desirable, weights=WEIGHTS)
  given, _ = losses.kto_loss(policy, ref, None, None, desirable, weights=WEIGHTS, z0=z0)
  np.testing.assert_allclose(own, given, rtol=1e-6)
  baseline = losses.dro_p_baseline(policy, ref, rewards, tau=0.5, weights=WEIGHTS)
  own, _ = losses.dro_p_loss(policy, ref, rewards, tau=0.5, weights=WEIGHTS)
  given, _ = losses.dro_p_loss(policy, ref, rewards, tau=0.5, weights=WEIGHTS, baseline=baseline)
  np.testing.assert_allclose(own, given, rtol=1e-6)
