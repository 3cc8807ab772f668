"""Batched sampling from the T5 with a key/value cache: greedy, temperature, top-k and top-p.

The encoder runs once per prompt and the cross-attention keys/values are projected once; both are
repeated for the `num_samples` samples of a prompt. Each step feeds one token per sequence through
the cached decoder (self-attention cache, relative-position bias row of the cache index) inside a
`lax.while_loop` that stops as soon as every sequence has produced EOS.

Every sequence draws from its own key (the prompt's key folded with the sample index, then with the
step), so a sample depends on its prompt and key only: not on the batch it shares, nor on the mesh.

Outputs, all [batch * num_samples, max_decode_length] and prompt-major (the samples of prompt i
are rows i*n .. i*n+n-1): tokens (0 after EOS; EOS itself is a sampled token), raw log-probs of the
model at temperature 1 without truncation (what scoring.py returns for the same tokens), and
log-probs under the distribution actually sampled from (after temperature, top-k and top-p); per
sample, its length and whether it was cut off at max_decode_length before producing EOS.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dro_jax import partitioning
from dro_jax.data import records
from dro_jax.models import t5 as t5_lib

Array = jax.Array
PAD_ID = 0
# The decoder's first input token (T5's decoder start token is the padding id).
DECODER_START_ID = 0
# Logical axes of the 4-D cache arrays: self-attention [batch, heads, max_len, kv] and
# cross-attention [batch, heads, source_len, kv] (heads-major, so decoding reads them untransposed).
CACHE_AXES = ("batch", "heads", "length", "kv")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample; frozen and hashable, so it is static under jit.

  temperature 0 is greedy decoding; top_k 0 and top_p 1 switch those truncations off.
  suppress_pad keeps the padding token out of the samples, so every token before EOS is one that
  scoring counts (scoring masks target 0); False samples from the full model distribution.

  With suppress_pad, each token is drawn from the model conditioned on "not padding", while
  SampleOutput.logps stay the model's log-probs normalised over the full vocabulary, as scoring.py
  and the losses compute them (so they are deliberately not renormalised). Averages over these
  samples, such as a KL estimate sum(logps - ref_logps), are then averages over pad-free
  responses: per step the two distributions differ by log(1 - p(pad)), which is exactly
  logps - sampling_logps at temperature 1 without top-k / top-p, and exp(sum(logps -
  sampling_logps)) is the importance weight that corrects it. A trained T5 gives padding (never a
  target) negligible mass, so the bias is negligible; an untrained one about 1/vocab per token.
  """

  max_decode_length: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_samples: int = 1
  eos_id: int = 1
  suppress_pad: bool = True

  def __post_init__(self):
    if self.max_decode_length < 1:
      raise ValueError(f"max_decode_length must be >= 1, got {self.max_decode_length}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 is off), got {self.top_p}")
    if self.num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


class SampleOutput(NamedTuple):
  """Samples, prompt-major; per-token values are 0 after EOS."""

  tokens: Array  # [B*n, L] int32
  logps: Array  # [B*n, L] float32, the model's log-probs (temperature 1, no truncation)
  sampling_logps: Array  # [B*n, L] float32, log-probs under the distribution sampled from
  lengths: Array  # [B*n] int32, tokens up to and including EOS
  # [B*n] bool: max_decode_length reached without EOS. Such a response is unfinished; judges and
  # rewards should not take it for a complete answer.
  truncated: Array


# ----------------------------------------------------------------------------------------------
# Choosing the next token.


def top_k_logits(logits_NxV: Array, k: int) -> Array:
  """Logits outside the k largest set to -inf (ties with the k-th value are kept)."""
  if k <= 0 or k >= logits_NxV.shape[-1]:
    return logits_NxV
  # The minimum of the k values, not their last column: XLA's CPU TopK kernel replaces the sort
  # only when the whole top-k slice is used; a column of it falls back to sorting the vocabulary.
  kth_Nx1 = jnp.min(jax.lax.top_k(logits_NxV, k)[0], axis=-1, keepdims=True)
  return jnp.where(logits_NxV >= kth_Nx1, logits_NxV, -jnp.inf)


