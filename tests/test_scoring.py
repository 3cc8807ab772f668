"""Scoring: per-token / per-sequence log-probs, pairs in one pass, length normalisation, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax import scoring
from dro_jax.models import t5 as t5_lib


def _log_softmax64(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_token_logps_with_weights_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 4
  targets = rng.integers(1, 11, size=(3, 5)).astype(np.int32)
  targets[1, 3:] = 0
  weights = (targets > 0).astype(np.float32)
  weights[2, 0] = 0.0  # a loss weight that masks a real token
  token = scoring.target_logps_from_logits(jnp.asarray(logits), targets, weights)
  expected = np.take_along_axis(_log_softmax64(logits), targets[..., None], -1)[..., 0]
  expected = np.where(weights > 0, expected, 0.0)
  np.testing.assert_allclose(np.asarray(token), expected, rtol=1e-6, atol=1e-6)
  sums, counts = scoring.sequence_logps(token, weights)
  np.testing.assert_allclose(np.asarray(sums), expected.sum(-1), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(counts), [5, 3, 4])


def test_length_normalize_is_finite_for_empty_completions():
  averaged = scoring.length_normalize(jnp.array([-6.0, 0.0]), jnp.array([3.0, 0.0]))
  np.testing.assert_array_equal(np.asarray(averaged), [-2.0, 0.0])


@pytest.fixture(scope="module")
def tiny():
  config = t5_lib.get_config("tiny")
  return t5_lib.T5(config), t5_lib.init_params(config, jax.random.PRNGKey(0))


@pytest.mark.slow
def test_pairs_in_one_pass_equal_separate_scoring(tiny):
  model, params = tiny
  rng = np.random.default_rng(1)

  def targets(length, lengths):
    tokens = rng.integers(2, 256, size=(3, length)).astype(np.int32)
    return np.where(np.arange(length)[None] < np.array(lengths)[:, None], tokens, 0)

  def shift(t):
    return np.concatenate([np.zeros((t.shape[0], 1), np.int32), t[:, :-1]], 1)

  chosen, rejected = targets(7, [7, 2, 5]), targets(5, [1, 5, 0])
  batch = {"encoder_input_tokens": rng.integers(2, 256, size=(3, 6)).astype(np.int32),
           "chosen_decoder_input_tokens": shift(chosen), "chosen_decoder_target_tokens": chosen,
           "rejected_decoder_input_tokens": shift(rejected),
           "rejected_decoder_target_tokens": rejected}
  pairs = scoring.score_pairs(model, params, batch)
  for side, targets_ in (("chosen", chosen), ("rejected", rejected)):
    alone = scoring.score(model, params, batch["encoder_input_tokens"], shift(targets_), targets_)
    np.testing.assert_allclose(np.asarray(pairs[f"{side}_logps"]), np.asarray(alone["logps"]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(pairs[f"{side}_lengths"]), (targets_ > 0).sum(1))
  assert float(pairs["rejected_logps"][2]) == 0.0  # an empty completion scores 0


def test_log_softmax_keeps_one_float32_copy_of_the_logits():
  """bfloat16 logits [B, L, V]: the compiled scorer needs at most one float32 [B, L, V] buffer."""
  batch, length, vocab = 4, 64, 4096
  logits = jax.ShapeDtypeStruct((batch, length, vocab), jnp.bfloat16)
  targets = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  compiled = jax.jit(scoring.target_logps_from_logits).lower(logits, targets).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= batch * length * vocab * 4 * 1.1, temp


def test_score_can_return_the_encoder_output(tiny):
  model, params = tiny
  inputs, targets = np.array([[5, 6, 7, 1, 0]]), np.array([[9, 8, 1, 0]])
  decoder_inputs = np.array([[0, 9, 8, 1]])
  scores = scoring.score(model, params, inputs, decoder_inputs, targets, return_encoded=True)
  encoded = model.apply({"params": params}, inputs, method=model.encode)
  np.testing.assert_array_equal(np.asarray(scores["encoded"]), np.asarray(encoded))
  logits = model.apply({"params": params}, inputs, decoder_inputs)
  expected = scoring.target_logps_from_logits(logits, targets)
  np.testing.assert_allclose(np.asarray(scores["token_logps"]), np.asarray(expected), atol=1e-6)
