"""The train and eval steps: pure `(state, batch) -> (state, metrics)` for every registered loss.

`make_train_step(config)` selects one `Objective` from `OBJECTIVES[config.loss]` (outside jit);
an objective says how to score a batch (the only model calls), which statistics mix examples,
and which loss of `losses.LOSSES` to apply. The step then

1. with `num_microbatches` M = 1: scores the batch, takes the statistics from those scores
   (stop-gradient) and differentiates the weighted mean loss;
2. with M > 1, exactly the same update: microbatch m holds rows i ≡ m (mod M) (a reshape, so a
   batch sharded over devices needs no resharding). A no-grad pass over all microbatches scores
   every example; the statistics (KTO's z0 and desirable labels, DRO-P's batch mean, SFT's token
   total) and the metrics come from those global scores; the gradient pass then sums the
   microbatches' gradients of Σ_i w_i·loss_i / Σ_all w with the statistics fixed, reading the
   reference log-probs from the first pass instead of running the reference again.

Then one optimizer per network, `reference.update` (trust region), and metrics (docs/methods.md, Metrics, plus
grad_norm, learning_rate — the policy's effective rate, DRO's 1/τ included —, value_learning_rate
when there is a value, finite). Under on_nonfinite="skip" a non-finite step advances the step and
the optimizers' counts but nothing else (`skip_nonfinite`). Jit, shardings and donation are
applied in partitioning.py.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dro_jax import judge_inputs, losses, optim, reference, scoring
from dro_jax.models import t5 as t5_lib
from dro_jax.models import value as value_lib
from dro_jax.state import TrainState

Array = jax.Array
PyTree = Any
Batch = dict[str, Array]
Scores = dict[str, Array]

DRO_LOSSES = ("dro", "dro_v", "dro_p")


def t5_config(config: ml_collections.ConfigDict) -> t5_lib.T5Config:
  """The policy's T5Config: the preset `config.model.preset` with every non-None override."""
  fields = {field.name for field in dataclasses.fields(t5_lib.T5Config)}
  overrides = {key: value for key, value in config.model.items()
               if key in fields and value is not None}
  if config.get("compute_dtype"):
    overrides["dtype"] = config.compute_dtype
  if "mlp_activations" in overrides:
    overrides["mlp_activations"] = tuple(overrides["mlp_activations"])
  return t5_lib.get_config(config.model.preset, **overrides)


def _stop(tree: PyTree) -> PyTree:
  return jax.tree.map(jax.lax.stop_gradient, tree)


# ----------------------------------------------------------------------------------- objectives


class Objective(abc.ABC):
  """How one loss scores a batch and which statistics mix examples. Subclasses fill it in."""

  uses_reference = True
  reference_keys: tuple[str, ...] = ()  # batch keys of precomputed reference log-probs (sums)

  def __init__(self, config: ml_collections.ConfigDict, model: t5_lib.T5):
    self.config, self.model = config, model

  def prepare(self, batch: Batch) -> Batch:
    """Keys derived from the GLOBAL batch before it is split into microbatches."""
    return batch

  @abc.abstractmethod
  def score(self, trainable: PyTree, ref_params: PyTree, batch: Batch,
            for_statistics: bool = True) -> Scores:
    """Per-example scores; `for_statistics=False` when the statistics are already known."""

  def statistics(self, scores: Scores, batch: Batch) -> dict[str, Array]:
    """Constants of the global batch (stop-gradient) the per-example losses depend on."""
    del scores, batch
    return {}

  @abc.abstractmethod
  def loss(self, scores: Scores, batch: Batch, stats: Mapping[str, Array]):
    """(per-example loss [B], metrics) of the registered loss in `losses.LOSSES`."""

  def reference_batch_keys(self, scores: Scores) -> Batch:
    """Reference log-probs of `scores` as batch keys, so a second pass need not recompute them."""
    return {key: scores[key] for key in self.reference_keys}

  def reference_scores(self, batch: Batch, keys: tuple[str, ...], ref_params: PyTree,
                       compute: Callable[[PyTree], Scores]) -> Scores:
    """The precomputed batch `keys` when all are present, else `compute(reference)` -> {key}."""
    if all(key in batch for key in keys):
      return {key: batch[key].astype(jnp.float32) for key in keys}
    if ref_params is None:
      raise ValueError(f"loss {self.config.loss!r} needs reference log-probs: the batch lacks "
                       f"{list(keys)} and the state holds no reference parameters")
    return jax.lax.stop_gradient(compute(_stop(ref_params)))

  def reference_logps(self, batch: Batch, key: str, ref_params: PyTree,
                      compute: Callable[[PyTree], Array]) -> Array:
    """One precomputed reference key, or computed from the reference parameters."""
    return self.reference_scores(batch, (key,), ref_params, lambda ref: {key: compute(ref)})[key]

  def sequence_scores(self, params: PyTree, batch: Batch, prefix: str = "",
                      return_encoded: bool = False) -> Scores:
    return scoring.score(self.model, params, batch["encoder_input_tokens"],
                         batch[f"{prefix}decoder_input_tokens"],
                         batch[f"{prefix}decoder_target_tokens"],
                         batch.get(f"{prefix}decoder_loss_weights"),
                         return_encoded=return_encoded)


