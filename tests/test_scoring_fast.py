"""The fast scoring paths against the straightforward computation they replace.

* `target_logps_from_logits` (custom gradient, no float32 [B, L, V] kept for the backward) against
  a plain float32 log-softmax and gather: values and gradients, float32 to 1e-6 and bfloat16 to
  bfloat16 rounding; and less compiled temp memory under jax.grad for bfloat16 logits.
* One encoder pass per prompt (`score_pairs`, `score_many`, KTO's mismatched pairs and the
  reference forward) against encoding the prompt once per target set: loss and gradients of
  the engine's objectives on the tiny T5 in float32 to ~1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax import configs, scoring, step as step_lib
from dro_jax.models import t5 as t5_lib

# ------------------------------------------------------------ the straightforward computations


def plain_target_logps(logits_BxLxV, targets_BxL, weights_BxL=None):
  """A float32 copy of the logits, logsumexp and gather, differentiated by JAX."""
  if weights_BxL is None:
    weights_BxL = targets_BxL > 0
  logits32 = logits_BxLxV.astype(jnp.float32)
  normaliser = jax.nn.logsumexp(logits32, axis=-1)
  target = jnp.take_along_axis(logits32, targets_BxL[..., None], axis=-1)[..., 0]
  return jnp.where(weights_BxL > 0, target - normaliser, 0.0)


def plain_score(model, params, encoder_tokens, decoder_inputs, targets, weights=None):
  """Encoder and decoder for one target set; returns the summed log-probs and token counts."""
  if weights is None:
    weights = targets > 0
  logits = model.apply({"params": params}, encoder_tokens, decoder_inputs)
  token = plain_target_logps(logits, targets, weights)
  return scoring.sequence_logps(token, weights)


def plain_pairs(model, params, batch):
  """Chosen and rejected each with its own encoder pass."""
  out = {}
  for side in ("chosen", "rejected"):
    sums, counts = plain_score(model, params, batch["encoder_input_tokens"],
                               batch[f"{side}_decoder_input_tokens"],
                               batch[f"{side}_decoder_target_tokens"],
                               batch.get(f"{side}_decoder_loss_weights"))
    out[f"{side}_logps"], out[f"{side}_lengths"] = sums, counts
  return out


class PlainPairwise(step_lib.Pairwise):
  def score(self, trainable, ref_params, batch, for_statistics=True):
    policy = plain_pairs(self.model, trainable["policy"], batch)
    ref = plain_pairs(self.model, jax.lax.stop_gradient(ref_params), batch)
    return {**policy, "ref_chosen_logps": jax.lax.stop_gradient(ref["chosen_logps"]),
            "ref_rejected_logps": jax.lax.stop_gradient(ref["rejected_logps"])}


class PlainKTO(step_lib.KTO):
  def score(self, trainable, ref_params, batch, for_statistics=True):
    ref_params = jax.lax.stop_gradient(ref_params)

    def logps(params, prefix=""):
      return plain_score(self.model, params, batch["encoder_input_tokens"],
                         batch[f"{prefix}decoder_input_tokens"],
                         batch[f"{prefix}decoder_target_tokens"],
                         batch.get(f"{prefix}decoder_loss_weights"))[0]

    scores = {"logps": logps(trainable["policy"]),
              "ref_logps": jax.lax.stop_gradient(logps(ref_params))}
    if for_statistics:
      scores["kl_logps"] = jax.lax.stop_gradient(logps(trainable["policy"], "kl_"))
      scores["ref_kl_logps"] = jax.lax.stop_gradient(logps(ref_params, "kl_"))
    return scores


# ------------------------------------------------------------------------------------ fixtures


def _batch(vocab, rows=6, source=9, chosen=7, rejected=5, seed=0):
  rng = np.random.default_rng(seed)

  def targets(length):
    tokens = rng.integers(2, vocab, size=(rows, length)).astype(np.int32)
    lengths = rng.integers(0, length + 1, size=rows)
    lengths[0] = length
    return np.where(np.arange(length)[None] < lengths[:, None], tokens, 0)

  def shift(t):
    return np.concatenate([np.zeros((rows, 1), np.int32), t[:, :-1]], 1)

  encoder = rng.integers(2, vocab, size=(rows, source)).astype(np.int32)
  encoder[1, 5:] = 0  # a padded prompt
  batch = {"encoder_input_tokens": encoder}
  for prefix, length in (("", chosen), ("chosen_", chosen), ("rejected_", rejected)):
    t = targets(length)
    batch[f"{prefix}decoder_target_tokens"] = t
    batch[f"{prefix}decoder_input_tokens"] = shift(t)
    batch[f"{prefix}decoder_loss_weights"] = (t > 0).astype(np.float32)
  batch["reward"] = rng.normal(size=rows).astype(np.float32)
  weights = np.ones(rows, np.float32)
  weights[-1] = 0.0  # a padding row
  batch["example_weights"] = weights
  return {key: jnp.asarray(value) for key, value in batch.items()}


@pytest.fixture(scope="module")
def tiny():
  config = t5_lib.get_config("tiny")
  assert config.dtype == "float32"
  model = t5_lib.T5(config)
  policy = t5_lib.init_params(config, jax.random.PRNGKey(0))
  # A reference that differs from the policy, so the reference path is really exercised.
  reference = jax.tree.map(lambda x: x * 1.01, t5_lib.init_params(config, jax.random.PRNGKey(0)))
  return config, model, policy, reference


def _close(actual, expected, rtol=1e-6, atol=1e-6):
  """Elementwise within rtol, or within atol times the leaf's largest magnitude (summation order
  differs between the two computations, so tiny entries of a large gradient carry its rounding)."""
  def check(a, e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    scale = max(1.0, float(np.abs(e).max(initial=0.0)))
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * scale)
  jax.tree.map(check, actual, expected)


# ---------------------------------------------------------------------- log-softmax and gather


def _logits(dtype, shape=(3, 7, 50), seed=0):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=shape).astype(np.float32) * 3, dtype)
  targets = rng.integers(0, shape[-1], size=shape[:2]).astype(np.int32)
  targets[1, 4:] = 0
  weights = (targets > 0).astype(np.float32)
  weights[2, 1] = 0.0
  cotangent = jnp.asarray(rng.normal(size=shape[:2]).astype(np.float32))
  return logits, jnp.asarray(targets), jnp.asarray(weights), cotangent


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_logps_and_gradients_match_the_plain_log_softmax(dtype):
  logits, targets, weights, cotangent = _logits(dtype)

  def loss(fn):
    return lambda x: jnp.sum(fn(x, targets, weights) * cotangent)

  value, grad = jax.value_and_grad(loss(scoring.target_logps_from_logits))(logits)
  plain_value, plain_grad = jax.value_and_grad(loss(plain_target_logps))(logits)
  assert grad.dtype == logits.dtype
  np.testing.assert_allclose(
      np.asarray(scoring.target_logps_from_logits(logits, targets, weights)),
      np.asarray(plain_target_logps(logits, targets, weights)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(value), float(plain_value), rtol=1e-6)
  if dtype == "float32":
    np.testing.assert_allclose(np.asarray(grad), np.asarray(plain_grad), rtol=1e-6, atol=1e-6)
  else:  # both round a float32 gradient to bfloat16 once: within one bfloat16 ulp
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(plain_grad, np.float32),
                               rtol=2 ** -7, atol=1e-6)
  # Masked positions get no gradient.
  masked = np.asarray(weights) == 0
  assert np.all(np.asarray(grad, np.float32)[masked] == 0)


def _grad_temp_bytes(fn, batch, length, embed, vocab, projection):
  """Compiled temp bytes of jax.grad of sum(fn(logits)) for bfloat16 logits [B, L, V], given
  directly or made by a bfloat16 output projection (the T5 decoder's last layer)."""
  def loss(x, hidden, targets):
    if projection:  # x is the float32 kernel
      x = jnp.dot(hidden, x.astype(jnp.bfloat16))
    return jnp.sum(fn(x, targets))

  x = jax.ShapeDtypeStruct((batch, length, vocab), jnp.bfloat16)
  if projection:
    x = jax.ShapeDtypeStruct((embed, vocab), jnp.float32)
  hidden = jax.ShapeDtypeStruct((batch, length, embed), jnp.bfloat16)
  targets = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  compiled = jax.jit(jax.grad(loss)).lower(x, hidden, targets).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("projection", [False, True])
def test_gradient_temp_memory_goes_down_for_bfloat16_logits(projection):
  batch, length, embed, vocab = 4, 64, 64, 4096
  fast = _grad_temp_bytes(scoring.target_logps_from_logits, batch, length, embed, vocab,
                          projection)
  plain = _grad_temp_bytes(plain_target_logps, batch, length, embed, vocab, projection)
  float32_logits = batch * length * vocab * 4
  assert fast < plain, (fast, plain)
  if not projection:
    # The plain version keeps two float32 [B, L, V] arrays, the fast one at most one.
    assert plain - fast >= 0.9 * float32_logits, (fast, plain)
    assert fast <= 1.1 * float32_logits, (fast, float32_logits)
  else:
    # At least a bfloat16 [B, L, V] saved (the CPU backend computes bfloat16 matrix products in
    # float32, which costs a float32 copy of the logits' gradient in both versions; the GPU
    # suite's `logps_memory` row measures the same on the accelerator).
    assert plain - fast >= 0.9 * float32_logits / 2, (fast, plain)


# ----------------------------------------------------------------------- one encoder per prompt


@pytest.mark.slow
def test_score_many_equals_one_encoder_pass_per_target_set(tiny):
  _, model, params, _ = tiny
  batch = _batch(256)
  sets = [(batch[f"{p}decoder_input_tokens"], batch[f"{p}decoder_target_tokens"],
           batch[f"{p}decoder_loss_weights"]) for p in ("chosen_", "rejected_", "")]
  many = scoring.score_many(model, params, batch["encoder_input_tokens"], sets)
  for scores, (inputs, targets, weights) in zip(many, sets):
    sums, counts = plain_score(model, params, batch["encoder_input_tokens"], inputs, targets,
                               weights)
    _close(scores["logps"], sums)
    np.testing.assert_array_equal(np.asarray(scores["lengths"]), np.asarray(counts))


def test_score_pairs_gradients_match_two_encoder_passes(tiny):
  _, model, params, _ = tiny
  batch = _batch(256)
  weights = jnp.asarray([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])

  def loss(pairs_fn):
    def fn(p):
      pairs = pairs_fn(model, p, batch)
      return jnp.sum(weights * (pairs["chosen_logps"] - 0.5 * pairs["rejected_logps"]))
    return fn

  value, grads = jax.jit(jax.value_and_grad(loss(scoring.score_pairs)))(params)
  plain_value, plain_grads = jax.jit(jax.value_and_grad(loss(plain_pairs)))(params)
  np.testing.assert_allclose(float(value), float(plain_value), rtol=1e-6)
  _close(grads, plain_grads)


def _objective_grads(objective, policy, reference, batch, num_microbatches=1):
  trainable = {"policy": policy, "value": None}
  metrics, grads = jax.jit(
      lambda t, r, b: step_lib.loss_and_grads(objective, t, r, b, num_microbatches)
  )(trainable, reference, batch)
  return metrics, grads["policy"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "kto"])  # IPO shares DPO's objective
