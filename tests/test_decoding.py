"""Cached sampling against the uncached model, scoring.py, Hugging Face generate and statistics."""

import io
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from dro_jax import checkpoints, decoding, partitioning, scoring
from dro_jax.models import t5 as t5_lib
from hf_reference import make_hf_t5

# Decoding runs past the relative-attention max distance (8) of the test models.
LENGTH = 20
MAX_DISTANCE = 8
EOS = 1
GREEDY = decoding.SamplingParams(max_decode_length=LENGTH, temperature=0.0, suppress_pad=False)
SAMPLED = decoding.SamplingParams(max_decode_length=LENGTH, temperature=0.8, top_k=20, top_p=0.9,
                                  num_samples=3)


def _hf_model(family: str):
  model = make_hf_t5(family, vocab_size=64, max_distance=MAX_DISTANCE, num_buckets=8)
  with torch.no_grad():
    # A louder EOS logit, so that some sequences end inside LENGTH and some do not.
    output = model.lm_head if family == "t5_1_1" else model.shared
    output.weight[EOS] *= 2.5
  return model


def _load(family: str, tmp_path_factory):
  """(HF model, T5Config, params) with the same weights."""
  hf = _hf_model(family)
  directory = tmp_path_factory.mktemp(family)
  hf.save_pretrained(directory)
  config, params = checkpoints.load_hf_t5(str(directory), dtype="float32")
  return hf, config, params


@pytest.fixture(scope="module")
def t5_1_1_model(tmp_path_factory):
  return _load("t5_1_1", tmp_path_factory)


@pytest.fixture(scope="module", params=["t5_1_1", "t5_1_0"])
def family_model(request, tmp_path_factory, t5_1_1_model):
  """Both output layers (T5.1.1 untied; T5.1.0 tied and scaled) for the greedy parity tests."""
  return t5_1_1_model if request.param == "t5_1_1" else _load(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def model(t5_1_1_model):
  return t5_1_1_model[1], t5_1_1_model[2]


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, 64, size=(8, 12)).astype(np.int32)
  lengths = np.array([12, 3, 7, 12, 1, 9, 5, 11])
  return np.where(np.arange(12)[None] < lengths[:, None], tokens, 0).astype(np.int32)


def _decoder_inputs(tokens_NxL: np.ndarray) -> np.ndarray:
  tokens_NxL = np.asarray(tokens_NxL)
  return np.concatenate([np.zeros_like(tokens_NxL[:, :1]), tokens_NxL[:, :-1]], axis=1)


def _logits(config, params, encoder_tokens, tokens_NxL) -> np.ndarray:
  """Teacher-forced logits of the full (uncached) model."""
  logits = t5_lib.T5(config).apply({"params": params}, encoder_tokens, _decoder_inputs(tokens_NxL))
  return np.asarray(logits, np.float64)


def _check_eos_layout(output, eos_id=EOS):
  """Tokens, log-probs 0 after the first EOS; lengths count up to and including it; truncated
  exactly where there is no EOS."""
  tokens = np.asarray(output.tokens)
  assert output.truncated.dtype == bool
  np.testing.assert_array_equal(output.truncated, ~(tokens == eos_id).any(axis=1))
  for row, (token_row, length) in enumerate(zip(tokens, np.asarray(output.lengths))):
    ends = np.flatnonzero(token_row == eos_id)
    expected = ends[0] + 1 if ends.size else tokens.shape[1]
    assert length == expected, row
    for values in (tokens, output.logps, output.sampling_logps):
      np.testing.assert_array_equal(np.asarray(values)[row, length:], 0)


# ----------------------------------------------------------------------------------------------
# Greedy.