class SFT(Objective):
  uses_reference = False

  def score(self, trainable, ref_params, batch, for_statistics=True):
    del ref_params
    return {"token_logps": self.sequence_scores(trainable["policy"], batch)["token_logps"]}

  def statistics(self, scores, batch):
    return {"mean_tokens": losses.mean_target_tokens(_loss_weights(batch),
                                                      batch["example_weights"])}

  def loss(self, scores, batch, stats):
    return losses.sft_loss(scores["token_logps"], _loss_weights(batch),
                           weights=batch["example_weights"], mean_tokens=stats["mean_tokens"])


def _loss_weights(batch: Batch) -> Array:
  if "decoder_loss_weights" in batch:
    return batch["decoder_loss_weights"]
  return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


class SingleTrajectory(Objective):
  reference_keys = ("ref_logps",)

  def policy_and_reference(self, trainable, ref_params, batch, return_encoded=False) -> Scores:
    policy = self.sequence_scores(trainable["policy"], batch, return_encoded=return_encoded)
    scores = {"logps": policy["logps"],
              "ref_logps": self.reference_logps(
                  batch, "ref_logps", ref_params,
                  lambda ref: self.sequence_scores(ref, batch)["logps"])}
    if return_encoded:
      scores["encoded"] = policy["encoded"]
    return scores


class DRO(SingleTrajectory):
  """DRO-V: ½(r − V(x) − τℓ)² with one of the four value functions."""

  def __init__(self, config, model):
    super().__init__(config, model)
    self.value_fn = make_value_function(config)

  def score(self, trainable, ref_params, batch, for_statistics=True):
    shared_encoder = isinstance(self.value_fn, value_lib.SingleNetMultipleValues)
    scores = self.policy_and_reference(trainable, ref_params, batch, shared_encoder)
    if shared_encoder:
      scores["values"] = self.value_fn.from_encoded(
          trainable["value"], scores.pop("encoded"), batch["encoder_input_tokens"])
    else:
      scores["values"] = self.value_fn(trainable["value"], trainable["policy"],
                                       batch["encoder_input_tokens"])
    return scores

  def loss(self, scores, batch, stats):
    return losses.dro_loss(scores["logps"], scores["ref_logps"], scores["values"],
                           batch["reward"], tau=self.config.dro.tau,
                           weights=batch["example_weights"])


class DROP(SingleTrajectory):
  """DRO-P: the batch mean of r − τℓ in place of a value network."""

  def score(self, trainable, ref_params, batch, for_statistics=True):
    return self.policy_and_reference(trainable, ref_params, batch)

  def statistics(self, scores, batch):
    return {"baseline": losses.dro_p_baseline(scores["logps"], scores["ref_logps"],
                                              batch["reward"], tau=self.config.dro.tau,
                                              weights=batch["example_weights"])}

  def loss(self, scores, batch, stats):
    return losses.dro_p_loss(scores["logps"], scores["ref_logps"], batch["reward"],
                             tau=self.config.dro.tau, weights=batch["example_weights"],
                             baseline=stats["baseline"])