@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_objective_loss_and_gradients_match_the_plain_scoring(tiny, loss, num_microbatches):
  _, _, policy, reference = tiny
  config = configs.load(loss, "size=tiny")
  fast = step_lib.make_objective(config)
  plain_type = PlainKTO if loss == "kto" else PlainPairwise
  plain = plain_type(config, fast.model)
  batch = _batch(config.model.get("vocab_size") or 256)
  metrics, grads = _objective_grads(fast, policy, reference, batch, num_microbatches)
  plain_metrics, plain_grads = _objective_grads(plain, policy, reference, batch,
                                                num_microbatches)
  assert set(metrics) == set(plain_metrics)
  for key in metrics:
    np.testing.assert_allclose(float(metrics[key]), float(plain_metrics[key]), rtol=1e-6,
                               atol=1e-6, err_msg=key)
  assert float(jnp.abs(jax.flatten_util.ravel_pytree(grads)[0]).max()) > 0
  _close(grads, plain_grads)


def test_kto_with_precomputed_reference_keys_uses_them(tiny):
  _, _, policy, reference = tiny
  config = configs.load("kto", "size=tiny")
  objective = step_lib.make_objective(config)
  batch = objective.prepare(_batch(256))
  computed = objective.score({"policy": policy, "value": None}, reference, batch)
  given = {**batch, "ref_logps": computed["ref_logps"] + 1.0,
           "ref_kl_logps": computed["ref_kl_logps"] - 1.0}
  looked_up = objective.score({"policy": policy, "value": None}, None, given)
  _close(looked_up["ref_logps"], computed["ref_logps"] + 1.0)
  _close(looked_up["ref_kl_logps"], computed["ref_kl_logps"] - 1.0)
  _close(looked_up["kl_logps"], computed["kl_logps"])
