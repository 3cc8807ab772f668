"""Losses against independent float64 numpy implementations, finite differences, closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dro_jax import losses

B = 7
# Two padding examples (weight 0) and one example counted twice.
WEIGHTS = np.array([1.0, 1.0, 0.0, 2.0, 1.0, 0.0, 1.0])


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _wmean(x, w):
  w = np.asarray(w, np.float64)
  x = np.where(w > 0, np.asarray(x, np.float64), 0.0)
  return float((w * x).sum() / w.sum()) if w.sum() > 0 else 0.0


def _random_logps(rng, n=4, padding_garbage=True):
  arrays = [-rng.uniform(1.0, 30.0, size=B) for _ in range(n)]
  if padding_garbage:
    for array in arrays:  # finite garbage in padding examples must not matter
      array[WEIGHTS == 0] = rng.uniform(-1e4, 1e4, size=int((WEIGHTS == 0).sum()))
  return arrays


def _finite_difference_grad(f, arrays, h=1e-5):
  grads = []
  for i, array in enumerate(arrays):
    grad = np.zeros_like(array)
    for j in range(array.size):
      plus = [a.copy() for a in arrays]
      minus = [a.copy() for a in arrays]
      plus[i].flat[j] += h
      minus[i].flat[j] -= h
      grad.flat[j] = (f(*plus) - f(*minus)) / (2 * h)
    grads.append(grad)
  return grads


def _check_grads(jax_loss, numpy_loss, arrays, rtol=2e-3, atol=2e-5):
  """jax.grad of the reduced float32 loss == central differences of the float64 numpy loss."""
  expected = _finite_difference_grad(numpy_loss, arrays)
  argnums = tuple(range(len(arrays)))
  got = jax.grad(jax_loss, argnums=argnums)(*[jnp.asarray(a, jnp.float32) for a in arrays])
  for g, e in zip(got, expected):
    np.testing.assert_allclose(np.asarray(g), e, rtol=rtol, atol=atol)


def _f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


# ----------------------------------------------------------------------------------------------
# Weighted reduction.


def test_weighted_mean_ignores_padding_even_when_nan():
  values = jnp.array([1.0, jnp.nan, 3.0, jnp.inf])
  weights = jnp.array([1.0, 0.0, 3.0, 0.0])
  assert float(losses.weighted_mean(values, weights)) == pytest.approx(2.5)
  assert float(losses.reduce_loss(values[:1])) == 1.0
  assert float(losses.weighted_mean(values, jnp.zeros(4))) == 0.0


def test_registry_names():
  assert losses.LOSSES["dpo"] is losses.dpo_loss
  assert losses.LOSSES["dro"] is losses.dro_loss
  assert losses.LOSSES["dro_p"] is losses.dro_p_loss
  assert {"ipo", "kto", "sft", "reward_model", "preference_model"} <= set(losses.LOSSES)


# ----------------------------------------------------------------------------------------------
# DPO.


def _dpo_np(pc, pr, rc, rr, beta, eps):
  h = (pc - rc) - (pr - rr)
  return -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_against_numpy(label_smoothing):
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = _random_logps(rng)
  beta = 0.3
  loss, metrics = losses.dpo_loss(*_f32(pc, pr, rc, rr), beta=beta,
                                  label_smoothing=label_smoothing, weights=WEIGHTS)
  expected = np.where(WEIGHTS > 0, _dpo_np(pc, pr, rc, rr, beta, label_smoothing), 0.0)
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5, atol=1e-5)
  chosen, rejected = beta * (pc - rc), beta * (pr - rr)
  assert float(metrics["loss"]) == pytest.approx(_wmean(expected, WEIGHTS), rel=1e-5)
  assert float(metrics["rewards/chosen"]) == pytest.approx(_wmean(chosen, WEIGHTS), rel=1e-5)
  assert float(metrics["rewards/rejected"]) == pytest.approx(_wmean(rejected, WEIGHTS),
                                                              rel=1e-5)
  assert float(metrics["rewards/margins"]) == pytest.approx(
      _wmean(chosen - rejected, WEIGHTS), rel=1e-5, abs=1e-5)
  assert float(metrics["rewards/accuracies"]) == pytest.approx(
      _wmean(chosen > rejected, WEIGHTS), rel=1e-6)
  both_w = np.concatenate([WEIGHTS, WEIGHTS])
  assert float(metrics["logps/policy"]) == pytest.approx(
      _wmean(np.concatenate([pc, pr]), both_w), rel=1e-5)
  assert float(metrics["logps/ref"]) == pytest.approx(
      _wmean(np.concatenate([rc, rr]), both_w), rel=1e-5)
  assert float(metrics["logratio/mean"]) == pytest.approx(
      _wmean(np.concatenate([pc - rc, pr - rr]), both_w), rel=1e-4, abs=1e-5)

  def jax_loss(*args):
    return losses.reduce_loss(losses.dpo_loss(*args, beta=beta, label_smoothing=label_smoothing,
                                              weights=WEIGHTS)[0], WEIGHTS)

  def numpy_loss(*args):
    return _wmean(_dpo_np(*args, beta, label_smoothing), WEIGHTS)

  _check_grads(jax_loss, numpy_loss, [pc, pr, rc, rr])


def test_dpo_defaults_and_no_weights():
  rng = np.random.default_rng(1)
  pc, pr, rc, rr = _random_logps(rng, padding_garbage=False)
  loss, metrics = losses.dpo_loss(*_f32(pc, pr, rc, rr))
  expected = _dpo_np(pc, pr, rc, rr, 0.1, 0.0)
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5)
  assert float(metrics["loss"]) == pytest.approx(expected.mean(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# IPO.


def _ipo_np(pc, pr, rc, rr, tau, lc=None, lr=None):
  if lc is not None:
    lc, lr = np.maximum(lc, 1), np.maximum(lr, 1)
    pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
  return ((pc - rc) - (pr - rr) - 1 / (2 * tau)) ** 2


def test_ipo_against_numpy_with_lengths_and_empty_completions():
  rng = np.random.default_rng(2)
  pc, pr, rc, rr = _random_logps(rng)
  chosen_lengths = rng.integers(1, 20, size=B).astype(np.float64)
  rejected_lengths = rng.integers(1, 20, size=B).astype(np.float64)
  # An empty completion: scoring gives sum 0 and count 0.
  chosen_lengths[1], pc[1], rc[1] = 0.0, 0.0, 0.0
  tau = 0.1
  loss, metrics = losses.ipo_loss(*_f32(pc, pr, rc, rr), tau=tau,
                                  chosen_lengths=jnp.asarray(chosen_lengths),
                                  rejected_lengths=jnp.asarray(rejected_lengths),
                                  weights=WEIGHTS)
  assert np.all(np.isfinite(np.asarray(loss)))
  expected = np.where(WEIGHTS > 0,
                      _ipo_np(pc, pr, rc, rr, tau, chosen_lengths, rejected_lengths), 0.0)
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-4, atol=1e-4)
  # IPO's rewards are the token-averaged log-ratios, without a coefficient.
  chosen = (pc - rc) / np.maximum(chosen_lengths, 1)
  assert float(metrics["rewards/chosen"]) == pytest.approx(_wmean(chosen, WEIGHTS), rel=1e-4)
  assert float(metrics["loss"]) == pytest.approx(_wmean(expected, WEIGHTS), rel=1e-5)

  def jax_loss(*args):
    return losses.reduce_loss(losses.ipo_loss(
        *args, tau=tau, chosen_lengths=jnp.asarray(chosen_lengths),
        rejected_lengths=jnp.asarray(rejected_lengths), weights=WEIGHTS)[0], WEIGHTS)

  def numpy_loss(*args):
    return _wmean(_ipo_np(*args, tau, chosen_lengths, rejected_lengths), WEIGHTS)

  _check_grads(jax_loss, numpy_loss, [pc, pr, rc, rr])


def test_ipo_without_lengths_uses_sums():
  rng = np.random.default_rng(3)
  pc, pr, rc, rr = _random_logps(rng, padding_garbage=False)
  loss, _ = losses.ipo_loss(*_f32(pc, pr, rc, rr), tau=0.5)
  np.testing.assert_allclose(np.asarray(loss), _ipo_np(pc, pr, rc, rr, 0.5), rtol=1e-4)


@pytest.mark.parametrize("p", [1.0, 0.8, 0.3])
def test_ipo_fixed_point_is_the_closed_form(p):
  """Two responses, y1 ≻ y2 with probability p: the optimal gap is (2p − 1)/(2τ)."""
  tau = 0.1
  log_ref = jnp.log(jnp.array([0.3, 0.7]))

  def objective(logits):
    logps = jax.nn.log_softmax(logits)
    # The pair (y1, y2) labelled y1 ≻ y2 with weight p, the flipped label with weight 1 − p.
    chosen, rejected = logps[jnp.array([0, 1])], logps[jnp.array([1, 0])]
    ref_chosen, ref_rejected = log_ref[jnp.array([0, 1])], log_ref[jnp.array([1, 0])]
    weights = jnp.array([p, 1.0 - p])
    loss, _ = losses.ipo_loss(chosen, rejected, ref_chosen, ref_rejected, tau=tau,
                              weights=weights)
    return losses.reduce_loss(loss, weights)

  optimizer = optax.adam(optax.exponential_decay(0.05, 500, 0.1))

  @jax.jit
  def train(logits):
    def step(carry, _):
      logits, state = carry
      updates, state = optimizer.update(jax.grad(objective)(logits), state)
      return (optax.apply_updates(logits, updates), state), None
    return jax.lax.scan(step, (logits, optimizer.init(logits)), length=2000)[0][0]

  logits = train(jnp.zeros(2))
  logratio = jax.nn.log_softmax(logits) - log_ref
  gap = float(logratio[0] - logratio[1])
  assert gap == pytest.approx((2 * p - 1) / (2 * tau), abs=1e-3)


# ----------------------------------------------------------------------------------------------
# KTO.


def _kto_np(p, r, pkl, rkl, desirable, beta, wd, wu, weights):
  z0 = max(0.0, _wmean(pkl - rkl, weights))
  ratio = p - r
  loss = np.where(desirable, wd * (1 - _sigmoid(beta * (ratio - z0))),
                  wu * (1 - _sigmoid(beta * (z0 - ratio))))
  return loss, z0


def test_kto_against_numpy():
  rng = np.random.default_rng(4)
  p, r, pkl, rkl = _random_logps(rng)
  r = p - rng.normal(0.0, 3.0, size=B)  # log-ratios of a few nats, where σ is not flat
  r[WEIGHTS == 0] = 1e4
  pkl = rkl + rng.normal(0.5, 1.0, size=B)  # positive mean: z0 not clamped
  pkl[WEIGHTS == 0] = 1e4
  desirable = np.array([True, False, True, False, True, True, False])
  beta, wd, wu = 0.5, 1.0, 1.33
  loss, metrics = losses.kto_loss(*_f32(p, r, pkl, rkl), jnp.asarray(desirable), beta=beta,
                                  desirable_weight=wd, undesirable_weight=wu, weights=WEIGHTS)
  expected, z0 = _kto_np(p, r, pkl, rkl, desirable, beta, wd, wu, WEIGHTS)
  expected = np.where(WEIGHTS > 0, expected, 0.0)
  assert z0 > 0
  assert float(metrics["kto/z0"]) == pytest.approx(z0, rel=1e-5)
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5, atol=1e-6)
  chosen = _wmean(beta * (p - r), WEIGHTS * desirable)
  rejected = _wmean(beta * (p - r), WEIGHTS * ~desirable)
  assert float(metrics["rewards/chosen"]) == pytest.approx(chosen, rel=1e-5)
  assert float(metrics["rewards/rejected"]) == pytest.approx(rejected, rel=1e-5)
  assert float(metrics["rewards/margins"]) == pytest.approx(chosen - rejected, rel=1e-4)
  assert float(metrics["logratio/mean"]) == pytest.approx(_wmean(p - r, WEIGHTS), rel=1e-5)

  def jax_loss(*args):
    return losses.reduce_loss(losses.kto_loss(
        *args, jnp.asarray(desirable), beta=beta, desirable_weight=wd, undesirable_weight=wu,
        weights=WEIGHTS)[0], WEIGHTS)

  # z0 is a constant: the numpy gradient holds it fixed, and the kl arrays get no gradient.
  def numpy_loss(p_, r_):
    ratio = p_ - r_
    return _wmean(np.where(desirable, wd * (1 - _sigmoid(beta * (ratio - z0))),
                           wu * (1 - _sigmoid(beta * (z0 - ratio)))), WEIGHTS)

  _check_grads(lambda a, b: jax_loss(a, b, *_f32(pkl, rkl)), numpy_loss, [p, r])
  kl_grads = jax.grad(lambda a, b: jax_loss(*_f32(p, r), a, b), argnums=(0, 1))(
      *_f32(pkl, rkl))
  for grad in kl_grads:
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_kto_z0_hand_computed_clamped_and_without_gradient():
  # Mismatched pairs (x_i, y_{i+1}): log-ratios 0.5, 1.5, −1.0, and a padding example.
  policy_kl = jnp.array([-10.0, -20.0, -5.0, 99.0])
  ref_kl = jnp.array([-10.5, -21.5, -4.0, 0.0])
  weights = jnp.array([1.0, 1.0, 1.0, 0.0])
  args = (jnp.array([-3.0, -4.0, -5.0, 0.0]), jnp.array([-3.0, -4.0, -5.0, 0.0]))
  desirable = jnp.array([True, False, True, True])

  def z0_of(policy_kl, ref_kl):
    return losses.kto_loss(*args, policy_kl, ref_kl, desirable, beta=0.1, weights=weights)[1][
        "kto/z0"]

  assert float(z0_of(policy_kl, ref_kl)) == pytest.approx((0.5 + 1.5 - 1.0) / 3, rel=1e-6)
  np.testing.assert_array_equal(np.asarray(jax.grad(z0_of)(policy_kl, ref_kl)), 0.0)
  # A negative mean is clamped at 0.
  assert float(z0_of(policy_kl, ref_kl + 5.0)) == 0.0


def test_kto_labels_from_rewards_and_thumbs():
  rewards = jnp.array([0.1, 0.9, 0.5, 100.0, 0.2])
  weights = jnp.array([1.0, 1.0, 2.0, 0.0, 1.0])
  mean = (0.1 + 0.9 + 2 * 0.5 + 0.2) / 5
  np.testing.assert_array_equal(np.asarray(losses.above_mean_reward(rewards, weights)),
                                np.asarray(rewards) > mean)
  np.testing.assert_array_equal(np.asarray(losses.desirable_labels(rewards, None, weights)),
                                np.asarray(rewards) > mean)
  thumbs_up = jnp.ones(5)
  assert bool(jnp.all(losses.desirable_labels(rewards, thumbs_up, weights)))
  # Thumbs labels are used as given: a batch of thumbs-up only is all desirable, so every
  # example takes the desirable branch.
  logratio = jnp.array([0.3, -0.2, 0.1])
  zeros = jnp.zeros(3)
  loss, metrics = losses.kto_loss(logratio, zeros, zeros, zeros, jnp.ones(3, bool), beta=1.0)
  np.testing.assert_allclose(np.asarray(loss), 1 - _sigmoid(np.asarray(logratio)), rtol=1e-6)
  assert float(metrics["kto/desirable_fraction"]) == 1.0


# ----------------------------------------------------------------------------------------------
# DRO.


def _dro_np(p, r, v, rewards, tau):
  return 0.5 * (rewards - v - tau * (p - r)) ** 2


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_dro_against_numpy(tau):
  rng = np.random.default_rng(5)
  p, r = _random_logps(rng, 2)
  r = p - rng.normal(0.0, 0.5, size=B)
  r[WEIGHTS == 0] = 1e3
  values = rng.normal(size=B)
  rewards = rng.normal(size=B)
  loss, metrics = losses.dro_loss(*_f32(p, r, values, rewards), tau=tau, weights=WEIGHTS)
  expected = np.where(WEIGHTS > 0, _dro_np(p, r, values, rewards, tau), 0.0)
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-4, atol=1e-5)
  residual = rewards - values - tau * (p - r)
  assert float(metrics["loss"]) == pytest.approx(_wmean(expected, WEIGHTS), rel=1e-4)
  assert float(metrics["value/mean"]) == pytest.approx(_wmean(values, WEIGHTS), rel=1e-5)
  assert float(metrics["value/error"]) == pytest.approx(_wmean(np.abs(residual), WEIGHTS),
                                                        rel=1e-4)
  assert float(metrics["logps/policy"]) == pytest.approx(_wmean(p, WEIGHTS), rel=1e-5)
  assert float(metrics["logps/ref"]) == pytest.approx(_wmean(r, WEIGHTS), rel=1e-5)
  assert float(metrics["logratio/mean"]) == pytest.approx(_wmean(p - r, WEIGHTS), rel=1e-4)
  above = rewards > _wmean(rewards, WEIGHTS)
  assert float(metrics["rewards/chosen"]) == pytest.approx(
      _wmean(tau * (p - r), WEIGHTS * above), rel=1e-4)
  assert float(metrics["rewards/rejected"]) == pytest.approx(
      _wmean(tau * (p - r), WEIGHTS * ~above), rel=1e-4)

  def jax_loss(*args):
    return losses.reduce_loss(losses.dro_loss(*args, tau=tau, weights=WEIGHTS)[0], WEIGHTS)

  def numpy_loss(*args):
    return _wmean(_dro_np(*args, tau), WEIGHTS)

  _check_grads(jax_loss, numpy_loss, [p, r, values, rewards])


def test_dro_gradients_are_the_papers_equations():
  """∇V = (V − r + τℓ) (Eq. 7); ∇ log π = −τ·(r − V) + τ²·ℓ (Eq. 8 per example)."""
  rng = np.random.default_rng(6)
  p, r, values, rewards = (rng.normal(size=5) for _ in range(4))
  tau = 0.7
  grad_p, grad_v = jax.grad(
      lambda a, v: jnp.sum(losses.dro_loss(a, jnp.asarray(r), v, jnp.asarray(rewards),
                                           tau=tau)[0]), argnums=(0, 1))(*_f32(p, values))
  ell = p - r
  np.testing.assert_allclose(np.asarray(grad_v), values - rewards + tau * ell, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad_p), -tau * (rewards - values) + tau**2 * ell,
                             rtol=1e-5, atol=1e-6)


def test_dro_p_is_half_the_weighted_variance():
  rng = np.random.default_rng(7)
  p, r = _random_logps(rng, 2)
  r = p - rng.normal(0.0, 0.5, size=B)
  r[WEIGHTS == 0] = 1e3
  rewards = rng.normal(size=B)
  tau = 2.0
  loss, metrics = losses.dro_p_loss(*_f32(p, r, rewards), tau=tau, weights=WEIGHTS)

  def numpy_loss(p_, r_, rewards_):
    a = rewards_ - tau * (p_ - r_)
    return 0.5 * _wmean((a - _wmean(a, WEIGHTS)) ** 2, WEIGHTS)

  assert float(losses.reduce_loss(loss, WEIGHTS)) == pytest.approx(
      numpy_loss(p, r, rewards), rel=1e-4)
  a = rewards - tau * (p - r)
  assert float(metrics["value/mean"]) == pytest.approx(_wmean(a, WEIGHTS), rel=1e-4)
  assert np.all(np.asarray(loss)[WEIGHTS == 0] == 0)

  def jax_loss(*args):
    return losses.reduce_loss(losses.dro_p_loss(*args, tau=tau, weights=WEIGHTS)[0], WEIGHTS)

  _check_grads(jax_loss, numpy_loss, [p, r, rewards])


# ----------------------------------------------------------------------------------------------
# SFT and preference models.


def test_sft_token_cross_entropy_with_loss_weights():
  rng = np.random.default_rng(8)
  token_logps = -rng.uniform(0.1, 5.0, size=(B, 6))
  loss_weights = (rng.uniform(size=(B, 6)) > 0.3) * rng.choice([0.5, 1.0], size=(B, 6))
  token_logps[loss_weights == 0] = 0.0

  def numpy_loss(token_logps_):
    w = WEIGHTS[:, None] * loss_weights
    return float(-(w * token_logps_).sum() / w.sum())

  loss, metrics = losses.sft_loss(jnp.asarray(token_logps, jnp.float32),
                                  jnp.asarray(loss_weights), weights=WEIGHTS)
  assert float(losses.reduce_loss(loss, WEIGHTS)) == pytest.approx(numpy_loss(token_logps),
                                                                   rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(numpy_loss(token_logps), rel=1e-5)
  assert float(metrics["sft/tokens"]) == pytest.approx((WEIGHTS[:, None] * loss_weights).sum())

  def jax_loss(x):
    return losses.reduce_loss(losses.sft_loss(x, jnp.asarray(loss_weights),
                                              weights=WEIGHTS)[0], WEIGHTS)

  _check_grads(jax_loss, numpy_loss, [token_logps])


def test_bradley_terry_reward_model():
  rng = np.random.default_rng(9)
  chosen, rejected = rng.normal(size=B), rng.normal(size=B)
  loss, metrics = losses.reward_model_loss(*_f32(chosen, rejected), weights=WEIGHTS)
  expected = np.where(WEIGHTS > 0, -_log_sigmoid(chosen - rejected), 0.0)
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5)
  assert float(metrics["rewards/accuracies"]) == pytest.approx(
      _wmean(chosen > rejected, WEIGHTS))

  def jax_loss(*args):
    return losses.reduce_loss(losses.reward_model_loss(*args, weights=WEIGHTS)[0], WEIGHTS)

  _check_grads(jax_loss, lambda c, r: _wmean(-_log_sigmoid(c - r), WEIGHTS), [chosen, rejected])


def _log_softmax(x):
  return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
      -1, keepdims=True)


def test_pairwise_preference_model_both_orders():
  rng = np.random.default_rng(10)
  vocab, a_id, b_id = 12, 3, 7
  logits, swapped_logits = rng.normal(size=(B, vocab)), rng.normal(size=(B, vocab))
  label = np.array([1.0, 0.0, 1.0, 0.7, 0.0, 1.0, 1.0])  # one soft label

  def numpy_loss(logits_, swapped_):
    lp, sp = _log_softmax(logits_), _log_softmax(swapped_)
    first = -(label * lp[:, a_id] + (1 - label) * lp[:, b_id])
    second = -(label * sp[:, b_id] + (1 - label) * sp[:, a_id])
    return _wmean(0.5 * (first + second), WEIGHTS)

  def jax_loss(logits_, swapped_):
    ids = jnp.array([a_id, b_id])
    label_logps = jax.nn.log_softmax(logits_)[:, ids]
    swapped_logps = jax.nn.log_softmax(swapped_)[:, ids]
    loss, _ = losses.preference_model_loss(label_logps, swapped_logps, jnp.asarray(label),
                                           weights=WEIGHTS)
    return losses.reduce_loss(loss, WEIGHTS)

  assert float(jax_loss(*_f32(logits, swapped_logits))) == pytest.approx(
      numpy_loss(logits, swapped_logits), rel=1e-5)
  _check_grads(jax_loss, numpy_loss, [logits, swapped_logits])
  # P(y1 ≻ y2): two-way softmax of the label logits, averaged over both orders.
  ids = np.array([a_id, b_id])
  probability = losses.preference_probability(
      jnp.asarray(_log_softmax(logits)[:, ids]), jnp.asarray(_log_softmax(swapped_logits)[:, ids]))
  expected = 0.5 * (_sigmoid(logits[:, a_id] - logits[:, b_id])
                    + _sigmoid(swapped_logits[:, b_id] - swapped_logits[:, a_id]))
  np.testing.assert_allclose(np.asarray(probability), expected, rtol=1e-5)


def test_position_bias_cancels_in_the_preference_probability():
  # A judge that always says "A" with probability 0.9 has no preference after averaging orders.
  always_a = jnp.log(jnp.array([[0.9, 0.1]]))
  assert float(losses.preference_probability(always_a, always_a)[0]) == pytest.approx(0.5)


def test_ipo_needs_both_lengths_or_neither():
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match="both"):
    losses.ipo_loss(x, x, x, x, tau=0.1, chosen_lengths=jnp.ones(2))


def test_batch_statistics_are_global_when_the_batch_is_sharded():
  """z0, the above-mean label and DRO-P's variance see all devices' examples under jit."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  devices = np.asarray(jax.devices())
  size = 2 * len(devices)
  rng = np.random.default_rng(11)
  arrays = [jnp.asarray(rng.normal(size=size) - 5.0, jnp.float32) for _ in range(5)]
  weights = jnp.asarray(rng.integers(0, 2, size=size), jnp.float32)
  sharding = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))

  def run(p, r, pkl, rkl, rewards, w):
    desirable = losses.above_mean_reward(rewards, w)
    kto, kto_metrics = losses.kto_loss(p, r, pkl, rkl, desirable, beta=0.5, weights=w)
    dro_p, dro_metrics = losses.dro_p_loss(p, r, rewards, tau=0.3, weights=w)
    return kto, dro_p, kto_metrics["kto/z0"], dro_metrics["value/mean"]

  sharded = jax.jit(run)(*[jax.device_put(a, sharding) for a in arrays + [weights]])
  single = jax.jit(run)(*arrays, weights)
  for a, b in zip(sharded, single):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
