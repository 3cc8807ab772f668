"""Log-probabilities of target tokens: the only model call on the loss path.

Losses take per-sequence SUMS of target log-probs (and token counts where they average, as IPO).
`target_logps_from_logits` reduces the log-normaliser in float32 from the logits as they come
(bfloat16 on accelerators) and has its own gradient: the backward recomputes the softmax from the
saved logits and writes d logits = (onehot(target) − softmax) · g straight in the logits' dtype,
so neither pass keeps a float32 [batch, length, vocab] array alive.

Several target sequences of ONE prompt (chosen and rejected, a KTO mismatched response, ...) are
scored with one encoder pass: `score_many` encodes the prompts once and runs the decoder on the
stacked batch with the encoder output repeated, so gradients flow into the encoder through every
use.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from dro_jax.models import t5 as t5_lib

Array = jax.Array


@jax.custom_vjp
def _target_minus_normaliser(logits_BxLxV: Array, targets_BxL: Array) -> Array:
  """logits[target] − logsumexp(logits) in float32 [B, L]."""
  return _target_minus_normaliser_fwd(logits_BxLxV, targets_BxL)[0]


def _target_minus_normaliser_fwd(logits_BxLxV, targets_BxL):
  normaliser_BxL = jax.nn.logsumexp(logits_BxLxV.astype(jnp.float32), axis=-1)
  target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return (target_BxL.astype(jnp.float32) - normaliser_BxL,
          (logits_BxLxV, targets_BxL, normaliser_BxL))


def _target_minus_normaliser_bwd(residuals, g_BxL):
  logits_BxLxV, targets_BxL, normaliser_BxL = residuals
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits_BxLxV.shape, logits_BxLxV.ndim - 1)
  onehot = (vocab == targets_BxL[..., None]).astype(jnp.float32)
  softmax = jnp.exp(logits_BxLxV.astype(jnp.float32) - normaliser_BxL[..., None])
  d_logits = ((onehot - softmax) * g_BxL[..., None]).astype(logits_BxLxV.dtype)
  return d_logits, None


_target_minus_normaliser.defvjp(_target_minus_normaliser_fwd, _target_minus_normaliser_bwd)


def target_logps_from_logits(logits_BxLxV: Array, targets_BxL: Array,
                             weights_BxL: Array | None = None) -> Array:
  """Per-token log p(target) [B, L] in float32, zero where weights (default: target != 0) are 0.

  The gradient with respect to the logits comes back in the logits' dtype.
  """
  if weights_BxL is None:
    weights_BxL = targets_BxL > 0
  token_logps = _target_minus_normaliser(logits_BxLxV, targets_BxL.astype(jnp.int32))
  return jnp.where(weights_BxL > 0, token_logps, 0.0)


def sequence_logps(token_logps_BxL: Array, weights_BxL: Array) -> tuple[Array, Array]:
  """(sum of token log-probs [B], number of target tokens [B]), both float32."""
  mask = (weights_BxL > 0).astype(jnp.float32)
  return jnp.sum(token_logps_BxL * mask, axis=-1), jnp.sum(mask, axis=-1)


def length_normalize(sums_B: Array, counts_B: Array) -> Array:
  """Per-token average log-prob; an empty completion averages to 0 instead of NaN."""
  return sums_B / jnp.maximum(counts_B, 1.0)


def encode(model: t5_lib.T5, params: Any, encoder_input_tokens: Array, *,
           deterministic: bool = True, rngs: Mapping[str, Array] | None = None) -> Array:
  """The encoder output [B, S, embed] of the prompts."""
  return model.apply({"params": params}, encoder_input_tokens, deterministic=deterministic,
                     rngs=rngs, method=model.encode)


def decode_scores(model: t5_lib.T5, params: Any, encoded: Array, encoder_input_tokens: Array,
                  decoder_input_tokens: Array, decoder_target_tokens: Array,
                  decoder_loss_weights: Array | None = None, *, deterministic: bool = True,
                  rngs: Mapping[str, Array] | None = None) -> dict[str, Array]:
  """`score` from an encoder output already computed (`encode`): the decoder pass only."""
  if decoder_loss_weights is None:
    decoder_loss_weights = decoder_target_tokens > 0
  logits = model.apply({"params": params}, encoded, encoder_input_tokens, decoder_input_tokens,
                       deterministic=deterministic, rngs=rngs, method=model.decode)
  token_logps = target_logps_from_logits(logits, decoder_target_tokens, decoder_loss_weights)
  sums, counts = sequence_logps(token_logps, decoder_loss_weights)
  return {"token_logps": token_logps, "logps": sums, "lengths": counts}


def score(model: t5_lib.T5, params: Any, encoder_input_tokens: Array,
          decoder_input_tokens: Array, decoder_target_tokens: Array,
          decoder_loss_weights: Array | None = None, *, deterministic: bool = True,
          rngs: Mapping[str, Array] | None = None,
          return_encoded: bool = False) -> dict[str, Array]:
  """Token and sequence log-probs of targets; the `logps` sum is what every loss takes.

  With `return_encoded`, the encoder output is returned too (`encoded`), so a value head on the
  policy's encoder (single-network DRO-V) or a second response to the same prompts
  (`decode_scores`) needs no second encoder pass.
  """
  encoded = encode(model, params, encoder_input_tokens, deterministic=deterministic, rngs=rngs)
  scores = decode_scores(model, params, encoded, encoder_input_tokens, decoder_input_tokens,
                         decoder_target_tokens, decoder_loss_weights,
                         deterministic=deterministic, rngs=rngs)
  if return_encoded:
    scores["encoded"] = encoded
  return scores


def _pad_to(x: Array, length: int) -> Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


Targets = tuple[Array, Array, Array | None]  # decoder inputs, targets, loss weights (or None)


def score_many(model: t5_lib.T5, params: Any, encoder_input_tokens: Array,
               targets: Sequence[Targets], *, deterministic: bool = True,
               rngs: Mapping[str, Array] | None = None) -> list[dict[str, Array]]:
  """Scores of K target sets [B, L_k] for the SAME prompts: one encoder pass over [B, S], one
  decoder pass over [K·B, max L_k] with the encoder output repeated.

  Returns K dicts of `logps` and `lengths` [B]. Shorter targets are padded with zeros (weight 0;
  the decoder is causal, so padding after a sequence leaves its log-probs as they are).
  """
  count = len(targets)
  length = max(target.shape[1] for _, target, _ in targets)
  decoder_inputs = jnp.concatenate([_pad_to(inputs, length) for inputs, _, _ in targets])
  decoder_targets = jnp.concatenate([_pad_to(target, length) for _, target, _ in targets])
  weights = jnp.concatenate([
      _pad_to(target > 0 if weight is None else weight, length) for _, target, weight in targets])
  encoded = encode(model, params, encoder_input_tokens, deterministic=deterministic, rngs=rngs)
  scores = decode_scores(model, params, jnp.concatenate([encoded] * count),
                         jnp.concatenate([encoder_input_tokens] * count), decoder_inputs,
                         decoder_targets, weights, deterministic=deterministic, rngs=rngs)
  logps, lengths = jnp.split(scores["logps"], count), jnp.split(scores["lengths"], count)
  return [{"logps": logps[k], "lengths": lengths[k]} for k in range(count)]


def score_pairs(model: t5_lib.T5, params: Any, batch: Mapping[str, Array], *,
                deterministic: bool = True,
                rngs: Mapping[str, Array] | None = None) -> dict[str, Array]:
  """Chosen and rejected scored in ONE forward pass: one encoder pass over the prompts, one
  decoder pass over chosen and rejected concatenated on the batch axis (`score_many`).

  Returns `chosen_logps`, `rejected_logps` (sums), `chosen_lengths`, `rejected_lengths`.
  """
  if "chosen_decoder_loss_weights" in batch:
    weights = (batch["chosen_decoder_loss_weights"], batch["rejected_decoder_loss_weights"])
  else:
    weights = (batch["chosen_decoder_target_tokens"] > 0,
               batch["rejected_decoder_target_tokens"] > 0)
  chosen, rejected = score_many(
      model, params, batch["encoder_input_tokens"],
      [(batch[f"{side}_decoder_input_tokens"], batch[f"{side}_decoder_target_tokens"], weight)
       for side, weight in zip(("chosen", "rejected"), weights)],
      deterministic=deterministic, rngs=rngs)
  return {"chosen_logps": chosen["logps"], "rejected_logps": rejected["logps"],
          "chosen_lengths": chosen["lengths"], "rejected_lengths": rejected["lengths"]}
