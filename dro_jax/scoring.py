"""Log-probabilities of target tokens: the only model call on the loss path.

Losses take per-sequence SUMS of target log-probs (and token counts where they average, as IPO).
`log_softmax` runs in float32 with at most one [batch, length, vocab] float32 array alive: the
target logit is gathered and the log-normaliser reduced from the same float32 copy.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dro_jax.models import t5 as t5_lib

Array = jax.Array


def target_logps_from_logits(logits_BxLxV: Array, targets_BxL: Array,
                             weights_BxL: Array | None = None) -> Array:
  """Per-token log p(target) [B, L] in float32, zero where weights (default: target != 0) are 0."""
  if weights_BxL is None:
    weights_BxL = targets_BxL > 0
  logits32 = logits_BxLxV.astype(jnp.float32)
  normaliser_BxL = jax.nn.logsumexp(logits32, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits32, targets_BxL[..., None], axis=-1)[..., 0]
  return jnp.where(weights_BxL > 0, target_logit_BxL - normaliser_BxL, 0.0)


def sequence_logps(token_logps_BxL: Array, weights_BxL: Array) -> tuple[Array, Array]:
  """(sum of token log-probs [B], number of target tokens [B]), both float32."""
  mask = (weights_BxL > 0).astype(jnp.float32)
  return jnp.sum(token_logps_BxL * mask, axis=-1), jnp.sum(mask, axis=-1)


def length_normalize(sums_B: Array, counts_B: Array) -> Array:
  """Per-token average log-prob; an empty completion averages to 0 instead of NaN."""
  return sums_B / jnp.maximum(counts_B, 1.0)


def score(model: t5_lib.T5, params: Any, encoder_input_tokens: Array,
          decoder_input_tokens: Array, decoder_target_tokens: Array,
          decoder_loss_weights: Array | None = None, *, deterministic: bool = True,
          rngs: Mapping[str, Array] | None = None,
          return_encoded: bool = False) -> dict[str, Array]:
  """Token and sequence log-probs of targets; the `logps` sum is what every loss takes.

  With `return_encoded`, the encoder output is returned too (`encoded`), so a value head on the
  policy's encoder (single-network DRO-V) needs no second encoder pass.
  """
  if decoder_loss_weights is None:
    decoder_loss_weights = decoder_target_tokens > 0
  variables = {"params": params}
  encoded = model.apply(variables, encoder_input_tokens, deterministic=deterministic,
                        rngs=rngs, method=model.encode)
  logits = model.apply(variables, encoded, encoder_input_tokens, decoder_input_tokens,
                       deterministic=deterministic, rngs=rngs, method=model.decode)
  token_logps = target_logps_from_logits(logits, decoder_target_tokens, decoder_loss_weights)
  sums, counts = sequence_logps(token_logps, decoder_loss_weights)
  scores = {"token_logps": token_logps, "logps": sums, "lengths": counts}
  if return_encoded:
    scores["encoded"] = encoded
  return scores


def _pad_to(x: Array, length: int) -> Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


def score_pairs(model: t5_lib.T5, params: Any, batch: Mapping[str, Array], *,
                deterministic: bool = True,
                rngs: Mapping[str, Array] | None = None) -> dict[str, Array]:
  """Chosen and rejected scored in ONE forward pass, concatenated on the batch axis.

  Returns `chosen_logps`, `rejected_logps` (sums), `chosen_lengths`, `rejected_lengths`.
  """
  length = max(batch["chosen_decoder_target_tokens"].shape[1],
               batch["rejected_decoder_target_tokens"].shape[1])

  def both(suffix: str) -> Array:
    chosen, rejected = batch[f"chosen_{suffix}"], batch[f"rejected_{suffix}"]
    return jnp.concatenate([_pad_to(chosen, length), _pad_to(rejected, length)], axis=0)

  weights_key = "decoder_loss_weights"
  if f"chosen_{weights_key}" in batch:
    weights = both(weights_key)
  else:
    weights = both("decoder_target_tokens") > 0
  encoder_inputs = jnp.concatenate([batch["encoder_input_tokens"]] * 2, axis=0)
  scores = score(model, params, encoder_inputs, both("decoder_input_tokens"),
                 both("decoder_target_tokens"), weights, deterministic=deterministic, rngs=rngs)
  chosen_logps, rejected_logps = jnp.split(scores["logps"], 2)
  chosen_lengths, rejected_lengths = jnp.split(scores["lengths"], 2)
  return {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
          "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
