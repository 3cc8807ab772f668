"""Alignment losses as pure array functions: `loss(...) -> (per_example_loss[B], metrics)`.

Inputs are per-sequence SUMS of target log-probs (what `scoring.score` returns), except the
token-level SFT loss. `weights` are per-example weights (0 for padding examples, which may hold
garbage): every statistic that mixes examples (KTO's z0 and desirable label, DRO-P's variance,
SFT's token count, the metrics) is a weighted mean over the whole batch. Under `jit` with a
batch sharded over devices, a reduction over the batch axis is already global, so these are
global-batch statistics. Per-example losses are 0 where the weight is 0; `weighted_mean` reduces
them to the scalar that is differentiated.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]


# ----------------------------------------------------------------------------------------------
# Weighted reductions.


def example_weights(weights_B: Array | None, like_B: Array) -> Array:
  """Float32 per-example weights; all ones when none are given."""
  if weights_B is None:
    return jnp.ones(like_B.shape[:1], jnp.float32)
  return jnp.asarray(weights_B, jnp.float32)


def weighted_mean(values_B: Array, weights_B: Array | None = None) -> Array:
  """Weighted mean over the batch; 0 for an all-padding batch, never NaN.

  Zero-weight entries are selected away (not multiplied by 0) so a NaN or inf in a padding
  example cannot leak into the result.
  """
  weights_B = example_weights(weights_B, values_B)
  total = jnp.sum(weights_B)
  masked_B = jnp.where(weights_B > 0, values_B.astype(jnp.float32), 0.0)
  return jnp.sum(weights_B * masked_B) / jnp.where(total > 0, total, 1.0)


def reduce_loss(per_example_loss_B: Array, weights_B: Array | None = None) -> Array:
  """The scalar training loss: weighted mean of per-example losses over the global batch."""
  return weighted_mean(per_example_loss_B, weights_B)


def _masked(loss_B: Array, weights_B: Array) -> Array:
  return jnp.where(weights_B > 0, loss_B, 0.0)


def padded_to_zero(weights_B: Array, *arrays: Array | None) -> tuple[Array | None, ...]:
  """Each array with its zero-weight rows replaced by 0, BEFORE any nonlinearity.

  A `where` after a nonlinearity hides a padding row's NaN from the value but not from the
  gradient (the cotangent of the unselected branch is 0·NaN = NaN); selecting the inputs first
  gives those rows a zero cotangent. Arrays may have trailing axes; None passes through.
  """
  def select(x: Array | None) -> Array | None:
    if x is None:
      return None
    x = jnp.asarray(x)
    keep = (weights_B > 0).reshape(weights_B.shape + (1,) * (x.ndim - 1))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))
  return tuple(select(x) for x in arrays)


def mismatched_partners(weights_B: Array) -> Array:
  """KTO's partner of each row: the next REAL row, cyclically (x_i, y_{next real after i}).

  Padding rows (weight 0) are skipped as partners and map to themselves; a batch with a single
  real row pairs it with itself. Under jit on a sharded batch this is a global-batch pairing.
  """
  real_B = weights_B > 0
  count = jnp.maximum(jnp.sum(real_B), 1)
  rank_B = jnp.cumsum(real_B) - 1  # rank of each real row among the real rows
  real_rows = jnp.argsort(~real_B, stable=True)  # indices of the real rows first, in order
  partner_B = real_rows[(rank_B + 1) % count]
  return jnp.where(real_B, partner_B, jnp.arange(weights_B.shape[0]))


MISMATCHED_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


def mismatched_batch(batch: dict[str, Array], partner_B: Array | None = None) -> dict[str, Array]:
  """The batch with each prompt paired with its partner's response (`mismatched_partners`).

  A batch that carries data-level partners (`kl_decoder_*` keys) uses those instead.
  """
  if "kl_decoder_target_tokens" in batch:
    return {**batch, **{key: batch[f"kl_{key}"] for key in MISMATCHED_KEYS
                        if f"kl_{key}" in batch}}
  if partner_B is None:
    partner_B = mismatched_partners(batch["example_weights"])
  return {**batch, **{key: jnp.take(batch[key], partner_B, axis=0) for key in MISMATCHED_KEYS
                      if key in batch}}


def _split_means(values_B: Array, positive_B: Array, weights_B: Array) -> tuple[Array, Array]:
  """Weighted means of `values_B` over the positive and the negative examples."""
  positive_B = positive_B.astype(bool)
  return (weighted_mean(values_B, weights_B * positive_B),
          weighted_mean(values_B, weights_B * ~positive_B))


def _logps_metrics(policy_logps_B: Array, ref_logps_B: Array, weights_B: Array) -> Metrics:
  return {"logps/policy": weighted_mean(policy_logps_B, weights_B),
          "logps/ref": weighted_mean(ref_logps_B, weights_B),
          "logratio/mean": weighted_mean(policy_logps_B - ref_logps_B, weights_B)}


def _pair_metrics(chosen_rewards_B: Array, rejected_rewards_B: Array,
                  policy_chosen_logps_B: Array, policy_rejected_logps_B: Array,
                  ref_chosen_logps_B: Array, ref_rejected_logps_B: Array,
                  weights_B: Array) -> Metrics:
  """rewards/* and logps/* of a pairwise loss; logps/policy and /ref average both responses."""
  both = lambda a, b: jnp.concatenate([a, b])
  metrics = _logps_metrics(both(policy_chosen_logps_B, policy_rejected_logps_B),
                           both(ref_chosen_logps_B, ref_rejected_logps_B),
                           both(weights_B, weights_B))
  metrics.update({
      "rewards/chosen": weighted_mean(chosen_rewards_B, weights_B),
      "rewards/rejected": weighted_mean(rejected_rewards_B, weights_B),
      "rewards/margins": weighted_mean(chosen_rewards_B - rejected_rewards_B, weights_B),
      "rewards/accuracies": weighted_mean(
          (chosen_rewards_B > rejected_rewards_B).astype(jnp.float32), weights_B),
      "logps/chosen": weighted_mean(policy_chosen_logps_B, weights_B),
      "logps/rejected": weighted_mean(policy_rejected_logps_B, weights_B),
  })
  return metrics


def above_mean_reward(rewards_B: Array, weights_B: Array | None = None) -> Array:
  """The DRO paper's label for real-valued rewards: desirable iff r > weighted batch mean."""
  return rewards_B > weighted_mean(rewards_B, weights_B)


def desirable_labels(rewards_B: Array | None = None, labels_B: Array | None = None,
                     weights_B: Array | None = None) -> Array:
  """KTO's labels: a thumbs label as given (all-thumbs-up is all desirable), else rewards above
  the weighted batch mean."""
  if labels_B is not None:
    return labels_B.astype(bool)
  if rewards_B is None:
    raise ValueError("desirable_labels needs rewards or labels")
  return above_mean_reward(rewards_B, weights_B)


# ----------------------------------------------------------------------------------------------
# Pairwise losses.


def dpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
             ref_chosen_logps: Array, ref_rejected_logps: Array, *, beta: float = 0.1,
             label_smoothing: float = 0.0,
             weights: Array | None = None) -> tuple[Array, Metrics]:
  """DPO: −(1−ε)·log σ(β·h) − ε·log σ(−β·h), h the chosen-minus-rejected log-ratio."""
  weights_B = example_weights(weights, policy_chosen_logps)
  policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps = (
      padded_to_zero(weights_B, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                     ref_rejected_logps))
  chosen_logratio_B = policy_chosen_logps - ref_chosen_logps
  rejected_logratio_B = policy_rejected_logps - ref_rejected_logps
  logits_B = beta * (chosen_logratio_B - rejected_logratio_B)
  loss_B = -((1.0 - label_smoothing) * jax.nn.log_sigmoid(logits_B)
             + label_smoothing * jax.nn.log_sigmoid(-logits_B))
  loss_B = _masked(loss_B, weights_B)
  metrics = _pair_metrics(beta * chosen_logratio_B, beta * rejected_logratio_B,
                          policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps, weights_B)
  metrics["loss"] = reduce_loss(loss_B, weights_B)
  return loss_B, metrics


def _per_token(sums_B: Array, lengths_B: Array | None) -> Array:
  # As scoring.length_normalize (losses import no model code): max(count, 1), so an empty
  # completion averages to 0 instead of 0/0.
  return sums_B if lengths_B is None else sums_B / jnp.maximum(lengths_B, 1.0)


def ipo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
             ref_chosen_logps: Array, ref_rejected_logps: Array, *, tau: float = 0.1,
             chosen_lengths: Array | None = None, rejected_lengths: Array | None = None,
             weights: Array | None = None) -> tuple[Array, Metrics]:
  """IPO: (h − 1/(2τ))², h from per-token averaged log-probs when lengths are given."""
  if (chosen_lengths is None) != (rejected_lengths is None):
    raise ValueError("ipo_loss: give both chosen_lengths and rejected_lengths, or neither")
  weights_B = example_weights(weights, policy_chosen_logps)
  (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
   chosen_lengths, rejected_lengths) = padded_to_zero(
       weights_B, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
       ref_rejected_logps, chosen_lengths, rejected_lengths)
  policy_chosen_B = _per_token(policy_chosen_logps, chosen_lengths)
  policy_rejected_B = _per_token(policy_rejected_logps, rejected_lengths)
  ref_chosen_B = _per_token(ref_chosen_logps, chosen_lengths)
  ref_rejected_B = _per_token(ref_rejected_logps, rejected_lengths)
  chosen_logratio_B = policy_chosen_B - ref_chosen_B
  rejected_logratio_B = policy_rejected_B - ref_rejected_B
  loss_B = jnp.square(chosen_logratio_B - rejected_logratio_B - 1.0 / (2.0 * tau))
  loss_B = _masked(loss_B, weights_B)
  metrics = _pair_metrics(chosen_logratio_B, rejected_logratio_B, policy_chosen_B,
                          policy_rejected_B, ref_chosen_B, ref_rejected_B, weights_B)
  metrics["loss"] = reduce_loss(loss_B, weights_B)
  return loss_B, metrics


# ----------------------------------------------------------------------------------------------
# Single-trajectory losses.


def kto_reference_point(policy_kl_logps: Array, ref_kl_logps: Array,
                        weights: Array | None = None) -> Array:
  """z0 = max(0, weighted mean of the mismatched log-ratios), a constant (stop-gradient)."""
  weights_B = example_weights(weights, policy_kl_logps)
  policy_kl_logps, ref_kl_logps = padded_to_zero(weights_B, policy_kl_logps, ref_kl_logps)
  return jax.lax.stop_gradient(
      jnp.maximum(weighted_mean(policy_kl_logps - ref_kl_logps, weights_B), 0.0))


def kto_loss(policy_logps: Array, ref_logps: Array, policy_kl_logps: Array | None,
             ref_kl_logps: Array | None, desirable: Array, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             weights: Array | None = None, z0: Array | None = None) -> tuple[Array, Metrics]:
  """KTO with the reference point z0 from mismatched pairs (`mismatched_partners`).

  z0 = max(0, weighted mean of the mismatched log-ratios), a constant (stop-gradient); the
  mismatched pair i counts with weights[i]. `desirable` is the thumbs label as given, or
  `above_mean_reward(rewards, weights)` for real-valued rewards. A caller that accumulates
  gradients over microbatches passes the global batch's `z0` (then the kl arrays may be None).
  """
  weights_B = example_weights(weights, policy_logps)
  if z0 is None:
    z0 = kto_reference_point(policy_kl_logps, ref_kl_logps, weights_B)
  z0 = jax.lax.stop_gradient(jnp.asarray(z0, jnp.float32))
  policy_logps, ref_logps = padded_to_zero(weights_B, policy_logps, ref_logps)
  desirable_B = desirable.astype(bool)
  logratio_B = policy_logps - ref_logps
  desirable_loss_B = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratio_B - z0)))
  undesirable_loss_B = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - logratio_B)))
  loss_B = _masked(jnp.where(desirable_B, desirable_loss_B, undesirable_loss_B), weights_B)
  chosen, rejected = _split_means(beta * logratio_B, desirable_B, weights_B)
  metrics = _logps_metrics(policy_logps, ref_logps, weights_B)
  metrics.update({"kto/z0": z0, "rewards/chosen": chosen, "rewards/rejected": rejected,
                  "rewards/margins": chosen - rejected,
                  "kto/desirable_fraction": weighted_mean(desirable_B.astype(jnp.float32),
                                                          weights_B),
                  "loss": reduce_loss(loss_B, weights_B)})
  return loss_B, metrics


def _dro_metrics(policy_logps_B: Array, ref_logps_B: Array, values_B: Array, rewards_B: Array,
                 residual_B: Array, loss_B: Array, tau: float, weights_B: Array) -> Metrics:
  # chosen / rejected: examples with reward above / below the weighted batch mean, as KTO's
  # labelling of real-valued rewards, so the two methods' curves are comparable.
  chosen, rejected = _split_means(tau * (policy_logps_B - ref_logps_B),
                                  above_mean_reward(rewards_B, weights_B), weights_B)
  metrics = _logps_metrics(policy_logps_B, ref_logps_B, weights_B)
  metrics.update({"rewards/chosen": chosen, "rewards/rejected": rejected,
                  "rewards/margins": chosen - rejected,
                  "value/mean": weighted_mean(values_B, weights_B),
                  "value/error": weighted_mean(jnp.abs(residual_B), weights_B),
                  "loss": reduce_loss(loss_B, weights_B)})
  return metrics


def dro_loss(policy_logps: Array, ref_logps: Array, values: Array, rewards: Array, *,
             tau: float = 1.0, weights: Array | None = None) -> tuple[Array, Metrics]:
  """DRO-V: ½·(r − V(x) − τ·ℓ)². Differentiating it gives the paper's Eq. 7 and Eq. 8 exactly.

  `values` carry the value network's gradient; the 1/τ policy-update scale is an optimizer
  transform (optim.policy_update_scale), not part of the loss.
  """
  weights_B = example_weights(weights, policy_logps)
  policy_logps, ref_logps, values, rewards = padded_to_zero(
      weights_B, policy_logps, ref_logps, values, rewards)
  values_B = values.astype(jnp.float32)
  rewards = rewards.astype(jnp.float32)
  residual_B = rewards - values_B - tau * (policy_logps - ref_logps)
  loss_B = _masked(0.5 * jnp.square(residual_B), weights_B)
  metrics = _dro_metrics(policy_logps, ref_logps, values_B, rewards, residual_B, loss_B, tau,
                         weights_B)
  return loss_B, metrics


def dro_p_loss(policy_logps: Array, ref_logps: Array, rewards: Array, *, tau: float = 1.0,
               weights: Array | None = None,
               baseline: Array | None = None) -> tuple[Array, Metrics]:
  """DRO-P: ½·weighted minibatch variance of a = r − τ·ℓ; no value network.

  Per example ½·(a_i − ā)²; their weighted mean is the variance. The gradient through ā sums
  to zero over the batch, so ā may be a constant: a caller accumulating gradients over
  microbatches passes the global batch's `baseline` ā (`dro_p_baseline`) and gets the exact
  gradient.
  """
  weights_B = example_weights(weights, policy_logps)
  policy_logps, ref_logps, rewards = padded_to_zero(weights_B, policy_logps, ref_logps, rewards)
  rewards = rewards.astype(jnp.float32)
  advantage_B = rewards - tau * (policy_logps - ref_logps)
  value = weighted_mean(advantage_B, weights_B) if baseline is None else baseline
  value = jax.lax.stop_gradient(jnp.asarray(value, jnp.float32))
  residual_B = advantage_B - value
  loss_B = _masked(0.5 * jnp.square(residual_B), weights_B)
  values_B = jnp.broadcast_to(value, advantage_B.shape)
  metrics = _dro_metrics(policy_logps, ref_logps, values_B, rewards, residual_B, loss_B, tau,
                         weights_B)
  return loss_B, metrics


def dro_p_baseline(policy_logps: Array, ref_logps: Array, rewards: Array, *, tau: float = 1.0,
                   weights: Array | None = None) -> Array:
  """ā, the weighted batch mean of r − τ·ℓ that DRO-P subtracts (a constant of the batch)."""
  weights_B = example_weights(weights, policy_logps)
  policy_logps, ref_logps, rewards = padded_to_zero(weights_B, policy_logps, ref_logps, rewards)
  return jax.lax.stop_gradient(
      weighted_mean(rewards.astype(jnp.float32) - tau * (policy_logps - ref_logps), weights_B))


# ----------------------------------------------------------------------------------------------
# Token-level and preference-model losses.


def mean_target_tokens(loss_weights: Array, weights: Array | None = None) -> Array:
  """Weighted mean over examples of the summed token loss weights (SFT's normaliser)."""
  weights_B = example_weights(weights, loss_weights)
  (loss_weights,) = padded_to_zero(weights_B, loss_weights)
  return weighted_mean(jnp.sum(loss_weights.astype(jnp.float32), axis=-1), weights_B)


def sft_loss(token_logps: Array, loss_weights: Array, *, weights: Array | None = None,
             mean_tokens: Array | None = None) -> tuple[Array, Metrics]:
  """Token cross-entropy averaged over all weighted target tokens of the global batch.

  Takes per-token log-probs [B, L] (scoring's `token_logps`) because loss weights may be real
  valued. Per example: −Σ_t w_t·log p_t · (Σ_b weights_b) / (Σ_b weights_b·Σ_t w_bt), so that
  `reduce_loss` gives the per-token mean. Microbatched callers pass the global batch's
  `mean_tokens` (`mean_target_tokens`).
  """
  weights_B = example_weights(weights, token_logps)
  token_logps, loss_weights = padded_to_zero(weights_B, token_logps, loss_weights)
  loss_weights_BxL = loss_weights.astype(jnp.float32)
  nll_B = -jnp.sum(jnp.where(loss_weights_BxL > 0, token_logps, 0.0) * loss_weights_BxL, -1)
  tokens_B = jnp.sum(loss_weights_BxL, axis=-1)
  if mean_tokens is None:
    mean_tokens = weighted_mean(tokens_B, weights_B)
  loss_B = _masked(nll_B / jnp.where(mean_tokens > 0, mean_tokens, 1.0), weights_B)
  metrics = {"logps/policy": weighted_mean(-nll_B, weights_B),
             "sft/tokens": jnp.sum(jnp.where(weights_B > 0, weights_B * tokens_B, 0.0)),
             "loss": reduce_loss(loss_B, weights_B)}
  return loss_B, metrics


def reward_model_loss(chosen_rewards: Array, rejected_rewards: Array, *,
                      weights: Array | None = None) -> tuple[Array, Metrics]:
  """Bradley-Terry reward model: −log σ(r_w − r_l)."""
  weights_B = example_weights(weights, chosen_rewards)
  chosen_rewards, rejected_rewards = padded_to_zero(weights_B, chosen_rewards, rejected_rewards)
  loss_B = _masked(-jax.nn.log_sigmoid(chosen_rewards - rejected_rewards), weights_B)
  metrics = {
      "rewards/chosen": weighted_mean(chosen_rewards, weights_B),
      "rewards/rejected": weighted_mean(rejected_rewards, weights_B),
      "rewards/margins": weighted_mean(chosen_rewards - rejected_rewards, weights_B),
      "rewards/accuracies": weighted_mean(
          (chosen_rewards > rejected_rewards).astype(jnp.float32), weights_B),
      "loss": reduce_loss(loss_B, weights_B)}
  return loss_B, metrics


def preference_probability(label_logps: Array, swapped_label_logps: Array) -> Array:
  """P(y1 ≻ y2) from a pairwise judge, averaged over both presentation orders.

  label_logps [B, 2]: log p("A"), log p("B") with (y1, y2) shown as (A, B); swapped_label_logps
  the same with (y2, y1). The two-way softmax over the label logits is σ(log p_A − log p_B).
  """
  first = jax.nn.sigmoid(label_logps[:, 0] - label_logps[:, 1])
  second = jax.nn.sigmoid(swapped_label_logps[:, 1] - swapped_label_logps[:, 0])
  return 0.5 * (first + second)


def preference_model_loss(label_logps: Array, swapped_label_logps: Array,
                          first_preferred: Array, *,
                          weights: Array | None = None) -> tuple[Array, Metrics]:
  """General preference model: cross-entropy of the label token, averaged over both orders.

  `label_logps` / `swapped_label_logps` as in `preference_probability` (log-probs of the "A"
  and "B" tokens under the full vocabulary softmax). `first_preferred` is 1 when y1 ≻ y2, 0
  when y2 ≻ y1, or a probability (soft label). In the swapped order the correct token flips.
  """
  weights_B = example_weights(weights, first_preferred)
  label_logps, swapped_label_logps, first_preferred = padded_to_zero(
      weights_B, label_logps, swapped_label_logps, first_preferred)
  p_B = first_preferred.astype(jnp.float32)
  nll_B = -(p_B * label_logps[:, 0] + (1.0 - p_B) * label_logps[:, 1])
  swapped_nll_B = -(p_B * swapped_label_logps[:, 1] + (1.0 - p_B) * swapped_label_logps[:, 0])
  loss_B = _masked(0.5 * (nll_B + swapped_nll_B), weights_B)
  probability_B = preference_probability(label_logps, swapped_label_logps)
  metrics = {
      "preference/probability": weighted_mean(probability_B, weights_B),
      "rewards/accuracies": weighted_mean(
          ((probability_B > 0.5) == (p_B > 0.5)).astype(jnp.float32), weights_B),
      "loss": reduce_loss(loss_B, weights_B)}
  return loss_B, metrics


LOSSES: dict[str, Callable[..., tuple[Array, Metrics]]] = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "kto": kto_loss,
    "dro": dro_loss,
    "dro_v": dro_loss,
    "dro_p": dro_p_loss,
    "sft": sft_loss,
    "reward_model": reward_model_loss,
    "preference_model": preference_model_loss,
}