def top_p_logits(logits_NxV: Array, p: float) -> Array:
  """Keep the smallest set of most likely tokens whose probability reaches p (ties with its least
  likely member included); the rest -inf."""
  if p >= 1.0:
    return logits_NxV
  probs_NxV = jax.nn.softmax(logits_NxV, axis=-1)
  # Non-negative float32s order like their bit patterns, so a binary search over int32 finds the
  # smallest kept probability exactly in 32 masked sums; sorting the vocabulary every step is
  # an order of magnitude slower on CPU.
  bits_NxV = jax.lax.bitcast_convert_type(probs_NxV, jnp.int32)

  def halve(_, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
    low_Nx1, high_Nx1 = bounds  # mass(probs >= low) reaches p; mass(probs >= high) does not
    middle_Nx1 = low_Nx1 + (high_Nx1 - low_Nx1) // 2
    mass_Nx1 = jnp.sum(jnp.where(bits_NxV >= middle_Nx1, probs_NxV, 0.0), axis=-1, keepdims=True)
    reached_Nx1 = mass_Nx1 >= p
    return (jnp.where(reached_Nx1, middle_Nx1, low_Nx1),
            jnp.where(reached_Nx1, high_Nx1, middle_Nx1))

  bounds = (jnp.zeros_like(bits_NxV[:, :1]), jnp.max(bits_NxV, axis=-1, keepdims=True) + 1)
  threshold_Nx1, _ = jax.lax.fori_loop(0, 32, halve, bounds)
  return jnp.where(bits_NxV >= threshold_Nx1, logits_NxV, -jnp.inf)


def sampling_logits(logits_NxV: Array, sampling: SamplingParams) -> Array:
  """float32 logits of the distribution sampled from: pad suppression, temperature, top-k, top-p."""
  logits_NxV = logits_NxV.astype(jnp.float32)
  if sampling.suppress_pad:
    logits_NxV = logits_NxV.at[:, PAD_ID].set(-jnp.inf)
  if not sampling.greedy:
    logits_NxV = logits_NxV / sampling.temperature
  logits_NxV = top_k_logits(logits_NxV, sampling.top_k)
  return top_p_logits(logits_NxV, sampling.top_p)


def _gather(values_NxV: Array, tokens_N: Array) -> Array:
  return jnp.take_along_axis(values_NxV, tokens_N[:, None], axis=-1)[:, 0]


def categorical(keys_N: Array, probs_NxV: Array) -> Array:
  """One token per row of `probs` (summing to ~1) by inverting the CDF at a uniform draw.

  One uniform per row instead of Gumbel noise over the whole vocabulary: several times faster on
  CPU.
  """
  return invert_cdf(probs_NxV, jax.vmap(jax.random.uniform)(keys_N))


def invert_cdf(probs_NxV: Array, uniform_N: Array) -> Array:
  """The first token of positive probability whose CDF exceeds `uniform` x the row's mass.

  Only tokens of positive probability are candidates: XLA's cumsum (a blocked sum on CPU) is not
  flat across zero-probability tokens, so their CDF steps can be an ulp wide and a uniform that
  lands in one would pick a token outside top-k / top-p.
  """
  cdf_NxV = jnp.cumsum(probs_NxV, axis=-1)
  # Scaled by the summed mass, so float rounding of the CDF cannot run past its end.
  point_Nx1 = uniform_N[:, None] * cdf_NxV[:, -1:]
  vocab_size = probs_NxV.shape[-1]
  vocab_V = jnp.arange(vocab_size, dtype=jnp.int32)
  positive_NxV = probs_NxV > 0
  first_N = jnp.min(jnp.where(positive_NxV & (cdf_NxV > point_Nx1), vocab_V, vocab_size), axis=-1)
  # A point at the very end (rounding) takes the last token of positive probability.
  last_N = jnp.max(jnp.where(positive_NxV, vocab_V, 0), axis=-1)
  return jnp.minimum(first_N, last_N)


def argmax(logits_NxV: Array) -> Array:
  """First index of the row maximum, int32 [N]."""
  # Two plain reductions: XLA's CPU argmax (a variadic reduce) is 4x slower over a vocabulary.
  max_Nx1 = jnp.max(logits_NxV, axis=-1, keepdims=True)
  vocab_size = logits_NxV.shape[-1]
  vocab_V = jnp.arange(vocab_size, dtype=jnp.int32)
  first_N = jnp.min(jnp.where(logits_NxV == max_Nx1, vocab_V, vocab_size), axis=-1)
  return jnp.minimum(first_N, vocab_size - 1)


def _token_logps(logits_NxV: Array, tokens_N: Array) -> Array:
  return _gather(logits_NxV, tokens_N) - jax.nn.logsumexp(logits_NxV, axis=-1)


def choose_tokens(logits_NxV: Array, keys_N: Array,
                  sampling: SamplingParams) -> tuple[Array, Array, Array]:
  """(tokens [N], raw model log-probs [N], sampling log-probs [N]) for one step.

  Greedy decoding samples from a point mass, so its sampling log-probs are 0.
  """
  logits_NxV = logits_NxV.astype(jnp.float32)
  warped_NxV = sampling_logits(logits_NxV, sampling)
  if sampling.greedy:
    tokens_N = argmax(warped_NxV)
    sampling_logps_N = jnp.zeros(tokens_N.shape, jnp.float32)
  else:
    tokens_N = categorical(keys_N, jax.nn.softmax(warped_NxV, axis=-1))
    sampling_logps_N = _token_logps(warped_NxV, tokens_N)
  return tokens_N, _token_logps(logits_NxV, tokens_N), sampling_logps_N


# ----------------------------------------------------------------------------------------------
# Keys and caches.


def sample_keys(rng: Array, batch_size: int, num_samples: int) -> Array:
  """Typed keys [batch * num_samples], prompt-major: one key per prompt (given [batch], or one
  key folded with the prompt index), folded with the sample index."""
  fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  if rng.ndim == 0:
    # Folding (not splitting) keeps prompt i's key independent of the batch size.
    rng = fold(rng, jnp.arange(batch_size))
  if rng.shape != (batch_size,):
    raise ValueError(f"rng: expected one key or {batch_size} keys (one per prompt), got key "
                     f"shape {rng.shape}")
  keys_BxN = jax.vmap(lambda key: fold(key, jnp.arange(num_samples)))(rng)
  return keys_BxN.reshape(-1)


def cache_axes(ndim: int) -> tuple[str, ...] | None:
  """Logical axes of a cached key/value array: [batch, heads, length, kv], or with scanned layers
  (T5Config.scan_layers) [batch, layers, heads, length, kv]; None for other cache leaves."""
  if ndim == len(CACHE_AXES):
    return CACHE_AXES
  if ndim == len(CACHE_AXES) + 1:
    return (CACHE_AXES[0], "layers", *CACHE_AXES[1:])
  return None


def _constrain_cache(cache: Any) -> Any:
  """Batch over data/fsdp, heads over model, as the training activations."""
  def constrain(x):
    axes = cache_axes(x.ndim)
    return x if axes is None else nn.with_logical_constraint(x, axes)
  return jax.tree.map(constrain, cache)


def create_cache(model: t5_lib.T5, params: Any, encoded_BxSxE: Array,
                 encoder_input_tokens_BxS: Array, max_decode_length: int) -> Any:
  """Zeroed self-attention caches and cross-attention keys/values projected from `encoded`."""
  start_Bx1 = jnp.full((encoded_BxSxE.shape[0], 1), DECODER_START_ID, jnp.int32)
  _, variables = model.apply({"params": params}, encoded_BxSxE, encoder_input_tokens_BxS,
                             start_Bx1, decode=True, max_decode_length=max_decode_length,
                             method=model.decode, mutable=["cache"])
  return variables["cache"]


def repeat_batch(tree: Any, repeats: int) -> Any:
  """Each example's arrays repeated `repeats` times on the batch axis (prompt-major)."""
  if repeats == 1:
    return tree
  return jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=0) if x.ndim else x, tree)