def test_greedy_equals_teacher_forced_argmax(family_model, prompts):
  _, config, params = family_model
  output = decoding.make_sampler(config, GREEDY)(params, prompts, jax.random.key(0))
  tokens = np.asarray(output.tokens)
  lengths = np.asarray(output.lengths)
  # The test data must exercise both endings: EOS inside LENGTH and running to LENGTH.
  assert (lengths < LENGTH).any() and (lengths == LENGTH).any(), lengths
  assert lengths.max() > MAX_DISTANCE
  # Both kinds occur: cut off at LENGTH (flagged) and ended by EOS.
  assert np.asarray(output.truncated).any() and not np.asarray(output.truncated).all()
  _check_eos_layout(output)
  argmax = _logits(config, params, prompts, tokens).argmax(-1)
  valid = np.arange(LENGTH)[None] < lengths[:, None]
  np.testing.assert_array_equal(np.where(valid, argmax, 0), tokens)
  np.testing.assert_array_equal(output.sampling_logps, 0.0)


def test_greedy_suppresses_padding_by_default(model, prompts):
  config, params = model
  sampling = decoding.SamplingParams(max_decode_length=LENGTH, temperature=0.0)
  output = decoding.make_sampler(config, sampling)(params, prompts, jax.random.key(0))
  tokens, lengths = np.asarray(output.tokens), np.asarray(output.lengths)
  valid = np.arange(LENGTH)[None] < lengths[:, None]
  assert (tokens[valid] != 0).all()
  logits = _logits(config, params, prompts, tokens)
  np.testing.assert_array_equal(np.where(valid, logits[..., 1:].argmax(-1) + 1, 0), tokens)


def test_greedy_matches_transformers_generate(family_model, prompts):
  hf, config, params = family_model
  output = decoding.make_sampler(config, GREEDY)(params, prompts, jax.random.key(0))
  with torch.no_grad():
    generated = hf.generate(input_ids=torch.tensor(prompts, dtype=torch.long),
                            attention_mask=torch.tensor(prompts > 0), max_new_tokens=LENGTH,
                            do_sample=False, num_beams=1).numpy()
  # generate starts with the decoder start token and stops when every row has ended.
  expected = np.zeros((len(prompts), LENGTH), np.int64)
  expected[:, :generated.shape[1] - 1] = generated[:, 1:]
  np.testing.assert_array_equal(np.asarray(output.tokens), expected)


# ----------------------------------------------------------------------------------------------
# Sampling.


