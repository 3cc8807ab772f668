"""A bfloat16 reference copy (`config.reference.dtype`): frozen or hard-synced. The engine's run
with it (losses, donation, checkpoints) is in test_engine.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax import configs, partitioning, reference, train
from dro_jax import step as step_lib


def tiny(name: str, arg: str, dtype: str):
  config = configs.load(name, f"size=tiny,{arg}")
  config.reference.dtype = dtype
  return config


def test_a_hard_sync_casts_the_policy_into_the_bfloat16_copy():
  policy = {"w": jnp.linspace(-1.0, 1.0, 7, dtype=jnp.float32) * 1.001,
            "n": jnp.arange(3)}
  copy = reference.init(policy, jnp.bfloat16)
  moved = jax.tree.map(lambda x: x + 0.37 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                       policy)
  # Not a sync step: the copy stays as it was; a sync step: the new policy, cast.
  kept = reference.update(copy, moved, 3, alpha=1.0, sync_every=2)
  np.testing.assert_array_equal(np.asarray(kept["w"]), np.asarray(copy["w"]))
  synced = jax.jit(reference.update, static_argnames=("alpha", "sync_every"))(
      copy, moved, 4, alpha=1.0, sync_every=2)
  assert synced["w"].dtype == jnp.bfloat16 and synced["n"].dtype == policy["n"].dtype
  np.testing.assert_array_equal(np.asarray(synced["w"]),
                                np.asarray(moved["w"].astype(jnp.bfloat16)))
  # A frozen copy never moves.
  frozen = reference.update(copy, moved, 4, alpha=0.0, sync_every=1)
  np.testing.assert_array_equal(np.asarray(frozen["w"]), np.asarray(copy["w"]))


def test_frozen_bfloat16_reference_is_allowed_and_soft_ema_is_refused():
  frozen = tiny("dpo", "tr=none", "bfloat16")
  assert reference.dtype_from_config(frozen) == jnp.bfloat16
  soft = tiny("dpo", "tr=soft", "bfloat16")
  mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=r"config\.reference\.dtype='bfloat16'.*float32 master"):
    train.state_layout(soft, step_lib.t5_config(soft), mesh, partitioning.DEFAULT_RULES)
  with pytest.raises(ValueError, match="config.reference.dtype must be one of"):
    reference.storage_dtype("float16", 0.0)


def test_init_and_abstract_cast_floating_leaves_only():
  params = {"w": jnp.ones((3,)), "n": jnp.arange(2)}
  copy = reference.init(params, jnp.bfloat16)
  assert copy["w"].dtype == jnp.bfloat16 and copy["n"].dtype == params["n"].dtype
  shapes = reference.abstract(params, jnp.bfloat16)
  assert shapes["w"].dtype == jnp.bfloat16 and shapes["n"].shape == (2,)