# ----------------------------------------------------------------------------------------------
# The decoding loop.


class _LoopState(NamedTuple):
  step: Array  # [] int32: the position written this iteration
  cache: Any
  inputs_N: Array  # [N] int32: decoder input of this step (the previous token)
  done_N: Array  # [N] bool: EOS already produced
  tokens_NxL: Array
  logps_NxL: Array
  sampling_logps_NxL: Array
  lengths_N: Array


def _write_column(values_NxL: Array, column_N: Array, step: Array) -> Array:
  return jax.lax.dynamic_update_slice(values_NxL, column_N[:, None].astype(values_NxL.dtype),
                                      (0, step))


def _initial_state(cache: Any, num: int, length: int) -> _LoopState:
  zeros_NxL = jnp.zeros((num, length), jnp.float32)
  return _LoopState(
      step=jnp.array(0, jnp.int32), cache=cache,
      inputs_N=jnp.full((num,), DECODER_START_ID, jnp.int32), done_N=jnp.zeros((num,), bool),
      tokens_NxL=jnp.zeros((num, length), jnp.int32), logps_NxL=zeros_NxL,
      sampling_logps_NxL=zeros_NxL, lengths_N=jnp.zeros((num,), jnp.int32))


def _advance(state: _LoopState, cache: Any, logits_NxV: Array, keys_N: Array,
             sampling: SamplingParams) -> _LoopState:
  """Choose this step's tokens and write them; finished sequences get 0 and log-probs 0."""
  step_keys_N = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_N, state.step)
  tokens_N, logps_N, sampling_logps_N = choose_tokens(logits_NxV, step_keys_N, sampling)
  live_N = ~state.done_N
  tokens_N = jnp.where(live_N, tokens_N, PAD_ID)
  return _LoopState(
      step=state.step + 1, cache=cache, inputs_N=tokens_N,
      done_N=state.done_N | (tokens_N == sampling.eos_id),
      tokens_NxL=_write_column(state.tokens_NxL, tokens_N, state.step),
      logps_NxL=_write_column(state.logps_NxL, jnp.where(live_N, logps_N, 0.0), state.step),
      sampling_logps_NxL=_write_column(state.sampling_logps_NxL,
                                       jnp.where(live_N, sampling_logps_N, 0.0), state.step),
      lengths_N=state.lengths_N + live_N.astype(jnp.int32))