class KTO(SingleTrajectory):
  """KTO; mismatched pairs formed on the global batch (or given by the data as kl_* keys)."""

  reference_keys = ("ref_logps", "ref_kl_logps")

  def prepare(self, batch):
    weights = batch["example_weights"]
    kl = losses.mismatched_batch(batch)
    prepared = {**batch, **{f"kl_{key}": kl[key] for key in losses.MISMATCHED_KEYS if key in kl}}
    if "label" in batch:
      prepared["desirable"] = losses.desirable_labels(labels_B=batch["label"])
    else:
      prepared["desirable"] = losses.desirable_labels(batch["reward"], weights_B=weights)
    return prepared

  def score(self, trainable, ref_params, batch, for_statistics=True):
    if not for_statistics:
      return self.policy_and_reference(trainable, ref_params, batch)
    # The mismatched pair i is (x_i, y_partner): row i's own prompt, so its encoder output is
    # reused (no gradient flows through the mismatched scores).
    policy = self.sequence_scores(trainable["policy"], batch, return_encoded=True)
    kl = scoring.decode_scores(
        self.model, trainable["policy"], jax.lax.stop_gradient(policy["encoded"]),
        batch["encoder_input_tokens"], batch["kl_decoder_input_tokens"],
        batch["kl_decoder_target_tokens"], batch.get("kl_decoder_loss_weights"))
    scores = {"logps": policy["logps"], "kl_logps": jax.lax.stop_gradient(kl["logps"])}
    if any(key in batch for key in self.reference_keys):  # precomputed, one or both
      for key, prefix in zip(self.reference_keys, ("", "kl_")):
        scores[key] = self.reference_logps(
            batch, key, ref_params,
            lambda ref, p=prefix: self.sequence_scores(ref, batch, prefix=p)["logps"])
    else:
      scores.update(self.reference_scores(batch, self.reference_keys, ref_params,
                                          lambda ref: self.reference_pair(ref, batch)))
    return scores

  def reference_pair(self, ref: PyTree, batch: Batch) -> Scores:
    """ref_logps and ref_kl_logps with one encoder pass over the prompts."""
    matched, mismatched = scoring.score_many(self.model, ref, batch["encoder_input_tokens"], [
        (batch[f"{prefix}decoder_input_tokens"], batch[f"{prefix}decoder_target_tokens"],
         batch.get(f"{prefix}decoder_loss_weights")) for prefix in ("", "kl_")])
    return {"ref_logps": matched["logps"], "ref_kl_logps": mismatched["logps"]}

  def statistics(self, scores, batch):
    return {"z0": losses.kto_reference_point(scores["kl_logps"], scores["ref_kl_logps"],
                                             batch["example_weights"])}

  def loss(self, scores, batch, stats):
    kto = self.config.kto
    return losses.kto_loss(scores["logps"], scores["ref_logps"], None, None, batch["desirable"],
                           beta=kto.beta, desirable_weight=kto.desirable_weight,
                           undesirable_weight=kto.undesirable_weight,
                           weights=batch["example_weights"], z0=stats["z0"])


class Pairwise(Objective):
  """DPO and IPO on chosen/rejected pairs, both scored in one forward pass."""

  reference_keys = ("ref_chosen_logps", "ref_rejected_logps")

  def score(self, trainable, ref_params, batch, for_statistics=True):
    policy = scoring.score_pairs(self.model, trainable["policy"], batch)
    def compute(ref: PyTree) -> Scores:
      pairs = scoring.score_pairs(self.model, ref, batch)
      return {"ref_chosen_logps": pairs["chosen_logps"],
              "ref_rejected_logps": pairs["rejected_logps"]}
    return {**policy, **self.reference_scores(batch, self.reference_keys, ref_params, compute)}

  def loss(self, scores, batch, stats):
    args = (scores["chosen_logps"], scores["rejected_logps"], scores["ref_chosen_logps"],
            scores["ref_rejected_logps"])
    weights = batch["example_weights"]
    if self.config.loss == "ipo":
      return losses.ipo_loss(*args, tau=self.config.ipo.tau,
                             chosen_lengths=scores["chosen_lengths"],
                             rejected_lengths=scores["rejected_lengths"], weights=weights)
    return losses.dpo_loss(*args, beta=self.config.dpo.beta,
                           label_smoothing=self.config.dpo.label_smoothing, weights=weights)