def _reference_sampling_logps(logits_NxLxV: np.ndarray, sampling, tokens_NxL) -> np.ndarray:
  """numpy: pad removed, temperature, top-k, then top-p, renormalised, at the sampled tokens."""
  logits = logits_NxLxV.copy()
  logits[..., 0] = -np.inf
  logits = logits / sampling.temperature
  kth = np.sort(logits, axis=-1)[..., -sampling.top_k][..., None]
  logits = np.where(logits >= kth, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  order = np.argsort(-probs, axis=-1)
  sorted_probs = np.take_along_axis(probs, order, -1)
  keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < sampling.top_p
  keep = np.zeros_like(keep_sorted)
  np.put_along_axis(keep, order, keep_sorted, -1)
  probs = np.where(keep, probs, 0.0)
  probs /= probs.sum(-1, keepdims=True)
  with np.errstate(divide="ignore"):  # tokens outside the kept set (padding) have log 0
    return np.log(np.take_along_axis(probs, np.asarray(tokens_NxL)[..., None], -1)[..., 0])


def test_sampled_logps_equal_scores(model, prompts):
  config, params = model
  output = decoding.make_sampler(config, SAMPLED)(params, prompts, jax.random.key(1))
  assert output.tokens.shape == (len(prompts) * 3, LENGTH)
  _check_eos_layout(output)
  tokens = np.asarray(output.tokens)
  encoder_tokens = np.repeat(prompts, 3, axis=0)
  scores = scoring.score(t5_lib.T5(config), params, encoder_tokens, _decoder_inputs(tokens), tokens)
  np.testing.assert_allclose(output.logps, scores["token_logps"], rtol=1e-4, atol=1e-5)
  valid = tokens > 0
  reference = _reference_sampling_logps(_logits(config, params, encoder_tokens, tokens), SAMPLED,
                                        tokens)
  np.testing.assert_allclose(np.asarray(output.sampling_logps)[valid], reference[valid], rtol=1e-4,
                             atol=1e-5)
  # The samples of one prompt differ from each other.
  assert len({tuple(row) for row in tokens[:3]}) > 1


def test_fixed_key_reproduces_and_keys_are_per_example(model, prompts):
  config, params = model
  sampler = decoding.make_sampler(config, SAMPLED)
  keys = jax.random.split(jax.random.key(2), len(prompts))
  first = sampler(params, prompts, keys)
  again = sampler(params, prompts, keys)
  other = sampler(params, prompts, jax.random.split(jax.random.key(3), len(prompts)))
  np.testing.assert_array_equal(first.tokens, again.tokens)
  assert (np.asarray(first.tokens) != np.asarray(other.tokens)).any()
  # A prompt's samples depend on its key only, not on the rest of the batch.
  part = sampler(params, prompts[2:6], keys[2:6])
  np.testing.assert_array_equal(part.tokens, np.asarray(first.tokens)[6:18])
  # Raw [B, 2] key data is accepted as well.
  raw = sampler(params, prompts, jax.random.key_data(keys))
  np.testing.assert_array_equal(raw.tokens, first.tokens)


def test_top_k_one_and_low_temperature_equal_greedy(model, prompts):
  config, params = model
  greedy = decoding.make_sampler(config, GREEDY)(params, prompts, jax.random.key(0))
  top1 = decoding.SamplingParams(max_decode_length=LENGTH, top_k=1, suppress_pad=False)
  cold = decoding.SamplingParams(max_decode_length=LENGTH, temperature=1e-4, suppress_pad=False)
  for sampling in (top1, cold):
    output = decoding.make_sampler(config, sampling)(params, prompts, jax.random.key(4))
    np.testing.assert_array_equal(output.tokens, greedy.tokens)
    np.testing.assert_allclose(output.logps, greedy.logps, atol=1e-6)
    np.testing.assert_allclose(output.sampling_logps, 0.0, atol=1e-5)


def test_loop_exits_when_every_sequence_has_ended(model, prompts, monkeypatch):
  """Zero output weights make all non-pad logits equal, so greedy without pad picks EOS (id 1)
  first; the loop must then run one step, not LENGTH."""
  config, params = model
  params = jax.tree.map(lambda x: x, params)
  if config.logits_via_embedding:
    params["token_embedder"]["embedding"] = jnp.zeros_like(params["token_embedder"]["embedding"])
  else:
    params["decoder"]["logits_dense"]["kernel"] = jnp.zeros_like(
        params["decoder"]["logits_dense"]["kernel"])
  steps = []
  choose = decoding.choose_tokens

  def counting_choose(*args):
    jax.debug.callback(lambda: steps.append(1))
    return choose(*args)

  monkeypatch.setattr(decoding, "choose_tokens", counting_choose)
  sampling = decoding.SamplingParams(max_decode_length=LENGTH, temperature=0.0)
  output = jax.jit(decoding.sample, static_argnames=("config", "sampling"))(
      params, prompts, jax.random.key(0), config=config, sampling=sampling)
  jax.effects_barrier()
  np.testing.assert_array_equal(output.lengths, 1)
  np.testing.assert_array_equal(np.asarray(output.tokens)[:, 0], EOS)
  assert len(steps) == 1


# ----------------------------------------------------------------------------------------------
# Statistics on a model with 8 tokens.


@pytest.fixture(scope="module")
def small_vocab_model():
  config = t5_lib.get_config("tiny", vocab_size=8)
  params = t5_lib.init_params(config, jax.random.key(5))
  # Sharper than the initialisation, so the distributions are far from uniform.
  params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"] * 3.0
  prompt = np.array([[3, 5, 7, 2, 1]], np.int32)
  return config, params, prompt


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
  """Pearson's test; cells expected below 5 are pooled into one."""
  expected = probs * counts.sum()
  small = expected < 5
  observed = np.append(counts[~small], counts[small].sum())
  expected = np.append(expected[~small], expected[small].sum())
  if expected[-1] == 0:
    observed, expected = observed[:-1], expected[:-1]
  return scipy.stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


def test_two_token_frequencies_match_the_model(small_vocab_model):
  """Joint (first, second) token frequencies at temperature 1 against p(t1) p(t2 | t1), with the
  EOS rule p(EOS, 0) = p(EOS)."""
  config, params, prompt = small_vocab_model
  sampling = decoding.SamplingParams(max_decode_length=2, num_samples=8192, suppress_pad=False)
  output = decoding.make_sampler(config, sampling)(params, prompt, jax.random.key(6))
  tokens = np.asarray(output.tokens)
  counts = np.bincount(tokens[:, 0] * 8 + tokens[:, 1], minlength=64).astype(np.float64)

  firsts = np.arange(8, dtype=np.int32)[:, None]
  logits = _logits(config, params, np.repeat(prompt, 8, 0), np.concatenate(
      [firsts, np.zeros_like(firsts)], axis=1))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  joint = probs[0, 0][:, None] * probs[:, 1]
  joint[EOS] = 0.0
  joint[EOS, 0] = probs[0, 0, EOS]
  joint = joint.reshape(-1)
  assert (counts[joint == 0] == 0).all()
  assert _chi_square_p(counts, joint) > 1e-3
  # The test has power: the same counts reject a slightly different distribution.
  tilted = joint * np.exp(0.3 * (np.arange(64) % 8 == 3))
  assert _chi_square_p(counts, tilted / tilted.sum()) < 1e-6
  # Raw log-probs of the samples are the model's.
  np.testing.assert_allclose(np.asarray(output.logps)[:, 0],
                             np.log(probs[0, 0][tokens[:, 0]]), atol=1e-5)


def test_truncated_first_token_frequencies(small_vocab_model):
  config, params, prompt = small_vocab_model
  sampling = decoding.SamplingParams(max_decode_length=1, temperature=0.7, top_k=5, top_p=0.8,
                                     num_samples=8192)
  output = decoding.make_sampler(config, sampling)(params, prompt, jax.random.key(7))
  tokens = np.asarray(output.tokens)[:, 0]
  logits = _logits(config, params, prompt, np.zeros((1, 1), np.int32))[:, :1]
  probs = np.exp(_reference_sampling_logps(np.repeat(logits, 8, 0), sampling,
                                           np.arange(8)[:, None]))[:, 0]
  assert 1 < (probs > 0).sum() < 5
  counts = np.bincount(tokens, minlength=8).astype(np.float64)
  assert (counts[probs == 0] == 0).all()
  assert _chi_square_p(counts, probs) > 1e-3
  np.testing.assert_allclose(np.asarray(output.sampling_logps)[:, 0], np.log(probs[tokens]),
                             atol=1e-5)


def test_suppressed_pad_differs_from_the_model_by_log_one_minus_p_pad(small_vocab_model):
  """The documented gap: logps are the model's over the full vocabulary, the samples avoid pad."""
  config, params, prompt = small_vocab_model
  sampling = decoding.SamplingParams(max_decode_length=1, num_samples=4)
  output = decoding.make_sampler(config, sampling)(params, prompt, jax.random.key(11))
  logits = _logits(config, params, prompt, np.zeros((1, 1), np.int32))[0, 0]
  p_pad = np.exp(logits[0] - scipy.special.logsumexp(logits))
  assert p_pad > 0.01
  np.testing.assert_allclose(np.asarray(output.logps - output.sampling_logps)[:, 0],
                             np.log1p(-p_pad), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Warping functions and parameters.


def test_top_k_and_top_p_keep_the_right_sets():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(decoding.top_k_logits(logits, 2)) == [False, True, False, True, False]
  assert kept(decoding.top_k_logits(logits, 0)) == [True] * 5
  # 0.4 + 0.3 = 0.7 reaches 0.7; 0.75 needs 0.15 as well.
  assert kept(decoding.top_p_logits(logits, 0.65)) == [False, True, False, True, False]
  assert kept(decoding.top_p_logits(logits, 0.75)) == [False, True, False, True, True]
  assert kept(decoding.top_p_logits(logits, 0.1)) == [False, True, False, False, False]


def test_inverse_cdf_never_draws_zero_probability_tokens():
  """Uniforms placed inside the CDF steps that XLA's cumsum leaves at zero-probability tokens (a
  512-token vocabulary is wide enough for CPU's blocked sum to round differently there)."""
  rng = np.random.default_rng(0)
  logits_NxV = np.where(rng.random((4, 512)) < 0.3, 3 * rng.normal(size=(4, 512)), -np.inf)
  probs_NxV = jax.nn.softmax(jnp.asarray(logits_NxV, jnp.float32), axis=-1)
  cdf_NxV = np.asarray(jax.jit(lambda p: jnp.cumsum(p, axis=-1))(probs_NxV))
  probs_NxV = np.asarray(probs_NxV)
  total_N = cdf_NxV[:, -1]
  rows, uniforms = [], []
  for row, column in zip(*np.nonzero(probs_NxV[:, 1:] == 0)):
    low, high = cdf_NxV[row, column], cdf_NxV[row, column + 1]  # step of token column + 1
    u = np.nextafter(np.float32(low / total_N[row]), np.float32(0))
    for _ in range(5):  # a few ulps around the step: keep those whose point lands inside it
      point = np.float32(u * total_N[row])
      if min(low, high) <= point < max(low, high):
        rows.append(row)
        uniforms.append(u)
      u = np.nextafter(u, np.float32(2))
  assert len(rows) >= 4, "the test needs uniforms inside zero-probability steps"
  # And the ends of the range for every row.
  below_one = np.nextafter(np.float32(1), np.float32(0))
  rows += [0, 1, 2, 3] * 2
  uniforms += [0.0] * 4 + [below_one] * 4
  tokens_N = np.asarray(decoding.invert_cdf(jnp.asarray(probs_NxV[rows]),
                                            jnp.asarray(uniforms, jnp.float32)))
  assert (probs_NxV[rows, tokens_N] > 0).all()
  np.testing.assert_array_equal(tokens_N[-8:-4], (probs_NxV > 0).argmax(-1))


def test_argmax_takes_the_first_maximum():
  logits = jnp.array([[0.0, 2.0, 2.0, -1.0], [3.0, 1.0, 3.0, 3.0], [-jnp.inf, 0.5, 0.1, 0.5]])
  np.testing.assert_array_equal(decoding.argmax(logits), [1, 0, 1])
  random = jax.random.normal(jax.random.key(0), (16, 300))
  np.testing.assert_array_equal(decoding.argmax(random), jnp.argmax(random, axis=-1))


def test_invalid_sampling_params_fail():
  for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
              dict(num_samples=0), dict(max_decode_length=0)):
    with pytest.raises(ValueError):
      decoding.SamplingParams(**bad)


# ----------------------------------------------------------------------------------------------
# Sharded over the training mesh.


def test_sharded_sampling_equals_one_device(model, prompts):
  config, params = model
  mesh = partitioning.make_mesh((2, 2, 2))
  key = jax.random.key(8)
  single = decoding.make_sampler(config, SAMPLED)(params, prompts, key)
  sharded = decoding.make_sampler(config, SAMPLED, mesh)(params, prompts, key)
  assert sharded.tokens.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(sharded.tokens, single.tokens)
  np.testing.assert_array_equal(sharded.lengths, single.lengths)
  np.testing.assert_array_equal(sharded.truncated, single.truncated)
  # Sharded matmuls sum in another order: float32 rounding only.
  np.testing.assert_allclose(sharded.logps, single.logps, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sharded.sampling_logps, single.sampling_logps, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="does not split"):
    decoding.make_sampler(config, SAMPLED, mesh)(params, prompts[:6], key)
  # Scanned layers: the caches are [batch, layers, heads, length, kv], laid out the same way.
  from dro_jax.models import scan as scan_lib
  assert decoding.cache_axes(5) == ("batch", "layers", "heads", "length", "kv")
  assert decoding.cache_axes(4) == decoding.CACHE_AXES and decoding.cache_axes(0) is None
  scanned = decoding.make_sampler(config.replace(scan_layers=True), SAMPLED, mesh)(
      scan_lib.stack_layers(params, config), prompts, key)
  np.testing.assert_array_equal(scanned.tokens, single.tokens)
  np.testing.assert_allclose(scanned.logps, single.logps, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Text in, text out.


@pytest.fixture(scope="module")
def vocabulary():
  import sentencepiece
  sentences = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning",
               "the sun is warm today", "we read a good book", "rain falls on the roof"] * 4
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=48, pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
  return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def test_sample_text(vocabulary):
  config = t5_lib.get_config("tiny", vocab_size=-(-vocabulary.get_piece_size() // 8) * 8)
  params = t5_lib.init_params(config, jax.random.key(9))
  prompts = ["the cat sat", "a good book on the roof", "birds"]
  sampling = decoding.SamplingParams(max_decode_length=12, num_samples=2)
  responses = decoding.sample_text(params, config, vocabulary, prompts, jax.random.key(10),
                                   sampling=sampling)
  assert len(responses) == 6 and all(isinstance(r, str) for r in responses)
  tokens = decoding.encode_prompts(vocabulary, prompts)
  assert (tokens[np.arange(3), (tokens > 0).sum(1) - 1] == EOS).all()
  output = decoding.make_sampler(config, sampling)(params, tokens, jax.random.key(10))
  expected = []
  for row, length in zip(np.asarray(output.tokens), np.asarray(output.lengths)):
    ids = [int(t) for t in row[:length] if t != EOS]
    expected.append(vocabulary.decode(ids))
  assert responses == expected
  again, truncated = decoding.sample_text(params, config, vocabulary, prompts, jax.random.key(10),
                                          sampling=sampling, return_truncated=True)
  assert again == responses and truncated == np.asarray(output.truncated).tolist()
  assert decoding.sample_text(params, config, vocabulary, [], return_truncated=True) == ([], [])
  # On the mesh the prompts are padded to a multiple of data x fsdp and the padding dropped.
  mesh = partitioning.make_mesh((2, 2, 2))
  assert decoding.sample_text(params, config, vocabulary, prompts, jax.random.key(10),
                              sampling=sampling, mesh=mesh) == responses


def test_long_prompts_keep_their_end_as_in_training(vocabulary):
  """One truncation rule for the training Tasks and for sampling: the end of a prompt."""
  import tensorflow as tf
  from dro_jax.data import tasks
  prompt = "the cat sat on the mat and a dog ran in the park"
  ids = [int(t) for t in vocabulary.encode(prompt)]
  assert len(ids) > 6
  tokens_BxS = decoding.encode_prompts(vocabulary, [prompt, "birds"], max_input_length=6)
  assert tokens_BxS.shape == (2, 6)
  np.testing.assert_array_equal(tokens_BxS[0], ids[-5:] + [EOS])
  eos = types.SimpleNamespace(vocabulary=types.SimpleNamespace(eos_id=EOS))
  truncate = tasks.TruncateAndAppendEos({"inputs": 6, "targets": 6},
                                        output_features={"inputs": eos, "targets": eos})
  trained = truncate._truncate({"inputs": tf.constant(ids), "targets": tf.constant(ids)})
  np.testing.assert_array_equal(trained["inputs"], tokens_BxS[0])
  np.testing.assert_array_equal(trained["targets"], ids[:5] + [EOS])  # responses keep their start
  with pytest.raises(ValueError, match="max_input_length"):
    decoding.encode_prompts(vocabulary, [prompt], max_input_length=1)