def sample(params: Any, encoder_input_tokens_BxS: Array, rng: Array, *, config: t5_lib.T5Config,
           sampling: SamplingParams) -> SampleOutput:
  """Samples `sampling.num_samples` responses per prompt (pure; make_sampler compiles it).

  rng is one key, or one key per prompt ([B] typed or [B, 2] raw keys); greedy ignores it.
  """
  model = t5_lib.T5(config)
  batch, length, repeats = (encoder_input_tokens_BxS.shape[0], sampling.max_decode_length,
                            sampling.num_samples)
  encoded_BxSxE = model.apply({"params": params}, encoder_input_tokens_BxS, method=model.encode)
  cache = create_cache(model, params, encoded_BxSxE, encoder_input_tokens_BxS, length)
  # Encoder output and cross keys/values are computed per prompt and repeated per sample.
  cache = _constrain_cache(repeat_batch(cache, repeats))
  encoder_input_tokens_NxS = repeat_batch(encoder_input_tokens_BxS, repeats)
  keys_N = sample_keys(rng, batch, repeats)

  def step(state: _LoopState) -> _LoopState:
    # `encoded` is only read when the cache is created; the steps use the cached keys/values.
    logits_Nx1xV, variables = model.apply(
        {"params": params, "cache": state.cache}, encoded_BxSxE, encoder_input_tokens_NxS,
        state.inputs_N[:, None], decode=True, max_decode_length=length, method=model.decode,
        mutable=["cache"])
    cache = _constrain_cache(variables["cache"])
    return _advance(state, cache, logits_Nx1xV[:, 0], keys_N, sampling)

  def running(state: _LoopState) -> Array:
    return (state.step < length) & ~jnp.all(state.done_N)

  final = jax.lax.while_loop(running, step, _initial_state(cache, batch * repeats, length))
  return SampleOutput(final.tokens_NxL, final.logps_NxL, final.sampling_logps_NxL,
                      final.lengths_N, ~final.done_N)


Sampler = Callable[[Any, Array, Array], SampleOutput]


@functools.lru_cache(maxsize=32)
def make_sampler(config: t5_lib.T5Config, sampling: SamplingParams, mesh: Mesh | None = None,
                 rules: tuple[tuple[str, Any], ...] = partitioning.DEFAULT_RULES) -> Sampler:
  """A compiled `(params, encoder_input_tokens [B, S], rng) -> SampleOutput`.

  With a mesh, parameters are placed by the logical rules (heads/mlp/vocab over `model`), the
  batch over data x fsdp, and the outputs come back batch-sharded. Cached, so repeated calls with
  the same arguments reuse the compiled program.
  """
  run = functools.partial(sample, config=config, sampling=sampling)
  if mesh is None:
    return jax.jit(run)
  shardings = partitioning.params_shardings(t5_lib.abstract_params(config), mesh, rules)
  batch = partitioning.batch_sharding(mesh)
  per_sample = partitioning.batch_sharding(mesh, rank=1)
  out_shardings = SampleOutput(batch, batch, batch, per_sample, per_sample)
  jitted = jax.jit(run, out_shardings=out_shardings)

  def sharded(params: Any, encoder_input_tokens_BxS: Array, rng: Array) -> SampleOutput:
    partitioning.check_batch_size(encoder_input_tokens_BxS.shape[0], mesh)
    params = partitioning.put(params, shardings)
    encoder_input_tokens_BxS = jax.device_put(encoder_input_tokens_BxS, batch)
    with partitioning.activate(mesh, rules):
      return jitted(params, encoder_input_tokens_BxS, rng)

  return sharded


