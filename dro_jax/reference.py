"""The reference policy's parameters: frozen, or moved towards the policy (trust region).

One rule covers every schedule, applied after the optimizer step with `step` the number of
optimizer steps taken so far (this one included):

    if step % sync_every == 0:  ref ← α·θ + (1 − α)·ref

frozen: α = 0; soft TR-α: sync_every = 1 (α ≈ 0.5–0.6); hard TR-τ: α = 1, sync_every = τ; the
hybrid HF TRL ships: α = 0.6, sync_every = 512. The rule is loss-agnostic (TR-DPO, TR-IPO, TR-KTO,
DRO). The reference is a float32 master copy by default (`config.reference.dtype`): at a learning
rate of 1e-6 a soft update of a bfloat16 copy rounds to nothing, so soft updates (0 < α < 1) are
refused with a bfloat16 copy; a frozen or hard-synced (α = 1: an exact copy, then rounded)
reference may be stored in bfloat16, half the memory. The arrays are never the policy's own
buffers, so the train state can be donated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

PRESETS: dict[str, dict[str, float | int]] = {
    "frozen": {"alpha": 0.0, "sync_every": 1},
    "soft": {"alpha": 0.6, "sync_every": 1},
    "hard": {"alpha": 1.0, "sync_every": 512},
    "trl": {"alpha": 0.6, "sync_every": 512},
}


DTYPES = ("float32", "bfloat16")


def _cast(dtype: Any) -> Any:
  def cast(leaf_dtype: Any) -> Any:
    return dtype if jnp.issubdtype(leaf_dtype, jnp.floating) else leaf_dtype
  return cast


def init(params: PyTree, dtype: Any = jnp.float32) -> PyTree:
  """A copy of the policy parameters in `dtype` (float32 default; its own buffers, never
  aliases)."""
  cast = _cast(dtype)
  return jax.tree.map(lambda x: jnp.array(x, dtype=cast(x.dtype), copy=True), params)


def abstract(params: PyTree, dtype: Any = jnp.float32) -> PyTree:
  """ShapeDtypeStructs of `init(params, dtype)` (params may be abstract)."""
  cast = _cast(dtype)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, cast(x.dtype)), params)


def storage_dtype(dtype: str, alpha: float) -> jnp.dtype:
  """The reference copy's dtype (`config.reference.dtype`); bfloat16 only where the reference
  is frozen (α = 0) or hard-synced (α = 1)."""
  if dtype not in DTYPES:
    raise ValueError(f"config.reference.dtype must be one of {DTYPES}, got {dtype!r}")
  if dtype != "float32" and 0.0 < alpha < 1.0:
    raise ValueError(
        f"config.reference.dtype={dtype!r} needs a frozen (alpha=0) or hard-synced (alpha=1) "
        f"reference: soft updates (alpha={alpha}) need a float32 master copy, since a "
        f"{dtype} copy rounds small updates away; set config.reference.dtype='float32'")
  return jnp.dtype(dtype)


def dtype_from_config(config: Any) -> jnp.dtype:
  """`storage_dtype` of a run's config (`config.reference.dtype`, float32 when absent)."""
  return storage_dtype(config.reference.get("dtype", "float32"), float(config.reference.alpha))


def is_frozen(alpha: float) -> bool:
  return alpha == 0.0


def validate(alpha: float, sync_every: int, *, precomputed_ref_logps: bool = False) -> None:
  """Fail early on a schedule that cannot be right."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"reference alpha must lie in [0, 1], got {alpha}")
  if int(sync_every) != sync_every or sync_every < 1:
    raise ValueError(f"reference sync_every must be a positive integer, got {sync_every}")
  if precomputed_ref_logps and not is_frozen(alpha):
    raise ValueError(f"precomputed reference log-probs are stale once the reference moves "
                     f"(alpha={alpha}); score the reference in the step instead")


def _check_master_dtype(ref_params: PyTree, alpha: float) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(ref_params)[0]:
    if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != jnp.float32:
      raise ValueError(
          f"soft reference updates (alpha={alpha}) need a float32 master copy; "
          f"{jax.tree_util.keystr(path)} is {leaf.dtype} (set config.reference.dtype="
          f"'float32', or use a frozen or hard-synced reference)")


def update(ref_params: PyTree, params: PyTree, step: Array | int, *, alpha: float,
           sync_every: int) -> PyTree:
  """`ref ← α·θ + (1−α)·ref` when `step % sync_every == 0`, else `ref`; jit-friendly.

  `alpha` and `sync_every` are static (config); `step` may be traced: the choice is a
  `lax.cond`, so off-sync steps cost nothing. With α = 1 the copy is exact, so ℓ = 0 right after.
  """
  validate(alpha, sync_every)
  if is_frozen(alpha):
    return ref_params
  if alpha < 1.0:
    _check_master_dtype(ref_params, alpha)

  def mix(ref: Array, param: Array) -> Array:
    if alpha == 1.0:  # a hard sync: the policy, cast to the reference's own dtype
      return jnp.array(param, dtype=ref.dtype, copy=True)
    mixed = alpha * param.astype(jnp.float32) + (1.0 - alpha) * ref.astype(jnp.float32)
    return mixed.astype(ref.dtype)

  def synced() -> PyTree:
    return jax.tree.map(mix, ref_params, params)

  if sync_every == 1:
    return synced()
  return jax.lax.cond(jnp.asarray(step) % sync_every == 0, synced, lambda: ref_params)