class RewardModel(Objective):
  """Bradley-Terry reward model: an encoder over prompt ‖ response with a scalar head."""

  uses_reference = False

  def __init__(self, config, model):
    super().__init__(config, model)
    self.network = value_lib.EncoderValueNetwork(model.config)

  def score(self, trainable, ref_params, batch, for_statistics=True):
    del ref_params
    prompt = batch["encoder_input_tokens"]
    both = jnp.concatenate([
        judge_inputs.reward_model_inputs(prompt, batch["chosen_decoder_target_tokens"]),
        judge_inputs.reward_model_inputs(prompt, batch["rejected_decoder_target_tokens"])])
    chosen, rejected = jnp.split(self.network.apply({"params": trainable["policy"]}, both), 2)
    return {"chosen_rewards": chosen, "rejected_rewards": rejected}

  def loss(self, scores, batch, stats):
    return losses.reward_model_loss(scores["chosen_rewards"], scores["rejected_rewards"],
                                    weights=batch["example_weights"])


class PreferenceModel(Objective):
  """Pairwise judge: "x ‖ y1 ‖ y2" -> "A"/"B", both orders (position bias cancels)."""

  uses_reference = False

  def score(self, trainable, ref_params, batch, for_statistics=True):
    del ref_params
    prompt = batch["encoder_input_tokens"]
    chosen, rejected = (batch["chosen_decoder_target_tokens"],
                        batch["rejected_decoder_target_tokens"])
    inputs = jnp.concatenate([judge_inputs.preference_model_inputs(prompt, chosen, rejected),
                              judge_inputs.preference_model_inputs(prompt, rejected, chosen)])
    label_logps = judge_inputs.label_logps(self.model, trainable["policy"], inputs,
                                           self.config.preference.a_token,
                                           self.config.preference.b_token)
    first, swapped = jnp.split(label_logps, 2)
    return {"label_logps": first, "swapped_label_logps": swapped}

  def loss(self, scores, batch, stats):
    # The chosen response is shown first in `label_logps`, so y1 ≻ y2 always.
    first_preferred = jnp.ones_like(batch["example_weights"])
    return losses.preference_model_loss(scores["label_logps"], scores["swapped_label_logps"],
                                        first_preferred, weights=batch["example_weights"])


OBJECTIVES: dict[str, type[Objective]] = {
    "sft": SFT, "dro": DRO, "dro_v": DRO, "dro_p": DROP, "kto": KTO, "dpo": Pairwise,
    "ipo": Pairwise, "reward_model": RewardModel, "preference_model": PreferenceModel,
}
assert set(OBJECTIVES) == set(losses.LOSSES), "every registered loss needs an objective"


def make_objective(config: ml_collections.ConfigDict) -> Objective:
  if config.loss not in OBJECTIVES:
    raise ValueError(f"config.loss: unknown loss {config.loss!r}; choose from {sorted(OBJECTIVES)}")
  return OBJECTIVES[config.loss](config, t5_lib.T5(t5_config(config)))


def make_value_function(config: ml_collections.ConfigDict) -> value_lib.ValueFunction | None:
  """DRO-V's value function (`config.dro.value_function`), None for every other loss."""
  if config.loss not in ("dro", "dro_v"):
    return None
  return value_lib.make_value_function(config.dro.value_function, t5_config(config),
                                       config.dro.value_loss_weight)


def tau_of(config: ml_collections.ConfigDict) -> float | None:
  """DRO's τ (the 1/τ policy-update scale applies), None for the other losses."""
  return config.dro.tau if config.loss in DRO_LOSSES else None


# ---------------------------------------------------------------------------------- microbatches