# ----------------------------------------------------------------------------------------------
# Text in, text out.


class Vocabulary(Protocol):
  """What sample_text needs: seqio.SentencePieceVocabulary and SentencePieceProcessor fit."""

  def encode(self, text: str) -> Sequence[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


def _bucket(length: int, minimum: int = 8) -> int:
  """Next power of two, so prompts of similar length share one compiled program."""
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(length, 1)))))


def encode_prompts(vocabulary: Vocabulary, prompts: Sequence[str], *, eos_id: int = 1,
                   max_input_length: int | None = None, batch_multiple: int = 1) -> np.ndarray:
  """int32 [B', S] encoder inputs ending in EOS, right-padded with 0; B' rounds the number of
  prompts up to `batch_multiple` with all-padding rows.

  A prompt longer than `max_input_length` (counting EOS) keeps its last tokens, by the rule the
  training Tasks truncate with (`records.kept_tokens`), so the policy samples for the prompts it
  was trained on.
  """
  rows = [list(vocabulary.encode(prompt)) for prompt in prompts]
  if max_input_length is not None:
    if max_input_length < 2:
      raise ValueError(f"max_input_length counts EOS and must be >= 2, got {max_input_length}")
    rows = [row[records.kept_tokens("inputs", max_input_length)] for row in rows]
  rows = [[int(t) for t in row] + [eos_id] for row in rows]
  length = _bucket(max(len(row) for row in rows))
  if max_input_length is not None:
    length = min(length, max_input_length)
  batch = -(-len(rows) // batch_multiple) * batch_multiple
  tokens = np.zeros((batch, length), np.int32)
  for index, row in enumerate(rows):
    tokens[index, :len(row)] = row
  return tokens


def decode_responses(vocabulary: Vocabulary, tokens_NxL: np.ndarray, eos_id: int = 1) -> list[str]:
  """Strings of the tokens before EOS."""
  responses = []
  for row in np.asarray(tokens_NxL):
    ends = np.flatnonzero(row == eos_id)
    row = row[:ends[0]] if ends.size else row
    responses.append(vocabulary.decode([int(t) for t in row if t != PAD_ID]))
  return responses


def _host_array(values: Array, rows: int) -> np.ndarray:
  """The first `rows` rows on every host (gathered when the array spans several hosts)."""
  if not values.is_fully_addressable:
    values = multihost_utils.process_allgather(values, tiled=True)
  return np.asarray(jax.device_get(values))[:rows]


def sample_text(params: Any, config: t5_lib.T5Config, vocabulary: Vocabulary,
                prompts: Sequence[str], rng: Array | None = None, *,
                sampling: SamplingParams = SamplingParams(), mesh: Mesh | None = None,
                max_input_length: int | None = None,
                return_truncated: bool = False) -> list[str] | tuple[list[str], list[bool]]:
  """Responses to `prompts`: num_samples strings per prompt, prompt-major (len B * n).

  With return_truncated, (responses, truncated): truncated[i] says response i reached
  max_decode_length without EOS, so its text is unfinished.

  Prompts are encoded with EOS appended (as seqio's T5 tasks do); one longer than
  `max_input_length` keeps its end, as in training. rng is one key (default key 0);
  on a mesh the prompts are padded to a multiple of data x fsdp, which leaves the samples as they
  are on one device.
  """
  if not prompts:
    return ([], []) if return_truncated else []
  if rng is None:
    rng = jax.random.key(0)
  multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  tokens_BxS = encode_prompts(vocabulary, prompts, eos_id=sampling.eos_id,
                              max_input_length=max_input_length, batch_multiple=multiple)
  output = make_sampler(config, sampling, mesh)(params, tokens_BxS, rng)
  rows = len(prompts) * sampling.num_samples  # every process gets every response
  responses = decode_responses(vocabulary, _host_array(output.tokens, rows), sampling.eos_id)
  if return_truncated:
    return responses, [bool(t) for t in _host_array(output.truncated, rows)]
  return responses
