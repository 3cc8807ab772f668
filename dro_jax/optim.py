"""Optax optimizers from an ml_collections config, per-network learning rates, and DRO's 1/τ.

Each network's chain is: clip by global norm -> Adafactor (default, decay_rate 0.8 as the DRO
paper) or AdamW with a linear warm-up schedule, then a constant, cosine or linear decay
(`schedule`, `decay_steps`, `end_learning_rate_factor`) -> `policy_update_scale` (policy only).
The scale acts on the UPDATE, after the optimizer: under Adam or Adafactor a constant factor on
the gradient would be normalised away (docs/methods.md). Clipping acts on the raw gradient, before the
scale. Both chains follow the same schedule shape, each from its own peak learning rate.

Which chain the value parameters φ take (`value_chain`, from `config.dro.value_optimizer`):

- "value" (the default): φ gets the value chain in every DRO-V variant (models/value.py), even
  when it sits on the policy's encoder: on the policy's chain a zero-initialised head or scalar
  moves by Adafactor's parameter-relative step (~1e-3·lr) and learns little in a run. Within the
  value chain only the zero-initialised leaves (head, scalar) take absolute steps; the encoder
  that double_multiple copies from the policy keeps the policy's relative steps. Consequence:
  single_single and double_single are then the same algorithm (one zero-initialised scalar on
  the value chain with exactly ∂L/∂φ; they differ only when `value_loss_weight` != 1) and train
  bitwise identically; single_multiple still differs from double_multiple (its head reads the
  policy's encoder, which also receives the value gradient).
- "policy" (the DRO paper's single-net ablation, docs/methods.md's table): a single-net variant's φ
  (single_single's scalar, single_multiple's head on the policy encoder) is updated "with the
  policy": the policy's chain, i.e. the policy learning rate and schedule, DRO's 1/τ
  `policy_update_scale` and Adafactor's parameter-scaled step, with one gradient clip over θ and
  φ together. The four variants then train four different ways.

Double-net variants (double_multiple, double_single) keep their own value network and the value
chain under either setting: the caller passes `value_chain="policy"` only for single-net ones
(step.value_chain).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections
import optax

PyTree = Any

POLICY, VALUE = "policy", "value"

# Value subtrees copied from the trained policy (double_multiple's encoder, models/value.py):
# they are at the policy's scale, so they take its relative steps. All other value leaves are
# zero-initialised (the head, the scalar).
COPIED_FROM_POLICY = ("token_embedder", "encoder")
COPIED, FRESH = "copied", "fresh"


def default_config() -> ml_collections.ConfigDict:
  """The DRO paper's recipe: Adafactor(decay_rate=0.8), lr 1e-4 for both nets, 150 warm-up steps."""
  return ml_collections.ConfigDict({
      "name": "adafactor",  # or "adamw"
      "learning_rate": 1e-4,
      "value_learning_rate": None,  # None: the policy's learning rate
      "warmup_steps": 150,
      # After the warm-up: "constant" (the DRO paper), "cosine" or "linear" decay from the peak
      # to end_learning_rate_factor·peak over decay_steps steps, then flat (t5x / T5 recipes).
      "schedule": "constant",
      # None: the run's total_steps − warmup_steps (the train step passes total_steps).
      "decay_steps": None,
      "end_learning_rate_factor": 0.0,
      "grad_clip_norm": 0.0,  # 0: no clipping
      # "inverse_tau" (1/τ, DRO's default), "none", or a number as a string ("0.5").
      "policy_update_scale": "inverse_tau",
      "decay_rate": 0.8,  # Adafactor
      # Adafactor scales each update by max(RMS(param), 1e-3): a zero-initialised value head
      # then moves ~1e-3·lr per step and stays ≈ 0 for a whole run, so the value head and
      # scalar use absolute steps by default. The policy, and the encoder double_multiple
      # copies from it, keep t5x's relative steps.
      "multiply_by_parameter_scale": True,
      "value_multiply_by_parameter_scale": False,
      "b1": 0.9,  # AdamW
      "b2": 0.999,
      "eps": 1e-8,
      "weight_decay": 0.0,
  })