def split_microbatches(tree: PyTree, count: int) -> PyTree:
  """[B, ...] -> [M, B/M, ...] with microbatch m holding rows i ≡ m (mod M)."""
  def split(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // count, count) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def merge_microbatches(tree: PyTree) -> PyTree:
  """Inverse of `split_microbatches`."""
  def merge(x):
    return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
  return jax.tree.map(merge, tree)


def _weighted_sum_loss(objective: Objective, trainable, ref_params, batch, stats,
                       total_weight) -> tuple[Array, dict]:
  scores = objective.score(trainable, ref_params, batch, for_statistics=stats is None)
  if stats is None:
    stats = objective.statistics(_stop(scores), batch)
  loss_B, metrics = objective.loss(scores, batch, stats)
  weights_B = batch["example_weights"].astype(jnp.float32)
  total = jnp.sum(jnp.where(weights_B > 0, weights_B * loss_B, 0.0))
  return total / jnp.where(total_weight > 0, total_weight, 1.0), metrics


def loss_and_grads(objective: Objective, trainable: PyTree, ref_params: PyTree, batch: Batch,
                   num_microbatches: int,
                   constrain: Callable[[PyTree], PyTree] = lambda x: x) -> tuple[dict, PyTree]:
  """(metrics, gradients of the weighted mean loss over the global batch w.r.t. `trainable`)."""
  batch = objective.prepare(batch)
  total_weight = jnp.sum(batch["example_weights"].astype(jnp.float32))
  grad_fn = jax.grad(_weighted_sum_loss, argnums=1, has_aux=True)
  if num_microbatches == 1:
    grads, metrics = grad_fn(objective, trainable, ref_params, batch, None, total_weight)
    return metrics, grads

  micro = constrain(split_microbatches(batch, num_microbatches))
  scores = merge_microbatches(jax.lax.map(
      lambda mb: _stop(objective.score(trainable, ref_params, mb)), micro))
  stats = objective.statistics(scores, batch)
  _, metrics = objective.loss(scores, batch, stats)
  reference_keys = constrain(split_microbatches(objective.reference_batch_keys(scores),
                                                num_microbatches))

  def accumulate(grads, inputs):
    microbatch = {**inputs[0], **inputs[1]}
    mb_grads, _ = grad_fn(objective, trainable, ref_params, microbatch, stats, total_weight)
    return jax.tree.map(jnp.add, grads, mb_grads), None

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  grads, _ = jax.lax.scan(accumulate, zeros, (micro, reference_keys))
  return metrics, grads


# ------------------------------------------------------------------------------------- the steps


VALUE_OPTIMIZERS = ("value", "policy")


def value_chain(config: ml_collections.ConfigDict) -> str:
  """The chain of the value parameters: "policy" for a single-net DRO-V variant under
  `config.dro.value_optimizer="policy"`, else "value" (double-net variants always keep theirs)."""
  if config.loss not in ("dro", "dro_v"):
    return optim.VALUE
  setting = config.dro.get("value_optimizer", "value")
  if setting not in VALUE_OPTIMIZERS:
    raise ValueError(f"config.dro.value_optimizer must be one of {VALUE_OPTIMIZERS}, "
                     f"got {setting!r}")
  variant = value_lib.VALUE_FUNCTIONS.get(config.dro.value_function)
  if setting == "policy" and variant is not None and variant.trained_with_policy:
    return optim.POLICY
  return optim.VALUE


def make_optimizers(config: ml_collections.ConfigDict) -> dict[str, optax.GradientTransformation]:
  """{"policy", "value"} chains of the run; a decaying schedule's default length comes from
  config.total_steps."""
  return optim.make_optimizers(config.optimizer, tau=tau_of(config),
                               value_chain=value_chain(config),
                               total_steps=config.get("total_steps", None))


def learning_rates(config: ml_collections.ConfigDict) -> dict[str, Callable[[Array], Array]]:
  """step -> the effective learning rate of each network at that step, as logged: the policy's
  includes DRO's 1/τ `policy_update_scale`; a value on the policy's chain takes the policy's."""
  total_steps = config.get("total_steps", None)
  scale = optim.resolve_update_scale(config.optimizer.get("policy_update_scale", "inverse_tau"),
                                     tau_of(config))
  policy = optim.learning_rate(config.optimizer, optim.POLICY, total_steps=total_steps)
  rates = {optim.POLICY: lambda count: scale * policy(count)}
  if value_chain(config) == optim.POLICY:
    rates[optim.VALUE] = rates[optim.POLICY]
  else:
    rates[optim.VALUE] = optim.learning_rate(config.optimizer, optim.VALUE,
                                             total_steps=total_steps)
  return rates


def _apply(optimizer: optax.GradientTransformation, grads: PyTree, opt_state: PyTree,
           params: PyTree) -> tuple[PyTree, PyTree]:
  if params is None:
    return None, opt_state
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def make_train_step(config: ml_collections.ConfigDict,
                    constrain: Callable[[PyTree], PyTree] = lambda x: x
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """The pure train step of `config.loss`; `constrain` pins microbatch shardings (partitioning)."""
  objective = make_objective(config)
  optimizers = make_optimizers(config)
  rates = learning_rates(config)
  # A single-net value on the policy's chain is part of the policy's tree: one clip over both.
  joint_clip = (value_chain(config) == optim.POLICY
                and config.optimizer.get("grad_clip_norm", 0.0))
  alpha, sync_every = config.reference.alpha, config.reference.sync_every
  reference.validate(alpha, sync_every)
  num_microbatches = int(config.num_microbatches)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    ref_params = state.reference if objective.uses_reference else None
    metrics, grads = loss_and_grads(objective, state.trainable, ref_params, batch,
                                    num_microbatches, constrain)
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.global_norm(grads)
    if joint_clip and state.value is not None:
      # The chains' own (per-network) clips are then no-ops.
      grads, _ = optax.clip_by_global_norm(joint_clip).update(grads, optax.EmptyState())
    policy, policy_opt = _apply(optimizers["policy"], grads["policy"], state.policy_opt,
                                state.policy)
    value, value_opt = _apply(optimizers["value"], grads["value"], state.value_opt, state.value)
    count = state.step + 1
    new_reference = state.reference
    if state.reference is not None:
      new_reference = reference.update(state.reference, policy, count, alpha=alpha,
                                       sync_every=sync_every)
    rng, _ = jax.random.split(state.rng)
    # The rates this step's update used (the optimizers' counts equal state.step, skips included).
    metrics["learning_rate"] = rates[optim.POLICY](state.step)
    if state.value is not None:
      metrics["value_learning_rate"] = rates[optim.VALUE](state.step)
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    new_state = state.replace(step=count, rng=rng, policy=policy, policy_opt=policy_opt,
                              value=value, value_opt=value_opt, reference=new_reference)
    # What a skipped step leaves: parameters, moments, value and reference as they were; the
    # step, the rng and the optimizers' counts advanced as by a taken step.
    skipped = state.replace(
        step=count, rng=rng, policy_opt=optim.advance_counts(policy_opt, state.policy_opt),
        value_opt=optim.advance_counts(value_opt, state.value_opt))
    return keep_if_nonfinite(metrics["finite"], new_state, skipped), metrics

  if config.get("on_nonfinite", "stop") not in ("stop", "skip"):
    raise ValueError(f"config.on_nonfinite must be 'stop' or 'skip', got {config.on_nonfinite!r}")
  if config.get("on_nonfinite", "stop") == "stop":
    keep_if_nonfinite = lambda finite, new, old: new  # the driver stops on the flag
  else:
    keep_if_nonfinite = skip_nonfinite
  return step


def skip_nonfinite(finite: Array, new: TrainState, old: TrainState) -> TrainState:
  """`where(finite, new, old)` leaf by leaf, `old` being the skipped step's state.

  on_nonfinite="skip": a non-finite step leaves θ, φ, the optimizer moments and the reference as
  they were, and advances the counters as a taken step does: `step` (the batch is consumed), the
  rng and every optimizer count. So after k steps with s of them skipped, state.step == k, every
  optimizer count == k, the learning-rate schedule (and Adafactor's step-dependent decay) is at
  step k and the trust-region sync (every `sync_every` steps of state.step) stays in phase with
  the optimizer; a skipped sync step does not move the reference."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def make_eval_step(config: ml_collections.ConfigDict) -> Callable[[TrainState, Batch], dict]:
  """Metrics of the loss on a batch, no update (the statistics from the batch itself)."""
  objective = make_objective(config)

  def eval_step(state: TrainState, batch: Batch) -> dict:
    batch = objective.prepare(batch)
    ref_params = state.reference if objective.uses_reference else None
    scores = objective.score(state.trainable, ref_params, batch)
    _, metrics = objective.loss(scores, batch, objective.statistics(scores, batch))
    return metrics

  return eval_step