def warmup_schedule(peak_value: float, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `peak_value` over `warmup_steps`, then constant."""
  if warmup_steps <= 0:
    return optax.constant_schedule(peak_value)
  return optax.linear_schedule(0.0, peak_value, warmup_steps)


SCHEDULES = ("constant", "cosine", "linear")


def decay_schedule(peak_value: float, warmup_steps: int, schedule: str = "constant",
                   decay_steps: int | None = None,
                   end_factor: float = 0.0) -> optax.Schedule:
  """Linear warm-up 0 -> `peak_value` over `warmup_steps`, then `schedule`:

  - "constant": `peak_value`;
  - "cosine": peak·(f + (1 − f)·½(1 + cos(π·t/D))), t = step − warmup_steps, D = `decay_steps`;
  - "linear": peak·(1 − (1 − f)·t/D);

  with f = `end_factor`; after the decay (t ≥ D) it stays at f·peak.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"optimizer schedule must be one of {SCHEDULES}, got {schedule!r}")
  if schedule == "constant":
    return warmup_schedule(peak_value, warmup_steps)
  if decay_steps is None or int(decay_steps) <= 0:
    raise ValueError(f"a {schedule!r} schedule needs decay_steps > 0 (or the run's total_steps "
                     f"to derive it from), got {decay_steps!r}")
  decay_steps = int(decay_steps)
  if schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak_value, decay_steps, alpha=end_factor)
  else:
    decay = optax.linear_schedule(peak_value, end_factor * peak_value, decay_steps)
  if warmup_steps <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak_value, warmup_steps), decay],
                              [warmup_steps])


def resolve_decay_steps(config: Mapping[str, Any], total_steps: int | None) -> int | None:
  """`decay_steps`, or by default the steps after the warm-up: total_steps − warmup_steps."""
  if config.get("decay_steps", None) is not None:
    return int(config["decay_steps"])
  if total_steps is None:
    return None
  return max(int(total_steps) - int(config.get("warmup_steps", 0)), 1)


def policy_update_scale(scale: float) -> optax.GradientTransformation:
  """Multiplies updates by `scale`; chain it AFTER the optimizer (DRO's 1/τ on the update)."""

  def init_fn(params: PyTree) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(updates: PyTree, state: optax.EmptyState,
                params: PyTree | None = None) -> tuple[PyTree, optax.EmptyState]:
    del params
    return jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def resolve_update_scale(setting: str | float | None, tau: float | None) -> float:
  """The policy-update factor: 1/τ for "inverse_tau" with a DRO τ, else 1 or the number given.

  Losses without a DRO τ (tau=None: DPO, IPO, KTO, SFT) always get 1.
  """
  if tau is None or setting is None:
    return 1.0
  if isinstance(setting, str):
    if setting == "inverse_tau":
      return 1.0 / tau
    if setting == "none":
      return 1.0
    try:
      return float(setting)
    except ValueError:
      raise ValueError(f"policy_update_scale must be 'inverse_tau', 'none' or a number, "
                       f"got {setting!r}") from None
  return float(setting)


def learning_rate(config: Mapping[str, Any], network: str = POLICY, *,
                  total_steps: int | None = None) -> optax.Schedule:
  """The schedule of `network` ("policy" or "value"), before the policy's 1/τ update scale.

  `total_steps` (the run's) sets the default `decay_steps` of a decaying schedule.
  """
  peak = config.get("learning_rate", 1e-4)
  if network == VALUE and config.get("value_learning_rate", None) is not None:
    peak = config["value_learning_rate"]
  return decay_schedule(peak, config.get("warmup_steps", 0), config.get("schedule", "constant"),
                        resolve_decay_steps(config, total_steps),
                        config.get("end_learning_rate_factor", 0.0))


def _adafactor(config: Mapping[str, Any], schedule: optax.Schedule,
               parameter_scale: bool) -> optax.GradientTransformation:
  return layerwise_when_stacked(optax.adafactor(
      schedule, decay_rate=config.get("decay_rate", 0.8),
      multiply_by_parameter_scale=parameter_scale))


def layerwise_when_stacked(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on each layer of a scanned tree's stacked leaves (`models.scan`), as on the unrolled
  tree; unchanged (same state) for unrolled trees.

  Adafactor's factored moments, parameter scale and update clipping are per matrix, so a stacked
  [layers, ...] leaf needs them per layer to take the unrolled model's steps.
  """
  from dro_jax.models import scan as scan_lib
  split = optax.multi_transform({scan_lib.STACKED: scan_lib.per_layer(tx),
                                 scan_lib.UNSTACKED: tx}, scan_lib.stacked_labels)

  def stacked(tree: PyTree) -> bool:
    return any(label == scan_lib.STACKED for label in jax.tree.leaves(scan_lib.stacked_labels(tree)))

  def init(params):
    return split.init(params) if stacked(params) else tx.init(params)

  def update(updates, state, params=None):
    chosen = split if stacked(updates) else tx
    return chosen.update(updates, state, params)

  return optax.GradientTransformation(init, update)


def value_leaf_labels(value_params: PyTree) -> PyTree:
  """COPIED for leaves under a subtree copied from the policy, FRESH for zero-initialised ones.

  Works on a value tree alone or nested in a larger (optax-masked) tree: any key on the path
  that names a copied subtree marks the leaf.
  """

  def label(path: tuple[Any, ...], _: Any) -> str:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return COPIED if any(name in COPIED_FROM_POLICY for name in names) else FRESH

  return jax.tree_util.tree_map_with_path(label, value_params)


def _base_optimizer(config: Mapping[str, Any], schedule: optax.Schedule,
                    network: str) -> optax.GradientTransformation:
  name = config.get("name", "adafactor")
  if name == "adafactor":
    relative = config.get("multiply_by_parameter_scale", True)
    if network != VALUE:
      return _adafactor(config, schedule, relative)
    fresh = config.get("value_multiply_by_parameter_scale", False)
    if fresh == relative:
      return _adafactor(config, schedule, relative)
    # Absolute steps for the zero-initialised head only; the copied encoder stays relative.
    return optax.multi_transform({COPIED: _adafactor(config, schedule, relative),
                                  FRESH: _adafactor(config, schedule, fresh)},
                                 value_leaf_labels)
  if name == "adamw":
    return optax.adamw(schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                       eps=config.get("eps", 1e-8), weight_decay=config.get("weight_decay", 0.0))
  raise ValueError(f"unknown optimizer {name!r}; choose 'adafactor' or 'adamw'")


def make_optimizer(config: Mapping[str, Any], network: str = POLICY, *,
                   update_scale: float = 1.0,
                   total_steps: int | None = None) -> optax.GradientTransformation:
  """One network's chain: clip -> optimizer with warm-up and decay -> update scale."""
  parts = []
  clip = config.get("grad_clip_norm", 0.0)
  if clip:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(_base_optimizer(config, learning_rate(config, network, total_steps=total_steps),
                               network))
  if update_scale != 1.0:
    parts.append(policy_update_scale(update_scale))
  return optax.chain(*parts)


def is_count(path: tuple[Any, ...]) -> bool:
  """Whether an optimizer-state leaf at `path` is a step counter (optax's `count` fields: the
  schedule's, Adafactor's and Adam's), as opposed to a moment."""
  return bool(path) and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "count"


def advance_counts(new_state: PyTree, old_state: PyTree) -> PyTree:
  """`old_state` with the step counters of `new_state`: every moment as in `old_state`, every
  count advanced as `new_state`'s (a skipped step keeps the schedule a function of the step)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, new, old: new if is_count(path) else old, new_state, old_state)


def _check_value_chain(value_chain: str) -> None:
  if value_chain not in (POLICY, VALUE):
    raise ValueError(f"the value parameters' chain must be {VALUE!r} or {POLICY!r}, "
                     f"got {value_chain!r}")


def make_optimizers(config: Mapping[str, Any], *, tau: float | None = None,
                    value_chain: str = VALUE,
                    total_steps: int | None = None) -> dict[str, optax.GradientTransformation]:
  """{"policy": ..., "value": ...}, one per network and state.

  `value_chain="value"`: the value state gets the value chain (its learning rate, absolute steps
  for zero-initialised leaves, no 1/τ). `value_chain="policy"`: it gets a copy of the policy's
  chain (the policy's learning rate, 1/τ and parameter scaling), for a single-net variant's φ
  (module docstring); the caller clips θ and φ together when clipping is on.
  """
  _check_value_chain(value_chain)
  scale = resolve_update_scale(config.get("policy_update_scale", "inverse_tau"), tau)
  policy = make_optimizer(config, POLICY, update_scale=scale, total_steps=total_steps)
  value = (policy if value_chain == POLICY
           else make_optimizer(config, VALUE, total_steps=total_steps))
  return {POLICY: policy, VALUE: value}


def make_joint_optimizer(config: Mapping[str, Any], *, tau: float | None = None,
                         value_chain: str = VALUE,
                         total_steps: int | None = None) -> optax.GradientTransformation:
  """One optimizer over the trainable tree {"policy": θ, "value": φ} (value optional).

  `value_chain="value"` (default): φ gets the value chain (its learning rate, no 1/τ); clipping
  is per network. `value_chain="policy"`: φ joins θ on the policy's chain (one chain over both,
  one clip over both), as a single-net variant's value under `dro.value_optimizer="policy"`.
  """
  optimizers = make_optimizers(config, tau=tau, total_steps=total_steps)
  _check_value_chain(value_chain)

  def labels(params: Mapping[str, PyTree]) -> dict[str, PyTree]:
    return {key: jax.tree.map(lambda _, k=key: value_chain if k == VALUE else POLICY, subtree)
            for key, subtree in params.items()}

  return optax.multi_transform(optimizers, labels)
